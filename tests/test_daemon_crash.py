"""The daemon as a real process: SIGKILL mid-stream, restarts, and a broker that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from consumer.embedded import EmbeddedServer
from consumer.streams import ensure_streams
from schemas.events import ExportCompleted, ExportStarted
from schemas.subjects import control_subject
from tests.daemon_helpers import (
    FAKE_JOB,
    collect_exports,
    daemon_settings,
    pending,
    publish_selfplay,
    running_daemon,
    selfplay_payload,
    wait_for_status,
)


def start_daemon(
    tmp_path: Path, url: str, *extra: str, mode: str = "ok"
) -> subprocess.Popen[bytes]:
    command = f"{sys.executable} {FAKE_JOB} {mode} {{output_path}} {{games_dir}}"
    # A short ack_wait: what a killed daemon fetched but never committed returns quickly.
    env = {**os.environ, "AUTOEXPORT_EXPORT_COMMAND": command, "AUTOEXPORT_ACK_WAIT_SECONDS": "2"}
    argv = [sys.executable, "-m", "consumer.cli", "run", "--nats-url", url,
            "--data-dir", str(tmp_path / "data"), *extra]  # fmt: skip
    with (tmp_path / "daemon.log").open("ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def autoexport(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One CLI command to completion, as an operator would type it."""
    argv = [sys.executable, "-m", "consumer.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)


def counted_games(state_db: Path) -> int:
    """Read the daemon's committed counts from its state file, as an operator could."""
    if not state_db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(state_db)) as db:
        try:
            row = db.execute("SELECT COALESCE(SUM(total_games), 0) FROM export_state").fetchone()
        except sqlite3.OperationalError:  # the schema is not created yet
            return 0
    return int(row[0])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


async def test_sigkill_mid_stream_then_restart_counts_every_game_exactly_once(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    js = nc.jetstream()
    await ensure_streams(js)
    events = 6000
    # Every event twice under two message ids: redelivery and duplicates must both be harmless.
    payloads = [selfplay_payload(1, batch_id=f"b{i}") for i in range(events)]
    for i, payload in enumerate(payloads):
        for copy in ("x", "y"):
            await js.publish(
                "selfplay.complete.hex8_2p", payload, headers={"Nats-Msg-Id": f"{i}{copy}"}
            )

    state_db = tmp_path / "data" / "export_daemon_state.db"
    daemon = start_daemon(tmp_path, nats_server.url, "--min-games", "1000000")
    try:
        while counted_games(state_db) == 0:  # kill once it is visibly mid-stream
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            await asyncio.sleep(0.005)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    finally:
        stop(daemon)
    at_kill = counted_games(state_db)
    assert 0 < at_kill < events, "the kill did not land mid-stream"

    restarted = start_daemon(
        tmp_path, nats_server.url, "--min-games", "1000000", "--exit-when-idle"
    )
    assert restarted.wait(60) == 0, (tmp_path / "daemon.log").read_text()
    assert counted_games(state_db) == events
    info = await js.consumer_info("SELFPLAY_EVENTS", "autoexport")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_sigterm_stops_cleanly_and_state_is_readable_offline(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    daemon = start_daemon(tmp_path, nats_server.url)
    try:
        await wait_for_status(nats_server.url, lambda s: True)
        await publish_selfplay(nc, 42)
        await wait_for_status(nats_server.url, lambda s: pending(s) == 42)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        stop(daemon)
    out = autoexport(
        "status", "--json", "--state-db", str(tmp_path / "data" / "export_daemon_state.db")
    )
    assert out.returncode == 0, out.stderr
    assert '"games_pending": 42' in out.stdout


async def test_survives_the_server_going_away_and_its_consumer_being_deleted(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url, min_games_threshold=10)
    async with running_daemon(settings):
        nc = await nats.connect(nats_server.url)
        await publish_selfplay(nc, 3)
        await wait_for_status(nats_server.url, lambda s: pending(s) == 3)
        await nc.close()

        nats_server.stop()
        nats_server.start()  # same port, same store: the daemon reconnects by itself
        nc = await nats.connect(nats_server.url)
        exports = await collect_exports(nc)
        await publish_selfplay(nc, 3)
        await wait_for_status(nats_server.url, lambda s: pending(s) == 6)

        await nc.jetstream().delete_consumer("SELFPLAY_EVENTS", settings.durable_name)
        await publish_selfplay(nc, 4)  # only a re-created consumer can count this
        started = await exports.next(timeout=30)
        assert isinstance(started, ExportStarted) and started.games_pending == 10
        assert isinstance(await exports.next(), ExportCompleted)
        await nc.close()


def test_an_export_command_with_an_unknown_field_stops_the_start(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOEXPORT_EXPORT_COMMAND": "exporter --out {output}"}
    out = autoexport("run", "--data-dir", str(tmp_path), env=env)
    assert out.returncode == 2
    assert "export_command" in out.stderr and "{output}" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-concurrent", "0", "max_concurrent_exports"),
        ("--min-games", "-5", "min_games_threshold"),
        ("--export-timeout", "0", "export_timeout_seconds"),
    ],
)
def test_nonsense_settings_stop_the_start_with_one_line(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    out = autoexport("run", "--data-dir", str(tmp_path), flag, value)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and value in lines[0], out.stderr
    assert not (tmp_path / "export_daemon_state.db").exists()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie waiting for init to reap it is gone
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_an_export_interrupted_by_a_crash_is_resumed_after_restart(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    await ensure_streams(nc.jetstream())
    exports = await collect_exports(nc)
    pids_file = tmp_path / "data" / "games" / "pids"
    daemon = start_daemon(tmp_path, nats_server.url, "--min-games", "10", mode="hang")
    try:
        await wait_for_status(nats_server.url, lambda s: True)
        await publish_selfplay(nc, 12)
        started = await exports.next()
        assert isinstance(started, ExportStarted)
        await wait_until(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2)
        job_pid, child_pid = map(int, pids_file.read_text().split())
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    finally:
        stop(daemon)
    assert alive(job_pid) and alive(child_pid)  # a SIGKILLed daemon cannot clean up
    offline = autoexport("status", "--state-db", str(tmp_path / "data" / "export_daemon_state.db"))
    assert offline.returncode == 0, offline.stderr
    assert "interrupted (resumed at the next start)" in offline.stdout

    restarted = start_daemon(tmp_path, nats_server.url, "--min-games", "10", mode="ok")
    try:
        complete = await exports.next()
        assert isinstance(complete, ExportCompleted), complete
        assert complete.export_id == started.export_id
        # The leftover job group of the first attempt was killed, not left to write.
        await wait_until(lambda: not alive(job_pid) and not alive(child_pid))
        st = await wait_for_status(nats_server.url, lambda s: pending(s) == 0)
        assert st["states"]["hex8_2p"]["in_progress"] is False
        assert exports.queue.empty()  # no second "started" for the same export
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(20) == 0


async def test_waits_for_jetstream_when_the_server_has_none_then_counts(tmp_path: Path) -> None:
    from consumer.embedded import nats_server_binary

    # A server without JetStream on the port the daemon is told to use.
    probe = EmbeddedServer(tmp_path / "probe")
    probe.start()
    port = probe.port
    probe.stop()
    plain = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"nats://127.0.0.1:{port}"
    daemon = start_daemon(tmp_path, url, "--min-games", "1000")
    try:
        log = tmp_path / "daemon.log"
        await wait_until(lambda: log.exists() and "unavailable" in log.read_text(), 20)
        assert daemon.poll() is None  # retrying, not crashed
        stop(plain)
        with EmbeddedServer(tmp_path / "nats", port=port):
            nc = await nats.connect(url)
            await ensure_streams(nc.jetstream())
            await publish_selfplay(nc, 5)
            await wait_for_status(url, lambda s: pending(s) == 5, timeout=40)
            await nc.close()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(20) == 0
    finally:
        stop(plain)
        stop(daemon)


async def test_a_second_daemon_on_the_same_state_database_is_refused(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    first = start_daemon(tmp_path, nats_server.url)
    try:
        await wait_for_status(nats_server.url, lambda s: True)
        second = autoexport(
            "run", "--nats-url", nats_server.url, "--data-dir", str(tmp_path / "data")
        )
        assert second.returncode == 1
        assert "in use by another autoexport daemon" in second.stderr
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0


def start_embedded_daemon(tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AUTOEXPORT_EMBEDDED_NATS_PORT": "0"}
    argv = [sys.executable, "-m", "consumer.cli", "run", "--data-dir", str(tmp_path / "data")]
    with (tmp_path / "daemon.log").open("ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_a_sigkilled_daemon_takes_its_embedded_server_along_and_restarts(
    tmp_path: Path,
) -> None:
    log = tmp_path / "daemon.log"
    ports = tmp_path / "data" / "nats" / "ports"
    daemon = start_embedded_daemon(tmp_path)
    try:
        await wait_until(lambda: log.exists() and "consuming SELFPLAY_EVENTS" in log.read_text())
        (ports_file,) = ports.glob("*.ports")
        server_pid = int(ports_file.stem.rsplit("_", 1)[1])
        assert alive(server_pid)

        # A second daemon on the same data directory is refused before it starts a server.
        second = autoexport(
            "run",
            "--data-dir",
            str(tmp_path / "data"),
            env={**os.environ, "AUTOEXPORT_EMBEDDED_NATS_PORT": "0"},
        )
        assert second.returncode == 1
        assert "another autoexport daemon" in second.stderr
        assert len(list(ports.glob("*.ports"))) == 1

        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        await wait_until(lambda: not alive(server_pid))
    finally:
        stop(daemon)

    restarted = start_embedded_daemon(tmp_path)
    try:
        await wait_until(lambda: log.read_text().count("consuming SELFPLAY_EVENTS") == 2)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(20) == 0


async def test_sigterm_ends_a_daemon_that_cannot_reach_nats(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "nats://127.0.0.1:1")
    try:
        log = tmp_path / "daemon.log"
        await wait_until(lambda: log.exists() and "ConnectionRefusedError" in log.read_text(), 20)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
    finally:
        stop(daemon)


async def test_a_second_daemon_on_the_same_durable_is_refused_not_splitting_events(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    (tmp_path / "a").mkdir()
    first = start_daemon(tmp_path / "a", nats_server.url)
    try:
        await wait_for_status(nats_server.url, lambda s: True)
        same_durable = autoexport(
            "run", "--nats-url", nats_server.url, "--data-dir", str(tmp_path / "b")
        )
        assert same_durable.returncode == 1
        assert "already consumes durable 'autoexport'" in same_durable.stderr
        # Its own durable makes it an independent deployment: it may run, and operator
        # requests name the daemon they are for.
        other = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run", "--nats-url", nats_server.url,
             "--data-dir", str(tmp_path / "c")],
            env={**os.environ, "AUTOEXPORT_DURABLE_NAME": "staging"},
        )  # fmt: skip
        try:
            staging = await wait_for_status(
                nats_server.url, lambda s: True, subject=control_subject("status", "staging")
            )
            default = await wait_for_status(nats_server.url, lambda s: True)
            assert staging["daemon"]["data_dir"] == str(tmp_path / "c")
            assert default["daemon"]["data_dir"] == str(tmp_path / "a" / "data")
        finally:
            other.send_signal(signal.SIGTERM)
            assert other.wait(20) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
