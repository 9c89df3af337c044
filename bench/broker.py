"""The NATS side of a benchmark: its own nats-server, inbound events published in bulk,
a consumer's progress read from the server, and daemon settings for a run.

Timing comes from the server's view of a consumer (delivered and acknowledged sequences),
so the daemon and its baseline are measured the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from consumer.embedded import EmbeddedServer
from consumer.streams import ensure_streams
from schemas import subjects
from schemas.settings import Settings, load_settings

QUICK_JOB = Path(__file__).with_name("quick_job.py")
POLL_S = 0.01


class Event(msgspec.Struct, frozen=True):
    subject: str
    payload: bytes
    msg_id: str


def selfplay_event(
    config: str, *, games: int = 1, batch_id: str | None = None, node: str = "node-1"
) -> Event:
    """A valid ``selfplay.complete`` event with a fresh event id (and batch id, if none)."""
    board_type, num_players = subjects.parse_config_key(config)
    event_id = str(uuid.uuid4())
    body = {
        "event_id": event_id,
        "board_type": board_type,
        "num_players": num_players,
        "games": games,
        "node_id": node,
        "batch_id": batch_id or event_id,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    return Event(
        subjects.subject_for(subjects.SELFPLAY_COMPLETE, config),
        msgspec.json.encode(body),
        event_id,
    )


def config_keys(count: int) -> list[str]:
    """``count`` distinct valid config keys (16 player counts per board type)."""
    return [f"b{i // 16}_{i % 16 + 1}p" for i in range(count)]


@contextlib.contextmanager
def nats_server(workdir: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(workdir / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url, name="bench")
    try:
        yield nc
    finally:
        await nc.close()


async def publish_all(nc: Client, events: Sequence[Event], chunk: int = 2000) -> int:
    """Publish ``events`` into the inbound stream as fast as the server takes them; returns
    the stream's last sequence once every event is stored."""
    js = nc.jetstream()
    await ensure_streams(js)
    before = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
    for start in range(0, len(events), chunk):
        # Core publishes (the stream still honours Nats-Msg-Id), flushed per chunk so the
        # server's inbound buffer never overflows.
        for e in events[start : start + chunk]:
            await nc.publish(e.subject, e.payload, headers={"Nats-Msg-Id": e.msg_id})
        await nc.flush()
    want = before + len(events)
    deadline = time.monotonic() + 60
    while True:
        state = (await js.stream_info(subjects.EVENTS_STREAM)).state
        if state.messages >= want:
            return state.last_seq
        if time.monotonic() > deadline:
            raise RuntimeError(f"stream holds {state.messages} of {want} events")
        await asyncio.sleep(0.02)


class Drain(msgspec.Struct, frozen=True):
    """When a consumer first received a message and when every message was acknowledged,
    as seen by the server (polled every ``POLL_S``)."""

    started: float
    finished: float

    @property
    def seconds(self) -> float:
        return self.finished - self.started


async def watch_drain(js: JetStreamContext, durable: str, last_seq: int) -> Drain:
    """Wait until ``durable`` has acknowledged everything up to ``last_seq``."""
    started: float | None = None
    while True:
        now = time.perf_counter()
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
            delivered = info.delivered.stream_seq if info.delivered else 0
            if started is None and delivered and delivered > 0:
                started = now
            acked = info.ack_floor.stream_seq if info.ack_floor else 0
            if started is not None and acked is not None and acked >= last_seq:
                return Drain(started, now)
        await asyncio.sleep(POLL_S)


def daemon_settings(workdir: Path, url: str, job_s: float = 0.0, **flags: Any) -> Settings:
    """Daemon settings for a benchmark: the quick job (taking ``job_s``), no cooldown,
    state under ``workdir``; ``flags`` override."""
    template = workdir / "template.npz"
    if not template.exists():
        write_template_npz(template)
    job = [sys.executable, "-S", str(QUICK_JOB), "{output_path}", str(template), str(job_s)]
    values: dict[str, Any] = {
        "nats_url": url,
        "data_dir": str(workdir / "data"),
        "export_cooldown_seconds": 0,
        "export_command": job,
        **flags,
    }
    return load_settings({}, flags=values, cwd=workdir)


def write_template_npz(path: Path) -> None:
    """The file the quick job copies to its output (a valid, tiny dataset)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, values=np.zeros(7, dtype=np.float32))


class _Errors(logging.Handler):
    """Keeps the daemon's last ERROR lines, to explain a failed run."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines = [*self.lines[-4:], self.format(record)]


ERRORS = _Errors()


@contextlib.contextmanager
def daemon_log(path: Path) -> Iterator[None]:
    """Log like ``autoexport run`` (INFO, one line per decision) into a file."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler, ERRORS]
    root.setLevel(logging.INFO)
    logging.getLogger("nats").setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        handler.close()


def state_counts(state_db: str) -> dict[str, int]:
    """Games counted per config in a daemon's state file (read after the daemon stopped)."""
    import sqlite3

    conn = sqlite3.connect(state_db)
    try:
        return dict(conn.execute("SELECT config_key, total_games FROM export_state"))
    finally:
        conn.close()
