"""consumer.store against real SQLite files: idempotent counting, outbox, export lifecycle."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from consumer.decide import ConfigState, Counted, Reject
from consumer.store import (
    SCHEMA_VERSION,
    Outgoing,
    RejectedMessage,
    Resumed,
    Store,
    StoreError,
)

T0 = 1_700_000_000.0


def counted(
    batches: list[tuple[str, int]],
    config: str = "hex8_2p",
    event_id: str = "ev-1",
    source: str = "node-a",
) -> Counted:
    board, players = config.rsplit("_", 1)
    return Counted(
        config=config,
        board_type=board,
        num_players=int(players.rstrip("p")),
        event_id=event_id,
        source=source,
        batches=tuple(batches),
    )


def rejected(stream_seq: int, reason: str = "malformed_json") -> RejectedMessage:
    return RejectedMessage(
        subject="selfplay.complete.hex8_2p",
        stream_seq=stream_seq,
        reject=Reject(reason=reason, detail="bad"),
        payload=b"{oops",
    )


def outgoing(subject: str, payload: Any = b"{}", headers: Any = None) -> Outgoing:
    return Outgoing(subject, payload, {"Nats-Msg-Id": subject} if headers is None else headers)


async def states(store: Store) -> dict[str, ConfigState]:
    return {s.config: s for s in await store.config_states()}


async def pending(store: Store, config: str = "hex8_2p") -> int:
    return (await states(store))[config].games_pending


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "export_daemon_state.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(db_path) as opened:
        yield opened


async def start_export(
    store: Store, export_id: str = "exp-1", config: str = "hex8_2p", now: float = T0
) -> int:
    taken = (await states(store))[config].games_pending
    await store.begin_export(
        export_id,
        config,
        taken,
        forced=False,
        traceparent=None,
        announce=outgoing(f"npz.export.started.{config}"),
        now=now,
    )
    return taken


# ---- counting ----------------------------------------------------------------------------


async def test_a_batch_counts_once_across_calls(store: Store) -> None:
    first = await store.record_messages([counted([("b1", 10)])], [], [], now=T0)
    again = await store.record_messages([counted([("b1", 10)])], [], [], now=T0 + 1)
    assert first == {"hex8_2p": 10}
    assert again == {}
    assert await pending(store) == 10


async def test_a_batch_counts_once_within_one_call(store: Store) -> None:
    added = await store.record_messages(
        [
            counted([("b1", 10)], event_id="ev-1"),
            counted([("b1", 99)], event_id="ev-1-redelivered"),
            counted([("b2", 5), ("b2", 5)], event_id="ev-2"),
        ],
        [],
        [],
        now=T0,
    )
    assert added == {"hex8_2p": 15}  # the first announcement of b1 wins
    assert await pending(store) == 15


async def test_a_sync_listing_counted_batches_adds_only_the_new_ones(store: Store) -> None:
    await store.record_messages([counted([("b1", 10), ("b2", 20)])], [], [], now=T0)
    sync = counted([("b1", 10), ("b2", 20), ("b3", 7)], event_id="sync-1", source="sync")
    assert await store.record_messages([sync], [], [], now=T0 + 1) == {"hex8_2p": 7}
    assert await pending(store) == 37


async def test_a_selfplay_event_after_a_sync_of_its_batch_adds_nothing(store: Store) -> None:
    await store.record_messages([counted([("b1", 10)], event_id="sync-1")], [], [], now=T0)
    added = await store.record_messages([counted([("b1", 10)], event_id="b1")], [], [], now=T0)
    assert added == {}
    assert await pending(store) == 10


async def test_the_same_batch_id_counts_separately_per_config(store: Store) -> None:
    added = await store.record_messages(
        [counted([("b1", 10)]), counted([("b1", 4)], config="go9_4p")], [], [], now=T0
    )
    assert added == {"hex8_2p": 10, "go9_4p": 4}
    assert await pending(store, "go9_4p") == 4


async def test_record_returns_games_added_per_config(store: Store) -> None:
    await store.record_messages([counted([("old", 3)])], [], [], now=T0)
    added = await store.record_messages(
        [
            counted([("old", 3), ("n1", 1), ("n2", 2)]),
            counted([("x", 50)], config="go9_4p"),
            counted([("y", 0)], config="chess_2p"),
        ],
        [],
        [],
        now=T0 + 1,
    )
    assert added == {"hex8_2p": 3, "go9_4p": 50, "chess_2p": 0}
    assert {c: s.games_pending for c, s in (await states(store)).items()} == {
        "hex8_2p": 6,
        "go9_4p": 50,
        "chess_2p": 0,
    }


async def test_an_empty_call_changes_nothing(store: Store) -> None:
    assert await store.record_messages([], [], [], now=T0) == {}
    assert await store.config_states() == []


# ---- rejections and dead letters ---------------------------------------------------------


async def test_a_rejection_is_recorded_once_per_subject_and_stream_seq(store: Store) -> None:
    await store.record_messages([], [rejected(7)], [], now=T0)
    await store.record_messages([], [rejected(7)], [], now=T0 + 1)  # redelivered
    await store.record_messages([], [rejected(7), rejected(7)], [], now=T0 + 2)
    status = await store.status(now=T0)
    assert status["rejected_messages"] == 1
    await store.record_messages([], [rejected(8, reason="invalid_event")], [], now=T0 + 3)
    status = await store.status(now=T0)
    assert status["rejected_messages"] == 2
    assert status["rejected_by_reason"] == {"malformed_json": 1, "invalid_event": 1}


async def test_dead_letters_are_enqueued_with_the_counts(store: Store) -> None:
    letter = outgoing("autoexport.deadletter.malformed_json", b'{"reason":"x"}', {"a": "b"})
    await store.record_messages([counted([("b1", 10)])], [rejected(1)], [letter], now=T0)
    rows = await store.outbox()
    assert [(r.subject, r.payload, r.headers) for r in rows] == [
        ("autoexport.deadletter.malformed_json", b'{"reason":"x"}', {"a": "b"})
    ]
    assert await pending(store) == 10
    await store.delete_outbox(rows[0].id)
    assert await store.outbox() == []


@pytest.mark.parametrize(
    "bad_letter",
    [
        pytest.param(outgoing("autoexport.deadletter.x", payload=object()), id="payload-not-bytes"),
        pytest.param(outgoing(None), id="null-subject-fails-inside-executemany"),  # type: ignore[arg-type]
        pytest.param(outgoing("d", headers={"h": object()}), id="headers-not-json"),
    ],
)
async def test_a_failure_inside_the_transaction_rolls_back_everything(
    store: Store, bad_letter: Outgoing
) -> None:
    await store.record_messages([counted([("b0", 10)])], [], [], now=T0)
    good_letter = outgoing("autoexport.deadletter.ok")
    with pytest.raises((sqlite3.Error, TypeError, ValueError)):
        await store.record_messages(
            [counted([("b1", 5)]), counted([("z", 9)], config="go9_4p")],
            [rejected(1)],
            [good_letter, bad_letter],
            now=T0 + 1,
        )
    assert {c: s.games_pending for c, s in (await states(store)).items()} == {"hex8_2p": 10}
    assert await store.outbox() == []
    assert (await store.status(now=T0))["rejected_messages"] == 0
    # Nothing was half-counted, and the store still works: b1 counts now.
    assert await store.record_messages([counted([("b1", 5)])], [rejected(1)], [], now=T0 + 2) == {
        "hex8_2p": 5
    }
    assert (await store.status(now=T0))["rejected_messages"] == 1


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(0, id="cancelled-before-it-starts"),
        pytest.param(1, id="cancelled-while-its-transaction-begins"),
    ],
)
async def test_a_cancelled_call_leaves_the_store_usable(store: Store, steps: int) -> None:
    # A task cancelled mid-call (shutdown, a timed-out control request) must neither commit
    # half of its work nor leave the shared connection inside an open transaction.
    task = asyncio.create_task(
        store.record_messages([counted([("b1", 10)])], [], [outgoing("d.1")], now=T0)
    )
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.record_messages([counted([("b2", 5)])], [], [], now=T0 + 1) == {"hex8_2p": 5}
    assert await pending(store) == 5
    assert await store.outbox() == []


# ---- the export lifecycle ----------------------------------------------------------------


async def test_begin_export_persists_the_intent_and_the_started_announcement(
    store: Store,
) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await store.request_export("hex8_2p", "hex8", 2, now=T0)
    await store.begin_export(
        "exp-1",
        "hex8_2p",
        120,
        forced=True,
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        announce=outgoing("npz.export.started.hex8_2p", b'{"event":"npz_export_started"}'),
        now=T0 + 1,
    )
    state = (await states(store))["hex8_2p"]
    assert state.running_export_id == "exp-1"
    assert state.force_requested is False  # the request is consumed
    assert state.games_pending == 120  # nothing is subtracted before success
    assert [(r.subject, r.payload) for r in await store.outbox()] == [
        ("npz.export.started.hex8_2p", b'{"event":"npz_export_started"}')
    ]
    assert (await store.status(now=T0))["states"]["hex8_2p"]["in_progress"] is True


async def test_begin_export_refuses_a_second_running_export_of_the_config(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await start_export(store, "exp-1")
    with pytest.raises(StoreError, match="hex8_2p"):
        await start_export(store, "exp-2")
    assert (await states(store))["hex8_2p"].running_export_id == "exp-1"
    assert len(await store.outbox()) == 1  # no announcement for the refused export


async def test_begin_export_refuses_an_unknown_config(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.begin_export(
            "exp-1", "nope_2p", 0, False, None, outgoing("npz.export.started.nope_2p"), T0
        )
    assert await store.outbox() == []


async def test_exports_of_different_configs_may_run_together(store: Store) -> None:
    await store.record_messages(
        [counted([("a", 100)]), counted([("b", 100)], config="go9_4p")], [], [], now=T0
    )
    await start_export(store, "exp-1", "hex8_2p")
    await start_export(store, "exp-2", "go9_4p")
    running = {c: s.running_export_id for c, s in (await states(store)).items()}
    assert running == {"hex8_2p": "exp-1", "go9_4p": "exp-2"}


async def test_success_subtracts_what_the_export_took_not_everything(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    taken = await start_export(store)
    assert taken == 120
    # Games keep arriving while the job runs.
    await store.record_messages([counted([("b2", 30)])], [], [], now=T0 + 5)
    await store.finish_export_success(
        "exp-1",
        output_path="/data/training/hex8_2p.npz",
        samples=5000,
        games_exported=120,
        sha256="ab12",
        announce=outgoing("npz.export.complete.hex8_2p"),
        now=T0 + 10,
    )
    state = (await states(store))["hex8_2p"]
    assert state.games_pending == 30
    assert state.running_export_id is None
    assert state.last_export_time == T0 + 10
    status = (await store.status(now=T0 + 70))["states"]["hex8_2p"]
    assert status["games_pending"] == 30
    assert status["last_export"] == 60
    assert status["total_samples"] == 5000
    assert status["in_progress"] is False
    assert status["last_output_path"] == "/data/training/hex8_2p.npz"
    assert status["last_export_games"] == 120
    assert status["total_games"] == 150
    assert [r.subject for r in await store.outbox()] == [
        "npz.export.started.hex8_2p",
        "npz.export.complete.hex8_2p",
    ]


async def test_success_resets_failures_and_backoff(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    for attempt in (1, 2):
        await start_export(store, f"exp-{attempt}")
        await store.finish_export_failure(
            f"exp-{attempt}",
            error="boom",
            exit_code=1,
            backoff_until=T0 + 1000,
            announce=outgoing("npz.export.failed.hex8_2p"),
            now=T0,
        )
    assert (await states(store))["hex8_2p"].consecutive_failures == 2
    await start_export(store, "exp-3")
    await store.finish_export_success(
        "exp-3",
        output_path="/out.npz",
        samples=1,
        games_exported=120,
        sha256="ab12",
        announce=outgoing("npz.export.complete.hex8_2p"),
        now=T0 + 2000,
    )
    state = (await states(store))["hex8_2p"]
    assert (state.consecutive_failures, state.backoff_until) == (0, 0)
    assert await store.consecutive_failures("hex8_2p") == 0
    status = (await store.status(now=T0 + 2000))["states"]["hex8_2p"]
    assert status["failures"] == 0
    assert status["backoff_until"] is None
    assert status["last_error"] is None


async def test_total_samples_accumulate_over_exports(store: Store) -> None:
    for n, samples in enumerate((100, 250), start=1):
        await store.record_messages([counted([(f"b{n}", 100)])], [], [], now=T0)
        await start_export(store, f"exp-{n}")
        await store.finish_export_success(
            f"exp-{n}",
            output_path="/out.npz",
            samples=samples,
            games_exported=100,
            sha256="ab12",
            announce=outgoing("c"),
            now=T0 + n,
        )
    assert (await store.status(now=T0))["states"]["hex8_2p"]["total_samples"] == 350


async def test_failure_keeps_pending_and_backs_off(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await start_export(store, "exp-1")
    await store.finish_export_failure(
        "exp-1",
        error="exit 3: disk full",
        exit_code=3,
        backoff_until=T0 + 30,
        announce=outgoing("npz.export.failed.hex8_2p"),
        now=T0 + 1,
    )
    state = (await states(store))["hex8_2p"]
    assert state.games_pending == 120
    assert state.consecutive_failures == 1
    assert state.backoff_until == T0 + 30
    assert state.running_export_id is None
    assert state.last_export_time == 0  # a failure is not an export

    await start_export(store, "exp-2")
    await store.finish_export_failure(
        "exp-2",
        error="timed out",
        exit_code=None,
        backoff_until=T0 + 90,
        announce=outgoing("npz.export.failed.hex8_2p"),
        now=T0 + 31,
    )
    assert await store.consecutive_failures("hex8_2p") == 2
    status = (await store.status(now=T0 + 31))["states"]["hex8_2p"]
    assert status["failures"] == 2
    assert status["backoff_until"] == "2023-11-14T22:14:50+00:00"  # T0 + 90, as ISO-8601
    assert status["last_error"] == "timed out"
    assert status["games_pending"] == 120
    assert status["in_progress"] is False
    assert [r.subject for r in await store.outbox()].count("npz.export.failed.hex8_2p") == 2


async def test_an_export_finishes_only_once(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await start_export(store)
    await store.finish_export_success(
        "exp-1", output_path="/o.npz", samples=1, games_exported=120, sha256="ab12",
        announce=outgoing("c"), now=T0,
    )  # fmt: skip
    with pytest.raises(StoreError):
        await store.finish_export_success(
            "exp-1", output_path="/o.npz", samples=1, games_exported=120, sha256="ab12",
            announce=outgoing("c"), now=T0,
        )  # fmt: skip
    with pytest.raises(StoreError):
        await store.finish_export_failure(
            "exp-1", error="x", exit_code=1, backoff_until=T0, announce=outgoing("f"), now=T0
        )
    with pytest.raises(StoreError):
        await store.finish_export_failure(
            "unknown", error="x", exit_code=1, backoff_until=T0, announce=outgoing("f"), now=T0
        )
    assert await pending(store) == 0
    assert len(await store.outbox()) == 2  # started + one complete


async def test_resume_export_increments_attempts(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await start_export(store, "exp-1")
    assert (await store.resume_export("exp-1", 120, now=T0 + 1)).attempt == 2
    assert (await store.resume_export("exp-1", 120, now=T0 + 2)).attempt == 3
    with pytest.raises(StoreError):
        await store.resume_export("never-started", 0, now=T0)


async def test_resume_export_hands_back_the_previous_job_once(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await start_export(store, "exp-1")

    def job(resumed: Resumed) -> tuple[int, int | None, str | None]:
        return resumed.attempt, resumed.job_pgid, resumed.job_identity

    assert job(await store.resume_export("exp-1", 120, now=T0 + 1)) == (2, None, None)
    await store.record_job("exp-1", 4242, "python export 4242")
    assert job(await store.resume_export("exp-1", 120, now=T0 + 2)) == (
        3,
        4242,
        "python export 4242",
    )
    assert job(await store.resume_export("exp-1", 120, now=T0 + 3)) == (4, None, None)


async def test_a_finished_export_cannot_be_resumed(store: Store) -> None:
    await store.record_messages([counted([("b1", 120)])], [], [], now=T0)
    await start_export(store, "exp-1")
    await store.finish_export_failure(
        "exp-1", error="x", exit_code=1, backoff_until=T0, announce=outgoing("f"), now=T0
    )
    with pytest.raises(StoreError):
        await store.resume_export("exp-1", 120, now=T0 + 1)


async def test_an_interrupted_export_is_found_after_a_restart(db_path: Path) -> None:
    async with await Store.open(db_path) as before_crash:
        await before_crash.record_messages([counted([("b1", 120)])], [], [], now=T0)
        await start_export(before_crash, "exp-1")
        await before_crash.record_messages([counted([("b2", 30)])], [], [], now=T0 + 1)

    async with await Store.open(db_path) as after_restart:
        state = (await states(after_restart))["hex8_2p"]
        assert state.running_export_id == "exp-1"
        assert state.games_pending == 150
        assert (await after_restart.status(now=T0))["states"]["hex8_2p"]["in_progress"] is True
        resumed = await after_restart.resume_export("exp-1", state.games_pending, T0 + 2)
        assert resumed.attempt == 2
        await after_restart.record_messages([counted([("b3", 5)])], [], [], now=T0 + 3)
        await after_restart.finish_export_success(
            "exp-1",
            output_path="/o.npz",
            samples=10,
            games_exported=150,
            sha256="ab12",
            announce=outgoing("c"),
            now=T0 + 4,
        )
        # The resumed attempt took the 150 pending at resume; b3 arrived after it.
        assert await pending(after_restart) == 5


async def test_counts_and_outbox_survive_a_restart(db_path: Path) -> None:
    async with await Store.open(db_path) as first:
        await first.record_messages(
            [counted([("b1", 10)])], [rejected(1)], [outgoing("d.x")], now=T0
        )
    async with await Store.open(db_path) as second:
        assert await pending(second) == 10
        assert [r.subject for r in await second.outbox()] == ["d.x"]
        assert await second.record_messages([counted([("b1", 10)])], [], [], now=T0) == {}
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# ---- operator requests -------------------------------------------------------------------


async def test_request_export_of_an_unseen_config_creates_it(store: Store) -> None:
    await store.request_export("go9_4p", "go9", 4, now=T0)
    state = (await states(store))["go9_4p"]
    assert state.force_requested is True
    assert state.games_pending == 0
    assert (await store.status(now=T0))["states"]["go9_4p"]["export_requested"] is True


async def test_request_export_keeps_the_counts_of_a_known_config(store: Store) -> None:
    await store.record_messages([counted([("b1", 42)])], [], [], now=T0)
    await store.request_export("hex8_2p", "hex8", 2, now=T0 + 1)
    await store.request_export("hex8_2p", "hex8", 2, now=T0 + 2)
    state = (await states(store))["hex8_2p"]
    assert (state.force_requested, state.games_pending) == (True, 42)


async def test_set_paused(store: Store) -> None:
    assert await store.set_paused("hex8_2p", True, now=T0) is False  # unknown config
    await store.record_messages([counted([("b1", 1)])], [], [], now=T0)
    assert await store.set_paused("hex8_2p", True, now=T0) is True
    assert (await states(store))["hex8_2p"].paused is True
    assert (await store.status(now=T0))["states"]["hex8_2p"]["paused"] is True
    assert await store.set_paused("hex8_2p", False, now=T0) is True
    assert (await states(store))["hex8_2p"].paused is False


# ---- status ------------------------------------------------------------------------------


async def test_status_shape(store: Store) -> None:
    empty = await store.status(now=T0)
    assert empty["configs_tracked"] == 0
    assert empty["states"] == {}
    assert empty["rejected_messages"] == 0
    assert empty["unpublished_events"] == 0

    await store.record_messages(
        [counted([("b1", 12)]), counted([("b2", 3)], config="go9_4p")],
        [rejected(1)],
        [outgoing("d.1")],
        now=T0,
    )
    status = await store.status(now=T0)
    assert status["configs_tracked"] == 2
    assert list(status["states"]) == ["go9_4p", "hex8_2p"]
    assert status["states"]["hex8_2p"] == {
        "games_pending": 12,
        "last_export": None,
        "total_samples": 0,
        "in_progress": False,
        "failures": 0,
        "paused": False,
        "backoff_until": None,
        "last_error": None,
        "last_output_path": None,
        "total_games": 12,
        "last_export_games": 0,
        "export_requested": False,
    }
    assert status["rejected_messages"] == 1
    assert status["unpublished_events"] == 1


# ---- opening ---------------------------------------------------------------------------


@pytest.fixture
async def connections(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[Any]]:
    """Every aiosqlite connection opened during the test; any left open is closed afterwards
    (a leaked one keeps a worker thread alive and hangs the interpreter at exit)."""
    opened: list[Any] = []
    real_connect = aiosqlite.connect

    def recording_connect(*args: Any, **kwargs: Any) -> Any:
        conn = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(aiosqlite, "connect", recording_connect)
    yield opened
    for conn in opened:
        await conn.close()


def still_open(connections: list[Any]) -> list[Any]:
    return [c for c in connections if c._connection is not None]


async def test_open_creates_the_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    async with await Store.open(path) as opened:
        assert await opened.config_states() == []
    assert path.exists()


def write_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={version}")
    conn.close()


async def test_open_refuses_an_unknown_schema_version(
    tmp_path: Path, connections: list[Any]
) -> None:
    path = tmp_path / "state.db"
    write_version(path, 99)
    with pytest.raises(StoreError, match=r"schema version 99") as info:
        await Store.open(path)
    assert str(path) in str(info.value)


async def test_open_closes_the_connection_of_a_refused_schema_version(
    tmp_path: Path, connections: list[Any]
) -> None:
    path = tmp_path / "state.db"
    write_version(path, 99)
    with pytest.raises(StoreError):
        await Store.open(path)
    assert len(connections) == 1
    assert still_open(connections) == [], "the refused database's connection was left open"


async def test_open_refuses_a_newer_schema_without_touching_it(
    tmp_path: Path, connections: list[Any]
) -> None:
    # A newer daemon's database whose tables differ from ours: the refusal must name the
    # version, not fail on a missing column, and must not add our tables to it.
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE exports (export_id TEXT PRIMARY KEY, cfg TEXT)")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1}"):
        await Store.open(path)
    assert still_open(connections) == []
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"exports"}


async def test_open_refuses_a_corrupt_file(tmp_path: Path, connections: list[Any]) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match=r"state\.db") as info:
        await Store.open(path)
    assert "unusable" in str(info.value) or "not a database" in str(info.value)
    assert still_open(connections) == []


# ---- concurrency -------------------------------------------------------------------------


async def test_concurrent_tasks_do_not_interleave_transactions(store: Store) -> None:
    configs = [f"b{i}_2p" for i in range(5)]

    async def ingest(i: int) -> dict[str, int]:
        # Every batch is announced by two tasks; each must count once.
        config = configs[(i // 2) % len(configs)]
        return await store.record_messages(
            [counted([(f"batch-{i // 2}", 1)], config=config)],
            [rejected(i // 2)],
            [outgoing(f"d.{i}")],
            now=T0 + i,
        )

    async def force(config: str) -> None:
        await store.request_export(config, config.split("_")[0], 2, now=T0)

    async def read() -> None:
        await store.config_states()
        await store.status(now=T0)

    results = await asyncio.gather(
        *(ingest(i) for i in range(100)),
        *(force(c) for c in configs),
        *(read() for _ in range(10)),
    )
    added = sum(sum(r.values()) for r in results[:100])
    assert added == 50
    all_states = await states(store)
    assert sum(s.games_pending for s in all_states.values()) == 50
    assert all(all_states[c].force_requested for c in configs)
    status = await store.status(now=T0)
    assert status["rejected_messages"] == 50
    assert status["unpublished_events"] == 100


async def test_retire_forgets_old_batch_ids_and_rejections_only(tmp_path: Path) -> None:
    from consumer.decide import Counted, Reject
    from consumer.store import RejectedMessage, Store

    def batch(batch_id: str) -> Counted:
        return Counted(config="hex8_2p", board_type="hex8", num_players=2, event_id=batch_id,
                       source="n", batches=((batch_id, 1),))  # fmt: skip

    async with await Store.open(tmp_path / "state.db") as store:
        reject = RejectedMessage("selfplay.complete.x", 1, Reject(reason="r", detail="d"), b"")
        await store.record_messages([batch("old")], [reject], [], now=1_000.0)
        await store.record_messages([batch("new")], [], [], now=5_000.0)
        assert await store.retire(before=2_000.0, chunk=1) == (1, 1)
        # The retired id counts again if announced again; the kept one still does not.
        added = await store.record_messages([batch("old"), batch("new")], [], [], now=6_000.0)
        assert added == {"hex8_2p": 1}
        status = await store.status(now=6_000.0)
        assert status["rejected_messages"] == 0
        assert status["states"]["hex8_2p"]["total_games"] == 3


async def test_a_read_only_open_never_writes_or_accepts_a_foreign_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="not an autoexport state database"):
        await Store.open_readonly(empty)
    assert empty.stat().st_size == 0
    with pytest.raises(StoreError):
        await Store.open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def aiosqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


@pytest.mark.parametrize("read_only", [False, True])
async def test_a_failed_open_says_why_and_leaves_no_worker_thread(
    tmp_path: Path, read_only: bool
) -> None:
    # A directory where the file should be: sqlite cannot open it. aiosqlite stops its
    # thread on a failed connect without waiting; a thread still running after the test's
    # event loop closed would fail on it (this was a flaky CI error).
    path = tmp_path / "state.db"
    path.mkdir()
    before = set(aiosqlite_threads())
    with pytest.raises(StoreError, match=r"cannot open state database .*state\.db"):
        await (Store.open_readonly(path) if read_only else Store.open(path, owner=True))
    assert set(aiosqlite_threads()) - before == set()


async def test_a_rejection_counts_once_per_message_even_where_a_stream_reused_its_seq(
    store: Store,
) -> None:
    first = rejected(7)
    after_recreate = RejectedMessage(first.subject, 7, first.reject, b"{another")
    await store.record_messages([], [first], [], now=T0)
    await store.record_messages([], [first, after_recreate], [], now=T0 + 1)  # a redelivery
    assert (await store.status(now=T0))["rejected_messages"] == 2


V1_REJECTED = """
CREATE TABLE rejected (
    subject TEXT NOT NULL, stream_seq INTEGER NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, payload BLOB NOT NULL, rejected_at REAL NOT NULL,
    PRIMARY KEY (subject, stream_seq)
);
CREATE INDEX rejected_by_age ON rejected (rejected_at);
INSERT INTO rejected VALUES ('selfplay.complete.hex8_2p', 3, 'malformed_json', 'bad', x'00', 1.0);
PRAGMA user_version=1;
"""


async def test_a_version_1_file_is_migrated_keeping_its_rejections(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_REJECTED)
    conn.close()
    async with await Store.open(path) as opened:
        await opened.record_messages([], [rejected(3)], [], now=T0)  # same seq, new identity
        assert (await opened.status(now=T0))["rejected_by_reason"] == {"malformed_json": 2}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    conn.close()
    assert "rejected_by_age" in indexes
