"""The game store: one SQLite file per selfplay node (format in docs/GAME_STORE.md).

Owns the schema, the writer API used by selfplay nodes and the read-only access the
exporter needs; encoding games into training arrays is left to ``consumer.export.encode``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Self

import msgspec
import numpy as np
from msgspec import Meta, Struct

from schemas.subjects import BOARD_TYPE_PATTERN, MAX_PLAYERS

FORMAT_VERSION = 1
POLICY_SUM_TOLERANCE = 1e-3
MAX_GAME_ID_CHARS = 128
_GAME_ID_ALLOWED = frozenset(map(chr, range(0x21, 0x7F)))  # printable ASCII, no spaces

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS games (
    game_id     TEXT PRIMARY KEY,
    board_type  TEXT NOT NULL,
    num_players INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('in_progress', 'completed', 'abandoned')),
    winner      INTEGER,
    returns     TEXT,
    move_count  INTEGER NOT NULL,
    source      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS moves (
    game_id        TEXT NOT NULL REFERENCES games (game_id),
    move_number    INTEGER NOT NULL,
    player         INTEGER NOT NULL,
    action         INTEGER NOT NULL,
    state          BLOB NOT NULL,
    policy_actions BLOB NOT NULL,
    policy_probs   BLOB NOT NULL,
    PRIMARY KEY (game_id, move_number)
);
"""


class StoreError(Exception):
    """A game store cannot be used; ``reason`` is a short machine-readable word."""

    reason = "error"


class StoreLocked(StoreError):
    reason = "locked"


class StoreCorrupt(StoreError):
    reason = "corrupt"


class StoreUnreadable(StoreError):
    """Missing, or not readable by this process (permissions, a read-only directory)."""

    reason = "unreadable"


class UnsupportedFormat(StoreError):
    reason = "unsupported_format"


class StoreSpecMismatch(StoreError):
    reason = "spec_mismatch"


class _SpecFields(Struct, kw_only=True):
    board_type: Annotated[str, Meta(pattern=BOARD_TYPE_PATTERN)]
    num_players: Annotated[int, Meta(ge=1, le=MAX_PLAYERS)]
    game: Annotated[str, Meta(min_length=1)]
    state_shape: Annotated[tuple[Annotated[int, Meta(ge=1)], ...], Meta(min_length=1)]
    state_dtype: str
    num_actions: Annotated[int, Meta(ge=1)]


class StoreSpec(_SpecFields, frozen=True, kw_only=True):
    """What every game in a store shares: the config and the tensor layout."""

    def __post_init__(self) -> None:
        # msgspec checks Meta constraints only when decoding; converting into the base
        # class applies them to a spec built in code as well.
        msgspec.convert(msgspec.to_builtins(self), _SpecFields)
        dtype = np.dtype(self.state_dtype)
        if dtype.kind not in "biuf" or dtype.name != self.state_dtype:
            raise ValueError(
                f"state_dtype {self.state_dtype!r} must be a numpy bool/int/float name "
                f"such as 'float32'"
            )

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.state_dtype).newbyteorder("<")

    @property
    def state_nbytes(self) -> int:
        return math.prod(self.state_shape) * self.dtype.itemsize


class StoreMeta(Struct, frozen=True, kw_only=True):
    """A store's meta table as the exporter reads it."""

    path: str
    format_version: int
    store_id: str
    created_at: str
    spec: StoreSpec


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def policy_rows_bad(
    ids: np.ndarray, probs: np.ndarray, counts: np.ndarray, num_actions: int
) -> np.ndarray:
    """Per policy row (``counts[i]`` >= 1 entries each): ids out of range or repeated, or
    probabilities negative, non-finite or not summing to 1."""
    rows = len(counts)
    if rows == 0:
        return np.zeros(0, dtype=bool)
    row_of_entry = np.repeat(np.arange(rows), counts)
    entry_bad = (ids < 0) | (ids >= num_actions) | ~np.isfinite(probs) | (probs < 0)
    bad = np.bincount(row_of_entry, weights=entry_bad, minlength=rows) > 0
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(probs.astype(np.float64), starts)
    bad |= ~(np.abs(sums - 1.0) <= POLICY_SUM_TOLERANCE)
    keys = np.sort(row_of_entry * num_actions + np.clip(ids, 0, num_actions - 1))
    repeated = keys[1:] == keys[:-1]
    bad[keys[1:][repeated] // num_actions] = True
    return bad


def winner_of(returns: Sequence[float]) -> int | None:
    """The seat with the unique best result, or None (draw or shared best)."""
    best = max(returns)
    seats = [seat for seat, value in enumerate(returns) if value == best]
    return seats[0] if len(seats) == 1 else None


class GameStore:
    """An open store for writing games; one per process and file."""

    def __init__(self, conn: sqlite3.Connection, path: Path, meta: StoreMeta) -> None:
        self._conn = conn
        self.path = path
        self.meta = meta

    @property
    def spec(self) -> StoreSpec:
        return self.meta.spec

    @classmethod
    def open(cls, path: str | Path, spec: StoreSpec, *, timeout_s: float = 30.0) -> GameStore:
        """Create the store, or open it and check that it holds games of ``spec``."""
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";")[:-1]:
                conn.execute(statement)
            if conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
                rows = {
                    "format_version": str(FORMAT_VERSION),
                    "store_id": str(uuid.uuid4()),
                    "created_at": utc_now_iso(),
                    **_spec_rows(spec),
                }
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows.items())
            conn.execute("COMMIT")
            meta = _read_meta(conn, path)
        except BaseException:
            conn.close()
            raise
        if meta.spec != spec:
            conn.close()
            raise StoreSpecMismatch(f"{path} holds {_describe(meta.spec)}, not {_describe(spec)}")
        return cls(conn, path, meta)

    def game(self, game_id: str | None = None, source: str = "node") -> GameWriter:
        """Start one game; use as a context manager and call ``finish`` at the end."""
        return GameWriter(self, game_id or str(uuid.uuid4()), source)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _insert_game(self, game: GameWriter, status: str, returns: list[float] | None) -> None:
        spec = self.spec
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO games (game_id, board_type, num_players, status, winner, returns,"
                " move_count, source, started_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    game.game_id,
                    spec.board_type,
                    spec.num_players,
                    status,
                    None if returns is None else winner_of(returns),
                    None if returns is None else json.dumps(returns),
                    len(game._moves),
                    game.source,
                    game.started_at,
                    utc_now_iso(),
                ),
            )
            conn.executemany(
                "INSERT INTO moves (game_id, move_number, player, action, state,"
                " policy_actions, policy_probs) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((game.game_id, *move) for move in game._moves),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class GameWriter:
    """One game being played: moves are buffered and written with the result in one
    transaction, so a reader never sees a half-written game."""

    def __init__(self, store: GameStore, game_id: str, source: str) -> None:
        if not (0 < len(game_id) <= MAX_GAME_ID_CHARS and _GAME_ID_ALLOWED.issuperset(game_id)):
            raise ValueError(f"game id {game_id!r}: 1-128 printable ASCII characters")
        self._store = store
        self.game_id = game_id
        self.source = source
        self.started_at = utc_now_iso()
        self._moves: list[tuple[int, int, int, bytes, bytes, bytes]] = []
        self._written = False

    def add_move(
        self,
        state: np.ndarray,
        player: int,
        action: int,
        policy_actions: Sequence[int] | np.ndarray,
        policy_probs: Sequence[float] | np.ndarray,
    ) -> None:
        spec = self._store.spec
        if self._written:
            raise RuntimeError(f"game {self.game_id} is already written")
        state_arr = np.ascontiguousarray(state, dtype=spec.dtype)
        if state_arr.shape != spec.state_shape:
            raise ValueError(f"state shape {state_arr.shape} != declared {spec.state_shape}")
        if not 0 <= player < spec.num_players:
            raise ValueError(f"player {player} outside [0, {spec.num_players})")
        if not 0 <= action < spec.num_actions:
            raise ValueError(f"action {action} outside [0, {spec.num_actions})")
        ids = np.asarray(policy_actions, dtype="<i4")
        probs = np.asarray(policy_probs, dtype="<f4")
        if (
            ids.ndim != 1
            or ids.shape != probs.shape
            or ids.size == 0
            or policy_rows_bad(ids, probs, np.array([ids.size]), spec.num_actions)[0]
        ):
            raise ValueError(
                f"policy: 1-d, non-empty, unique action ids in [0, {spec.num_actions}) "
                f"with probabilities >= 0 summing to 1 (+/- {POLICY_SUM_TOLERANCE})"
            )
        self._moves.append(
            (
                len(self._moves),
                int(player),
                int(action),
                state_arr.tobytes(),
                ids.tobytes(),
                probs.tobytes(),
            )
        )

    def finish(self, returns: Sequence[float]) -> None:
        """Record the game as completed with one result per seat."""
        self._write("completed", _check_returns(returns, self._store.spec.num_players))

    def abandon(self, returns: Sequence[float] | None = None) -> None:
        """Record the game as abandoned (e.g. truncated), with a result if one is known."""
        checked = None if returns is None else _check_returns(returns, self._store.spec.num_players)
        self._write("abandoned", checked)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving the block without finish() (an exception, or a forgotten call) can only
        # record the game as abandoned: never as completed.
        if not self._written:
            self._write("abandoned", None)

    def _write(self, status: str, returns: list[float] | None) -> None:
        if self._written:
            raise RuntimeError(f"game {self.game_id} is already written")
        self._written = True
        self._store._insert_game(self, status, returns)


def _check_returns(returns: Sequence[float], num_players: int) -> list[float]:
    values = [float(v) for v in returns]
    if len(values) != num_players or not all(math.isfinite(v) for v in values):
        raise ValueError(f"returns must be {num_players} finite numbers, got {returns!r}")
    return values


def _spec_rows(spec: StoreSpec) -> dict[str, str]:
    return {
        "board_type": spec.board_type,
        "num_players": str(spec.num_players),
        "game": spec.game,
        "state_shape": json.dumps(list(spec.state_shape)),
        "state_dtype": spec.state_dtype,
        "num_actions": str(spec.num_actions),
    }


def _describe(spec: StoreSpec) -> str:
    return (
        f"{spec.board_type}/{spec.num_players}p game={spec.game!r} "
        f"state={list(spec.state_shape)}:{spec.state_dtype} actions={spec.num_actions}"
    )


def _read_meta(conn: sqlite3.Connection, path: Path) -> StoreMeta:
    try:
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise StoreCorrupt(f"{path}: not a game store (no meta table)") from exc
        raise
    try:
        version = int(rows["format_version"])
    except (KeyError, ValueError) as exc:
        raise StoreCorrupt(f"{path}: meta has no valid format_version") from exc
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"{path}: game store format {version}, this exporter reads {FORMAT_VERSION}"
        )
    try:
        spec = StoreSpec(
            board_type=rows["board_type"],
            num_players=int(rows["num_players"]),
            game=rows["game"],
            state_shape=tuple(json.loads(rows["state_shape"])),
            state_dtype=rows["state_dtype"],
            num_actions=int(rows["num_actions"]),
        )
        return StoreMeta(
            path=str(path),
            format_version=version,
            store_id=rows["store_id"],
            created_at=rows["created_at"],
            spec=spec,
        )
    except (KeyError, ValueError, TypeError, msgspec.ValidationError) as exc:
        raise StoreCorrupt(f"{path}: invalid meta table ({exc})") from exc


# ---- reading (the exporter's side) ----------------------------------------------------


class GameRow(Struct, frozen=True):
    """One game as listed from the ``games`` table."""

    game_id: str
    status: str
    move_count: int
    returns: str | None
    board_type: str
    num_players: int
    rowid: int


def _classify(exc: sqlite3.Error, path: Path) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return StoreLocked(f"{path}: {text}")
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in text:
        return StoreUnreadable(f"{path}: {text}")
    return StoreCorrupt(f"{path}: {text}")


class StoreReader:
    """Read-only access to one store inside one read transaction (a consistent snapshot).

    SQLite errors are raised as ``StoreLocked`` or ``StoreCorrupt``; the caller decides
    whether to retry or skip the store.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 0.05) -> None:
        self.path = Path(path).absolute()
        try:
            self._conn = sqlite3.connect(
                f"{self.path.as_uri()}?mode=ro",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise _classify(exc, self.path) from exc
        try:
            self._conn.execute("BEGIN")
            self.meta = _read_meta(self._conn, self.path)
        except sqlite3.Error as exc:
            self._conn.close()
            raise _classify(exc, self.path) from exc
        except StoreError:
            self._conn.close()
            raise

    def games(self, after: int | None = None) -> list[GameRow]:
        """The games in insertion order: all, or those with a rowid above ``after``."""
        where, params = ("", ()) if after is None else (" WHERE rowid > ?", (after,))
        return self._game_rows(where, params)

    def games_at(self, rowids: Sequence[int]) -> list[GameRow]:
        """The games with these rowids (those still present), in insertion order."""
        where = " WHERE rowid IN (SELECT value FROM json_each(?))"
        return self._game_rows(where, (json.dumps(list(rowids)),))

    def _game_rows(self, where: str, params: Sequence[object]) -> list[GameRow]:
        sql = (
            "SELECT game_id, status, move_count, returns, board_type, num_players, rowid"
            f" FROM games{where} ORDER BY rowid"
        )
        try:
            return [GameRow(*row) for row in self._conn.execute(sql, params)]
        except sqlite3.Error as exc:
            raise _classify(exc, self.path) from exc

    def id_hex(self, rowid: int) -> str | None:
        """The hex of the game id at ``rowid`` (None if no such row): to tell a row apart."""
        sql = "SELECT hex(game_id) FROM games WHERE rowid = ?"
        try:
            row = self._conn.execute(sql, (rowid,)).fetchone()
        except sqlite3.Error as exc:
            raise _classify(exc, self.path) from exc
        return None if row is None else row[0]

    def count_games(self, after: int | None = None) -> int:
        """How many games: all, or those with a rowid above ``after``."""
        where, params = ("", ()) if after is None else (" WHERE rowid > ?", (after,))
        try:
            return self._conn.execute(f"SELECT count(*) FROM games{where}", params).fetchone()[0]
        except sqlite3.Error as exc:
            raise _classify(exc, self.path) from exc

    def moves(self, game_ids: Sequence[str]) -> list[tuple]:
        """The moves of ``game_ids`` (at most a few hundred games), grouped by game, as
        (game_id, move_number, player, action, state, policy_actions, policy_probs)."""
        marks = ",".join("?" * len(game_ids))
        sql = (
            "SELECT game_id, move_number, player, action, state, policy_actions, policy_probs"
            f" FROM moves WHERE game_id IN ({marks}) ORDER BY game_id, move_number"
        )
        try:
            return self._conn.execute(sql, list(game_ids)).fetchall()
        except sqlite3.Error as exc:
            raise _classify(exc, self.path) from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_store_meta(path: str | Path) -> StoreMeta:
    """The meta of one store; raises a ``StoreError`` if it cannot be read."""
    with StoreReader(path) as reader:
        return reader.meta
