"""The daemon's durable state in SQLite (through aiosqlite): counts, batches, exports, outbox.

Every method is one transaction. Outbound events are written to the ``outbox`` table in the
same transaction as the state change they announce, so a crash can delay an announcement
but never lose it or announce something that did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import aiosqlite
import msgspec
from msgspec import Struct

from consumer.decide import ConfigState, Counted, Reject
from consumer.locks import try_lock
from schemas.events import utc_from_unix

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS export_state (
    config_key TEXT PRIMARY KEY,
    board_type TEXT NOT NULL,
    num_players INTEGER NOT NULL,
    games_since_last_export INTEGER NOT NULL DEFAULT 0,
    last_export_time REAL NOT NULL DEFAULT 0,
    last_export_games INTEGER NOT NULL DEFAULT 0,
    total_exported_samples INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0,
    total_games INTEGER NOT NULL DEFAULT 0,
    backoff_until REAL NOT NULL DEFAULT 0,
    paused INTEGER NOT NULL DEFAULT 0,
    force_requested INTEGER NOT NULL DEFAULT 0,
    running_export_id TEXT,
    last_error TEXT,
    last_output_path TEXT,
    last_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    config_key TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    games INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    counted_at REAL NOT NULL,
    PRIMARY KEY (config_key, batch_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    subject TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload BLOB NOT NULL,
    rejected_at REAL NOT NULL,
    digest TEXT NOT NULL,  -- of the payload: a re-created stream reuses sequence numbers
    PRIMARY KEY (subject, stream_seq, digest)
);
CREATE TABLE IF NOT EXISTS exports (
    export_id TEXT PRIMARY KEY,
    config_key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    games_pending INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    forced INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    finished_at REAL,
    output_path TEXT,
    samples INTEGER,
    games_exported INTEGER,
    error TEXT,
    exit_code INTEGER,
    traceparent TEXT,
    job_pgid INTEGER,
    job_identity TEXT
);
CREATE INDEX IF NOT EXISTS batches_by_age ON batches (counted_at);
CREATE INDEX IF NOT EXISTS rejected_by_age ON rejected (rejected_at);
CREATE INDEX IF NOT EXISTS exports_by_config ON exports (config_key, started_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    headers TEXT NOT NULL
);
CREATE TEMP TABLE IF NOT EXISTS incoming (
    config_key TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    board_type TEXT NOT NULL,
    num_players INTEGER NOT NULL,
    games INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (config_key, batch_id)
);
"""

# Version 1 keyed rejections by (subject, stream_seq) alone. One transaction: a crash
# midway leaves a version 1 file.
MIGRATE_FROM_1 = (
    "BEGIN; DROP INDEX IF EXISTS rejected_by_age; ALTER TABLE rejected RENAME TO rejected_v1;"
    + SCHEMA
    + "INSERT INTO rejected SELECT *, '' FROM rejected_v1; DROP TABLE rejected_v1;"
    " PRAGMA user_version=2; COMMIT;"
)


class Outgoing(Struct, frozen=True):
    """An event to publish once the transaction that decided it has committed."""

    subject: str
    payload: bytes
    headers: dict[str, str]


class OutboxRow(Struct, frozen=True):
    id: int
    subject: str
    payload: bytes
    headers: dict[str, str]


class RejectedMessage(Struct, frozen=True):
    subject: str
    stream_seq: int
    reject: Reject
    payload: bytes

    @property
    def digest(self) -> str:
        return payload_digest(self.payload)


def payload_digest(payload: bytes) -> str:
    """Tells apart two messages at one stream sequence (a deleted and re-created stream
    starts again at 1) while a redelivery of one message keeps its digest."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


class Resumed(Struct, frozen=True, kw_only=True):
    """A new attempt of an interrupted export, and what the previous attempt left."""

    attempt: int
    job_pgid: int | None
    job_identity: str | None
    traceparent: str | None  # of the first attempt's export span


class StoreError(RuntimeError):
    pass


async def _connect(database: str | Path, **kwargs: Any) -> aiosqlite.Connection:
    connection = aiosqlite.connect(database, isolation_level=None, **kwargs)
    try:
        return await connection
    except BaseException:
        # A failed connect makes aiosqlite stop its worker thread without waiting for it;
        # the thread then reports to this event loop, which may have closed by then (an
        # error in a thread). Wait until it has stopped.
        await asyncio.to_thread(connection._thread.join)
        raise


class Store:
    """One open state database. Create with ``await Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, owner_lock: IO[bytes] | None = None) -> None:
        self._db = db
        self._owner_lock = owner_lock
        # One connection serves every task: a lock keeps one task's statements out of
        # another's open transaction.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, *, owner: bool = False) -> Store:
        """Open (and create) the state database. ``owner``: this process is the daemon that
        writes it; a second daemon on the same file is refused instead of racing the first."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        owner_lock = _lock_owner(Path(path)) if owner else None
        try:
            db = await _connect(path)
        except BaseException as exc:
            if owner_lock is not None:
                owner_lock.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open state database {path}: {exc}") from None
            raise
        try:
            version = await _check_version(db, path)  # before touching another version
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
            await db.execute("PRAGMA busy_timeout=5000")
            # Checkpoint less often: each batch dirties pages all over the batch-id index,
            # and checkpointing after nearly every commit costs more than the commit.
            await db.execute("PRAGMA wal_autocheckpoint=10000")
            await db.executescript(MIGRATE_FROM_1 if version == 1 else SCHEMA)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.DatabaseError, StoreError) as exc:
            await db.close()
            if owner_lock is not None:
                owner_lock.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"state database {path} is unusable: {exc}") from exc
        return cls(db, owner_lock)

    @classmethod
    async def open_readonly(cls, path: str | Path) -> Store:
        """Open an existing state database to read it (a stopped daemon's): never creates,
        migrates or writes a file, and refuses one that is not an autoexport state file."""
        uri = f"file:{urllib.parse.quote(str(Path(path).absolute()))}?mode=ro"
        try:
            db = await _connect(uri, uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from None
        try:
            async with db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                raise StoreError(f"{path} is not an autoexport state database")
        except (sqlite3.DatabaseError, StoreError) as exc:
            await db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"state database {path} is unusable: {exc}") from None
        return cls(db)

    async def close(self) -> None:
        await self._db.close()
        if self._owner_lock is not None:
            self._owner_lock.close()  # releases the flock

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._lock:
            try:
                # Inside the try: a task cancelled while BEGIN waits has still queued it on
                # aiosqlite's thread, and the ROLLBACK queued behind it must undo it.
                await self._db.execute("BEGIN IMMEDIATE")
                yield
            except BaseException:
                await asyncio.shield(self._db.execute("ROLLBACK"))
                raise
            await self._db.execute("COMMIT")

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._lock, self._db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        async with self._transaction():
            cur = await self._db.execute(sql, params)
            return cur.rowcount

    # ---- ingest ------------------------------------------------------------------------

    async def record_messages(
        self,
        counted: Sequence[Counted],
        rejected: Sequence[RejectedMessage],
        dead_letters: Sequence[Outgoing],
        now: float,
    ) -> dict[str, int]:
        """Count new batches and record rejections in one transaction.

        Returns games added per config. Batches already counted (by either event type, in
        this or any earlier message) add nothing: that is what makes redelivery harmless.
        """
        rows = [
            (c.config, bid, c.board_type, c.num_players, games, c.event_id, c.source)
            for c in counted
            for bid, games in c.batches
        ]
        db = self._db
        async with self._transaction():
            await db.execute("DELETE FROM incoming")
            # One JSON parameter rather than executemany: sqlite3 releases the GIL for a
            # whole statement but binds executemany's rows one by one under it, which
            # stalled the event loop (and this thread) on every fetched batch.
            # OR IGNORE: the first announcement of a batch within one fetch wins.
            await db.execute(
                "INSERT OR IGNORE INTO incoming SELECT json_extract(value, '$[0]'),"
                " json_extract(value, '$[1]'), json_extract(value, '$[2]'),"
                " json_extract(value, '$[3]'), json_extract(value, '$[4]'),"
                " json_extract(value, '$[5]'), json_extract(value, '$[6]') FROM json_each(?)",
                (msgspec.json.encode(rows).decode(),),
            )
            await db.execute(
                "DELETE FROM incoming WHERE EXISTS (SELECT 1 FROM batches b"
                " WHERE b.config_key = incoming.config_key AND b.batch_id = incoming.batch_id)"
            )
            await db.execute(
                "INSERT INTO batches (config_key, batch_id, games, event_id, source, counted_at)"
                " SELECT config_key, batch_id, games, event_id, source, ? FROM incoming",
                (now,),
            )
            await db.execute(
                "INSERT INTO export_state (config_key, board_type, num_players,"
                " games_since_last_export, total_games, updated_at)"
                " SELECT config_key, board_type, num_players, SUM(games), SUM(games), ?"
                " FROM incoming GROUP BY config_key"
                " ON CONFLICT (config_key) DO UPDATE SET"
                " games_since_last_export = games_since_last_export"
                "   + excluded.games_since_last_export,"
                " total_games = total_games + excluded.total_games,"
                " updated_at = excluded.updated_at",
                (now,),
            )
            async with db.execute(
                "SELECT config_key, SUM(games) FROM incoming GROUP BY config_key"
            ) as cur:
                added = {key: int(games) for key, games in await cur.fetchall()}
            await db.executemany(
                "INSERT OR IGNORE INTO rejected VALUES (?,?,?,?,?,?,?)",
                [
                    (
                        r.subject,
                        r.stream_seq,
                        r.reject.reason,
                        r.reject.detail,
                        r.payload,
                        now,
                        r.digest,
                    )
                    for r in rejected
                ],
            )
            await self._enqueue(dead_letters)
        return added

    async def retire(self, before: float, chunk: int = 5000) -> tuple[int, int]:
        """Forget batch ids and rejected messages recorded before ``before``, in short
        transactions so ingest never waits long. Returns (batches, rejections) removed.

        A batch announced again after its id is retired counts again: keep ids longer than
        anything can redeliver or re-announce them (the stream keeps events for 7 days)."""
        removed = [0, 0]
        for i, sql in enumerate(
            (
                "DELETE FROM batches WHERE (config_key, batch_id) IN (SELECT config_key,"
                " batch_id FROM batches WHERE counted_at < ? LIMIT ?)",
                "DELETE FROM rejected WHERE rowid IN (SELECT rowid FROM rejected"
                " WHERE rejected_at < ? LIMIT ?)",
            )
        ):
            while (n := await self._write(sql, (before, chunk))) > 0:
                removed[i] += n
        return removed[0], removed[1]

    # ---- the gate's inputs ------------------------------------------------------------

    async def config_states(self, min_pending: int = 0) -> list[ConfigState]:
        """Every config's gate inputs; with ``min_pending``, only configs the gate could start
        or time (enough games, forced, or an export persisted): the others can only be
        waiting for games, so a planning pass over thousands of configs skips them."""
        rows = await self._fetchall(
            "SELECT config_key, games_since_last_export, last_export_time,"
            " consecutive_failures, backoff_until, paused, force_requested,"
            " running_export_id FROM export_state WHERE games_since_last_export >= ?"
            " OR force_requested = 1 OR running_export_id IS NOT NULL",
            (min_pending,),
        )
        return [
            ConfigState(
                config=row[0],
                games_pending=row[1],
                last_export_time=row[2],
                consecutive_failures=row[3],
                backoff_until=row[4],
                paused=bool(row[5]),
                force_requested=bool(row[6]),
                running_export_id=row[7],
            )
            for row in rows
        ]

    async def request_export(
        self, config: str, board_type: str, num_players: int, now: float
    ) -> None:
        """An operator's force: the next gate pass starts it, bypassing threshold and cooldown."""
        await self._write(
            "INSERT INTO export_state (config_key, board_type, num_players, force_requested,"
            " updated_at) VALUES (?,?,?,1,?) ON CONFLICT (config_key) DO UPDATE SET"
            " force_requested = 1, updated_at = excluded.updated_at",
            (config, board_type, num_players, now),
        )

    async def set_paused(self, config: str, paused: bool, now: float) -> bool:
        """Pause or resume one config; False if the config is unknown."""
        changed = await self._write(
            "UPDATE export_state SET paused = ?, updated_at = ? WHERE config_key = ?",
            (int(paused), now, config),
        )
        return changed > 0

    # ---- export lifecycle --------------------------------------------------------------

    async def begin_export(
        self,
        export_id: str,
        config: str,
        games_pending: int,
        forced: bool,
        traceparent: str | None,
        announce: Outgoing,
        now: float,
    ) -> None:
        """Persist the intent to export before the job starts."""
        db = self._db
        async with self._transaction():
            cur = await db.execute(
                "UPDATE export_state SET running_export_id = ?, force_requested = 0,"
                " updated_at = ? WHERE config_key = ? AND running_export_id IS NULL",
                (export_id, now, config),
            )
            if cur.rowcount != 1:
                raise StoreError(f"{config}: an export is already running or config unknown")
            await db.execute(
                "INSERT INTO exports (export_id, config_key, status, games_pending, forced,"
                " started_at, traceparent) VALUES (?,?,'running',?,?,?,?)",
                (export_id, config, games_pending, int(forced), now, traceparent),
            )
            await self._enqueue([announce])

    async def resume_export(self, export_id: str, games_pending: int, now: float) -> Resumed:
        """Another attempt of an interrupted export, with the games pending now."""
        async with self._transaction():
            async with self._db.execute(
                "SELECT attempts, job_pgid, job_identity, traceparent FROM exports"
                " WHERE export_id = ? AND status = 'running'",
                (export_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise StoreError(f"export {export_id} is not running")
            await self._db.execute(
                "UPDATE exports SET attempts = attempts + 1, games_pending = ?, started_at = ?,"
                " job_pgid = NULL, job_identity = NULL WHERE export_id = ?",
                (games_pending, now, export_id),
            )
        return Resumed(attempt=int(row[0]) + 1, job_pgid=row[1], job_identity=row[2],
                       traceparent=row[3])  # fmt: skip

    async def record_job(self, export_id: str, pgid: int, identity: str | None) -> None:
        """Remember the job's process group, so a restarted daemon can stop a leftover."""
        await self._write(
            "UPDATE exports SET job_pgid = ?, job_identity = ? WHERE export_id = ?",
            (pgid, identity, export_id),
        )

    async def _running_export(self, export_id: str) -> tuple[str, int]:
        """Config and games taken of a running export (inside a transaction)."""
        async with self._db.execute(
            "SELECT config_key, games_pending FROM exports"
            " WHERE export_id = ? AND status = 'running'",
            (export_id,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise StoreError(f"export {export_id} is not running")
        return row[0], row[1]

    async def finish_export_success(
        self,
        export_id: str,
        *,
        output_path: str,
        samples: int,
        games_exported: int,
        sha256: str,
        announce: Outgoing,
        now: float,
    ) -> None:
        """Subtract what the export took (not everything: games counted meanwhile stay)."""
        db = self._db
        async with self._transaction():
            config, taken = await self._running_export(export_id)
            await db.execute(
                "UPDATE exports SET status = 'succeeded', finished_at = ?, output_path = ?,"
                " samples = ?, games_exported = ? WHERE export_id = ?",
                (now, output_path, samples, games_exported, export_id),
            )
            await db.execute(
                "UPDATE export_state SET"
                " games_since_last_export = MAX(0, games_since_last_export - ?),"
                " last_export_time = ?, last_export_games = ?,"
                " total_exported_samples = total_exported_samples + ?,"
                " consecutive_failures = 0, backoff_until = 0, running_export_id = NULL,"
                " last_error = NULL, last_output_path = ?, last_sha256 = ?, updated_at = ?"
                " WHERE config_key = ?",
                (taken, now, games_exported, samples, output_path, sha256, now, config),
            )
            await self._enqueue([announce])

    async def finish_export_failure(
        self,
        export_id: str,
        *,
        error: str,
        exit_code: int | None,
        backoff_until: float,
        announce: Outgoing,
        now: float,
    ) -> None:
        """Nothing pending is lost; the config backs off until ``backoff_until``."""
        db = self._db
        async with self._transaction():
            config, _ = await self._running_export(export_id)
            await db.execute(
                "UPDATE exports SET status = 'failed', finished_at = ?, error = ?,"
                " exit_code = ? WHERE export_id = ?",
                (now, error, exit_code, export_id),
            )
            await db.execute(
                "UPDATE export_state SET consecutive_failures = consecutive_failures + 1,"
                " backoff_until = ?, running_export_id = NULL, last_error = ?, updated_at = ?"
                " WHERE config_key = ?",
                (backoff_until, error, now, config),
            )
            await self._enqueue([announce])

    async def last_sha256(self, config: str) -> str | None:
        """The checksum of the config's last exported dataset."""
        rows = await self._fetchall(
            "SELECT last_sha256 FROM export_state WHERE config_key = ?", (config,)
        )
        return rows[0][0] if rows else None

    async def consecutive_failures(self, config: str) -> int:
        rows = await self._fetchall(
            "SELECT consecutive_failures FROM export_state WHERE config_key = ?", (config,)
        )
        return int(rows[0][0]) if rows else 0

    # ---- outbox ------------------------------------------------------------------------

    async def _enqueue(self, items: Iterable[Outgoing]) -> None:
        await self._db.executemany(
            "INSERT INTO outbox (subject, payload, headers) VALUES (?,?,?)",
            [(o.subject, o.payload, json.dumps(o.headers)) for o in items],
        )

    async def outbox(self, limit: int = 100) -> list[OutboxRow]:
        rows = await self._fetchall(
            "SELECT id, subject, payload, headers FROM outbox ORDER BY id LIMIT ?", (limit,)
        )
        return [OutboxRow(r[0], r[1], bytes(r[2]), json.loads(r[3])) for r in rows]

    async def delete_outbox(self, row_id: int) -> None:
        await self._write("DELETE FROM outbox WHERE id = ?", (row_id,))

    # ---- status ------------------------------------------------------------------------

    async def status(self, now: float | None = None) -> dict[str, Any]:
        """The seed's status shape, plus what an operator needs to see why nothing moves."""
        now = time.time() if now is None else now
        states: dict[str, Any] = {}
        rows = await self._fetchall(
            "SELECT config_key, games_since_last_export, last_export_time,"
            " total_exported_samples, running_export_id, consecutive_failures, paused,"
            " backoff_until, last_error, last_output_path, total_games, last_export_games,"
            " force_requested FROM export_state ORDER BY config_key"
        )
        for r in rows:
            states[r[0]] = {
                "games_pending": r[1],
                "last_export": round(now - r[2], 3) if r[2] else None,
                "total_samples": r[3],
                "in_progress": r[4] is not None,
                "failures": r[5],
                "paused": bool(r[6]),
                "backoff_until": utc_from_unix(r[7]).isoformat() if r[7] else None,
                "last_error": r[8],
                "last_output_path": r[9],
                "total_games": r[10],
                "last_export_games": r[11],
                "export_requested": bool(r[12]),
            }
        rejected = dict(
            await self._fetchall("SELECT reason, COUNT(*) FROM rejected GROUP BY reason")
        )
        unpublished = await self._fetchall("SELECT COUNT(*) FROM outbox")
        return {
            "configs_tracked": len(states),
            "states": states,
            "rejected_messages": sum(rejected.values()),
            "rejected_by_reason": rejected,
            "unpublished_events": unpublished[0][0],
        }


def _lock_owner(path: Path) -> IO[bytes]:
    lock = try_lock(path.parent / f"{path.name}.lock")
    if lock is None:
        raise StoreError(
            f"state database {path} is in use by another autoexport daemon; "
            "give each daemon its own --data-dir or --state-db"
        )
    return lock


async def _check_version(db: aiosqlite.Connection, path: str | Path) -> int:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = row[0] if row else 0
    if version not in (0, 1, SCHEMA_VERSION):
        raise StoreError(
            f"state database {path} has schema version {version}; this daemon knows "
            f"{SCHEMA_VERSION}"
        )
    return int(version)
