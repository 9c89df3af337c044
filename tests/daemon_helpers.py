"""Helpers for end-to-end daemon tests: settings, an in-process daemon, event collectors."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from consumer.daemon import run_daemon
from consumer.operator import request
from consumer.streams import ensure_streams
from schemas import subjects
from schemas.events import SelfplayCompleted, encoder, export_event_decoder
from schemas.settings import Settings, load_settings

FAKE_JOB = Path(__file__).parent / "jobs" / "fake_export.py"


def daemon_settings(tmp_path: Path, url: str, mode: str = "ok", **flags: Any) -> Settings:
    defaults: dict[str, Any] = {
        "nats_url": url,
        "data_dir": str(tmp_path / "data"),
        "min_games_threshold": 100,
        "export_cooldown_seconds": 0,
        "export_command": [sys.executable, str(FAKE_JOB), mode, "{output_path}", "{games_dir}"],
    }
    return load_settings({}, flags={**defaults, **flags}, cwd=tmp_path)


@contextlib.asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[asyncio.Task[int]]:
    """The daemon in this event loop; its streams exist and it answers requests on entry."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_daemon(settings, stop))
    try:
        assert settings.nats_url is not None
        await wait_for_status(settings.nats_url, lambda s: True)
        nc = await nats.connect(settings.nats_url)
        await ensure_streams(nc.jetstream())
        await nc.close()
        yield task
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0


def selfplay_payload(games: int, board: str = "hex8", players: int = 2, **extra: Any) -> bytes:
    event = {
        "event_id": str(uuid.uuid4()),
        "board_type": board,
        "num_players": players,
        "games": games,
        "node_id": "node-1",
        "timestamp": datetime.now(UTC).isoformat(),
        **extra,
    }
    return msgspec.json.encode(event)


async def publish_selfplay(nc: Client, games: int, board: str = "hex8", **extra: Any) -> str:
    payload = selfplay_payload(games, board, **extra)
    event = msgspec.json.decode(payload, type=SelfplayCompleted)
    subject = subjects.subject_for(subjects.SELFPLAY_COMPLETE, event.config)
    js = nc.jetstream()
    await js.publish(subject, encoder.encode(event), headers={"Nats-Msg-Id": event.event_id})
    return event.event_id


class Collector:
    """Collects messages of one subject filter from a core subscription, in order."""

    def __init__(self, decode: Callable[[bytes], Any]) -> None:
        self._decode = decode
        self.queue: asyncio.Queue[tuple[Msg, Any]] = asyncio.Queue()

    async def handler(self, msg: Msg) -> None:
        await self.queue.put((msg, self._decode(msg.data)))

    async def next(self, timeout: float = 15.0) -> Any:
        _, value = await asyncio.wait_for(self.queue.get(), timeout)
        return value

    async def next_msg(self, timeout: float = 15.0) -> tuple[Msg, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def collect_exports(nc: Client, config: str = "*") -> Collector:
    collector = Collector(export_event_decoder.decode)
    await nc.subscribe(f"npz.export.*.{config}", cb=collector.handler)
    await nc.flush()
    return collector


async def collect_dead_letters(nc: Client) -> Collector:
    collector = Collector(msgspec.json.decode)
    await nc.subscribe(f"{subjects.DEAD_LETTER}.>", cb=collector.handler)
    await nc.flush()
    return collector


async def status(url: str, subject: str = subjects.STATUS_SUBJECT) -> dict[str, Any]:
    return await request(url, subject)


async def wait_for_status(
    url: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 15.0,
    subject: str = subjects.STATUS_SUBJECT,
) -> dict[str, Any]:
    """Ask the daemon until its status satisfies ``predicate`` (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    current: dict[str, Any] | None = None
    while True:
        with contextlib.suppress(Exception):
            current = await status(url, subject)
            if predicate(current):
                return current
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"status never matched; last: {current!r}")
        await asyncio.sleep(0.05)


def pending(st: dict[str, Any], config: str = "hex8_2p") -> int | None:
    state = st["states"].get(config)
    return None if state is None else state["games_pending"]
