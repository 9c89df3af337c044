"""``autoexport watch`` through a real server: readable and JSON lines, one config, durable
resume, new-only, junk in the stream, and the events a real daemon announces."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client

from consumer import trainer
from consumer.cli import main
from consumer.embedded import EmbeddedServer
from consumer.streams import ensure_streams
from schemas import subjects
from schemas.events import (
    ExportCompleted,
    ExportEvent,
    ExportFailed,
    ExportStarted,
    encoder,
    export_event_decoder,
)
from tests.daemon_helpers import daemon_settings, publish_selfplay, running_daemon

NOW = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)


def started(config: str = "hex8_2p") -> ExportStarted:
    board, players = subjects.parse_config_key(config)
    return ExportStarted(
        export_id=f"{config}-{uuid.uuid4().hex[:8]}", config=config, board_type=board,
        num_players=players, games_pending=120, timestamp=NOW,
    )  # fmt: skip


def completed(config: str = "hex8_2p") -> ExportCompleted:
    board, players = subjects.parse_config_key(config)
    return ExportCompleted(
        export_id=f"{config}-{uuid.uuid4().hex[:8]}", config=config, board_type=board,
        num_players=players, output_path=f"/srv/training/{config}.npz", samples=5432,
        games_exported=125, duration_seconds=12.5, size_bytes=3 * 2**20, sha256="9f2c" * 16,
        timestamp=NOW,
    )  # fmt: skip


def failed(config: str = "hex8_2p") -> ExportFailed:
    board, players = subjects.parse_config_key(config)
    return ExportFailed(
        export_id=f"{config}-{uuid.uuid4().hex[:8]}", config=config, board_type=board,
        num_players=players, error="Traceback...\nexporter: no usable games", exit_code=3,
        consecutive_failures=2, retry_at=NOW + timedelta(seconds=60), timestamp=NOW,
    )  # fmt: skip


STAGE = {
    ExportStarted: subjects.EXPORT_STARTED,
    ExportCompleted: subjects.EXPORT_COMPLETE,
    ExportFailed: subjects.EXPORT_FAILED,
}


async def announce(nc: Client, *events: ExportEvent) -> None:
    js = nc.jetstream()
    await ensure_streams(js)
    for event in events:
        await js.publish(
            subjects.subject_for(STAGE[type(event)], event.config), encoder.encode(event)
        )


async def watch(url: str, *flags: str) -> int:
    """``autoexport watch`` in a thread (it runs its own event loop), as a user would."""
    return await asyncio.to_thread(main, ["watch", "--nats-url", url, *flags])


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


async def test_prints_each_event_on_one_readable_line(
    nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [started(), completed(), failed()]
    await announce(nc, *events)

    assert await watch(nats_server.url, "--count", "3") == 0

    start, complete, fail = lines(capsys)
    assert start.startswith("2026-12-03T10:30:00+00:00  hex8_2p")
    assert "started   120 games pending" in start and events[0].export_id in start
    assert "complete  125 games, 5432 samples, 3.0 MiB in 12.5s" in complete
    assert "-> /srv/training/hex8_2p.npz (sha256 9f2c9f2c9f2c)" in complete
    assert "FAILED    exit 3, 2 in a row, retry at 2026-12-03T10:31:00+00:00" in fail
    assert fail.endswith(f": exporter: no usable games  [{events[2].export_id}]")


async def test_json_lines_decode_to_the_announced_events(
    nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [started(), completed(), failed()]
    await announce(nc, *events)

    assert await watch(nats_server.url, "--json", "--count", "3") == 0

    out = lines(capsys)
    assert [export_event_decoder.decode(line) for line in out] == events
    assert [json.loads(line)["event"] for line in out] == [
        "npz_export_started", "npz_export_complete", "npz_export_failed",
    ]  # fmt: skip


async def test_one_config_only(
    nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    hex8, go9 = completed("hex8_2p"), completed("go9_2p")
    await announce(nc, hex8, go9)

    assert await watch(nats_server.url, "--config", "go9_2p", "--json", "--count", "1") == 0

    assert [export_event_decoder.decode(line) for line in lines(capsys)] == [go9]


async def test_a_durable_watcher_resumes_after_the_last_event_it_printed(
    nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [completed(), completed(), completed()]
    await announce(nc, *events)

    seen = []
    for _ in events:
        assert await watch(nats_server.url, "--durable", "w1", "--json", "--count", "1") == 0
        seen += [export_event_decoder.decode(line) for line in lines(capsys)]
    assert seen == events


async def test_new_only_skips_what_is_already_in_the_stream(
    nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = completed(), completed()
    await announce(nc, old)
    js = nc.jetstream()
    before = len(await js.consumers_info(subjects.EXPORTS_STREAM))

    watcher = asyncio.create_task(watch(nats_server.url, "--new-only", "--json", "--count", "1"))
    deadline = asyncio.get_running_loop().time() + 15
    while len(await js.consumers_info(subjects.EXPORTS_STREAM)) == before:  # bounded polling
        assert asyncio.get_running_loop().time() < deadline, "watch never created its consumer"
        await asyncio.sleep(0.02)
    await announce(nc, new)

    assert await asyncio.wait_for(watcher, 20) == 0
    assert [export_event_decoder.decode(line) for line in lines(capsys)] == [new]


async def test_junk_under_npz_export_is_skipped_not_fatal(
    nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    good = completed()
    await ensure_streams(nc.jetstream())
    await nc.jetstream().publish("npz.export.complete.hex8_2p", b'{"event": "something else"}')
    deep = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # msgspec: RecursionError
    await nc.jetstream().publish("npz.export.complete.hex8_2p", deep)
    # A well-formed event on another config's (or stage's) subject is not that config's.
    elsewhere = encoder.encode(completed(config="go9_2p"))
    await nc.jetstream().publish("npz.export.complete.hex8_2p", elsewhere)
    await nc.jetstream().publish("npz.export.started.go9_2p", elsewhere)
    await announce(nc, good)

    assert await watch(nats_server.url, "--durable", "w2", "--json", "--count", "1") == 0

    assert [export_event_decoder.decode(line) for line in lines(capsys)] == [good]
    info = await nc.jetstream().consumer_info(subjects.EXPORTS_STREAM, "w2")
    assert info.num_pending == 0 and info.num_ack_pending == 0  # the junk is terminated


async def test_watches_what_a_real_daemon_announces(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url, min_games_threshold=10)
    async with running_daemon(settings):
        await publish_selfplay(nc, 10)
        assert await watch(nats_server.url, "--config", "hex8_2p", "--count", "2") == 0

    start, complete = lines(capsys)
    assert "hex8_2p      started   10 games pending" in start
    assert "hex8_2p      complete  3 games, 7 samples" in complete
    assert str(tmp_path / "data" / "training" / "hex8_2p.npz") in complete


async def test_bad_config_and_unreachable_server_exit_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await watch("nats://127.0.0.1:1", "--config", "hex*_2p") == 2
    assert "hex*_2p" in capsys.readouterr().err

    monkeypatch.setattr(trainer, "CONNECT_TIMEOUT_S", 0.5)
    assert await watch("nats://127.0.0.1:1", "--count", "1") == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in capsys.readouterr().err


def test_control_characters_in_an_event_cannot_forge_watch_output() -> None:
    event = completed()
    event.export_id = "e\x1b[31mRED\x1b[0m\nFAKE LINE"
    event.output_path = "/srv/x.npz\rOVERWRITE"
    line = trainer.describe_event(event)
    assert "\x1b" not in line and "\n" not in line and "\r" not in line
    assert "\\x1b[31mRED" in line and "\\nFAKE LINE" in line and "\\rOVERWRITE" in line
