"""Dedupe state growth: a state file holding a million counted batch ids, the daemon's
ingest rate on top of it against an empty state, the file's size (per table and index),
and what the daemon's retirement of old ids (``Store.retire``) costs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import time
import uuid
from pathlib import Path

import msgspec

from bench.broker import (
    client,
    config_keys,
    daemon_log,
    daemon_settings,
    nats_server,
    publish_all,
    selfplay_event,
    state_counts,
)
from bench.ingest import measure_daemon
from bench.report import Figure, Target, figure
from consumer.decide import Counted
from consumer.store import Store
from consumer.streams import DAY_S, DUPLICATE_WINDOW_S, STREAMS
from schemas import subjects
from schemas.settings import Settings

CONFIGS = 100
CHUNK = 1_000  # batches per record_messages call: the daemon's default fetch
BULK = 100_000
RATE_CHUNKS = 10
RETIRE_FRACTION = 0.1
RETIRE_CHUNK = 5000  # Store.retire's default


class Size(msgspec.Struct, frozen=True):
    ids: int
    messages: int  # ingested on top, per run
    reps: int


SIZES = {
    "small": Size(100_000, 5_000, 1),
    "default": Size(1_000_000, 20_000, 2),
    "large": Size(4_000_000, 50_000, 3),
}


def _counted(config: str, batch_id: str) -> Counted:
    board_type, num_players = subjects.parse_config_key(config)
    return Counted(
        config=config,
        board_type=board_type,
        num_players=num_players,
        event_id=batch_id,
        source="node-1",
        batches=((batch_id, 1),),
    )


def bulk_fill(path: Path, ids: int, span_s: float) -> None:
    """Add ``ids`` counted batches straight into the batches table (in random key order,
    as the daemon would) with timestamps spread over the last ``span_s``."""
    keys = config_keys(CONFIGS)
    t0 = time.time() - span_s
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size=-262144")  # filling only; the daemon's is its own
        for start in range(0, ids, BULK):
            n = min(BULK, ids - start)
            rows = []
            for i in range(start, start + n):
                bid, at = str(uuid.uuid4()), t0 + span_s * i / ids
                rows.append((keys[i % CONFIGS], bid, 1, bid, "node-1", at))
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO batches VALUES (?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
    finally:
        conn.close()


async def record_rate(path: Path, chunks: int) -> float:
    """Batches per second through ``Store.record_messages`` (the daemon's transaction),
    ``CHUNK`` new batches at a time."""
    keys = config_keys(CONFIGS)
    rates = []
    async with await Store.open(path) as store:
        for _ in range(chunks):
            counted = [_counted(keys[i % CONFIGS], str(uuid.uuid4())) for i in range(CHUNK)]
            began = time.perf_counter()
            await store.record_messages(counted, [], [], time.time())
            rates.append(CHUNK / (time.perf_counter() - began))
    return statistics.median(rates)


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def checkpoint(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def sizes_by_btree(path: Path) -> dict[str, int]:
    """Bytes per table and index (SQLite's dbstat), or {} where it is not compiled in."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


async def retire(path: Path, before: float) -> tuple[float, int]:
    """The daemon's retirement (``Store.retire``, short transactions) on ``path``:
    (seconds, batch ids removed)."""
    async with await Store.open(path) as store:
        began = time.perf_counter()
        batches, _ = await store.retire(before)
        return time.perf_counter() - began, batches


async def ingest_rates(workdir: Path, filled: Path, size: Size) -> tuple[list[float], list[float]]:
    """Daemon msg/s with an empty state and with ``filled``, alternating, same stream."""
    keys = config_keys(CONFIGS)
    events = [selfplay_event(keys[i % CONFIGS]) for i in range(size.messages)]
    empty_rates, full_rates = [], []
    prior = sum(state_counts(str(filled)).values())
    with nats_server(workdir) as server, daemon_log(workdir / "daemon.log"):
        async with client(server.url) as nc:
            last_seq = await publish_all(nc, events)
        for rep in range(size.reps):
            order = ("empty", "full") if rep % 2 == 0 else ("full", "empty")
            for which in order:
                state = workdir / f"{which}{rep}.db"
                if which == "full":
                    shutil.copyfile(filled, state)
                settings: Settings = daemon_settings(
                    workdir,
                    server.url,
                    durable_name=f"{which}{rep}",
                    state_db=str(state),
                    min_games_threshold=10**9,
                )
                drain = await measure_daemon(server.url, settings, last_seq)
                counted = sum(state_counts(str(state)).values())
                expected = size.messages + (prior if which == "full" else 0)
                if counted != expected:
                    raise AssertionError(f"{which}: counted {counted}, not {expected}")
                (full_rates if which == "full" else empty_rates).append(
                    size.messages / drain.seconds
                )
                os.unlink(state)
    return empty_rates, full_rates


async def run(size_name: str, workdir: Path) -> list[Figure]:
    size = SIZES[size_name]
    events_max_age = next(s.max_age for s in STREAMS if s.name == subjects.EVENTS_STREAM)
    assert events_max_age is not None
    filled, empty = workdir / "filled.db", workdir / "empty.db"
    for path in (filled, empty):
        await (await Store.open(path)).close()
    bulk_fill(filled, size.ids, events_max_age)
    empty_record = await record_rate(empty, RATE_CHUNKS)
    full_record = await record_rate(filled, RATE_CHUNKS)
    checkpoint(filled)
    state_bytes = file_size(filled)
    empty_rates, full_rates = await ingest_rates(workdir / "nats", filled, size)

    copy = workdir / "retire.db"
    shutil.copyfile(filled, copy)
    retire_s, retired = await retire(copy, time.time() - events_max_age * (1 - RETIRE_FRACTION))
    copy.unlink()
    btrees = sizes_by_btree(filled)

    per_id = state_bytes / size.ids
    retention_s = Settings().retention_days * DAY_S
    transactions = max(1, -(-retired // RETIRE_CHUNK))
    by_age = btrees.get("batches_by_age", 0)
    return [
        figure(
            "dedupe",
            f"daemon msg/s on {size.ids:,} ids",
            statistics.median(full_rates),
            "msg/s",
            baseline=statistics.median(empty_rates),
            baseline_label="empty state",
            target=Target(">=", 0.8),
            note="target proposed here (the issue sets none): growth must not slow ingest",
        ),
        figure(
            "dedupe",
            f"Store.record_messages batches/s on {size.ids:,} ids",
            full_record,
            "batch/s",
            baseline=empty_record,
            baseline_label="empty state",
            note=f"the daemon's persist+dedupe transaction alone, {CHUNK:,} new batches each",
        ),
        figure(
            "dedupe",
            f"state file at {size.ids:,} ids",
            state_bytes / 2**20,
            "MiB",
            note=(
                f"{per_id:.0f} B per id, of which the counted_at index (batches_by_age) "
                f"{by_age / size.ids:.0f} B; ids are kept retention_days="
                f"{retention_s / DAY_S:g} d (they must outlive the stream's max_age of "
                f"{events_max_age / DAY_S:g} d and its {DUPLICATE_WINDOW_S / 3600:g} h duplicate"
                f" window): at 10 batches/s that is {10 * retention_s / 1e6:.0f}M ids, "
                f"{10 * retention_s * per_id / 2**30:.1f} GiB"
            ),
        ),
        figure(
            "dedupe",
            f"Store.retire of the oldest {RETIRE_FRACTION:.0%} ({retired:,} ids)",
            retire_s,
            "s",
            note=(
                f"{transactions} transactions of up to {RETIRE_CHUNK:,} ids, "
                f"{retire_s / transactions * 1000:.0f} ms each: the longest ingest waits "
                "for the store lock; the file does not shrink (pages are reused)"
            ),
        ),
    ]
