"""Find a config's game stores and bring each one's games into segments, reusing cached
segments and encoding only games not yet encoded. No output writing here."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
from msgspec import Struct

from consumer.export.encode import Filters, encode_batch, triage
from consumer.export.gamestore import (
    GameRow,
    StoreError,
    StoreLocked,
    StoreMeta,
    StoreReader,
    StoreSpec,
    StoreSpecMismatch,
)
from consumer.export.segments import Segment, StoreMark, Workspace

STORE_PATTERNS = ("*.db", "*.sqlite")
BATCH_BYTES = 8 << 20  # raw bytes of moves encoded at once: bounds memory per batch
BATCH_GAMES = 500  # ids per IN (...) query, under SQLite's variable limit
MAX_SEGMENTS_PER_STORE = 32  # beyond this the store is re-encoded into one segment

T = TypeVar("T")
Tick = Callable[[int], None]


class SkippedStore(Struct, frozen=True):
    path: str
    reason: str
    error: str


class Discovered(Struct):
    stores: list[StoreMeta]
    skipped: list[SkippedStore]
    other_config: int  # stores of other configs, ignored
    spec: StoreSpec | None
    games: int  # listed in the stores, before any filter


class StoreResult(Struct):
    """One store's contribution: its segments in order and their game ids."""

    meta: StoreMeta
    segments: list[Segment]
    game_ids: list[list[str]]  # per segment
    skipped: Counter[str]
    encoded_games: int
    cached_games: int
    mark: StoreMark  # how far the store was read, for the next export


def with_lock_retry(read: Callable[[], T], attempts: int, backoff_s: float) -> T:
    """Call ``read``; while the store is locked, retry with exponential backoff."""
    for attempt in range(attempts - 1):
        try:
            return read()
        except StoreLocked:
            time.sleep(backoff_s * 2**attempt)
    return read()


def _read_meta(path: Path) -> tuple[StoreMeta, int]:
    with StoreReader(path) as reader:
        return reader.meta, reader.count_games()


def discover(
    games_dir: Path, board_type: str, num_players: int, attempts: int, backoff_s: float
) -> Discovered:
    """Stores under ``games_dir`` (recursive, path order) holding ``board_type``/players.

    The first such store's spec is the dataset's; stores declaring another spec for the
    same config are skipped, as are stores that cannot be read.
    """
    paths = sorted({p for pattern in STORE_PATTERNS for p in games_dir.rglob(pattern)})
    found = Discovered(stores=[], skipped=[], other_config=0, spec=None, games=0)
    for path in paths:
        if not path.is_file():
            continue
        try:
            meta, games = with_lock_retry(lambda p=path: _read_meta(p), attempts, backoff_s)
        except StoreError as exc:
            found.skipped.append(SkippedStore(str(path), exc.reason, str(exc)))
            continue
        if (meta.spec.board_type, meta.spec.num_players) != (board_type, num_players):
            found.other_config += 1
        elif found.spec is not None and meta.spec != found.spec:
            error = f"{path}: declares {meta.spec}, the dataset is {found.spec}"
            found.skipped.append(SkippedStore(str(path), StoreSpecMismatch.reason, error))
        else:
            found.spec = meta.spec
            found.stores.append(meta)
            found.games += games
    return found


def _batches(games: list[GameRow], bytes_per_move: int) -> Iterator[list[GameRow]]:
    batch: list[GameRow] = []
    size = 0
    for game in games:
        if batch and (size >= BATCH_BYTES or len(batch) >= BATCH_GAMES):
            yield batch
            batch, size = [], 0
        batch.append(game)
        size += game.move_count * bytes_per_move
    if batch:
        yield batch


def _mark_holds(
    mark: StoreMark, reader: StoreReader, total: int, cached_ids: list[list[str]], seen: set[str]
) -> bool:
    """Whether the rows up to ``mark`` are those it recorded (same store, none deleted) and
    dedupe leaves them as they were (cached games first seen here, duplicates taken earlier)."""
    return (
        mark.store_id == reader.meta.store_id
        and len(cached_ids) < MAX_SEGMENTS_PER_STORE
        and seen.issuperset(mark.duplicates)
        and all(seen.isdisjoint(ids) for ids in cached_ids)
        and reader.id_hex(mark.rowid) == mark.id_hex
        and total - reader.count_games(after=mark.rowid) == mark.rows
    )


def collect_store(
    meta: StoreMeta,
    spec: StoreSpec,
    filters: Filters,
    workspace: Workspace,
    seen: set[str],
    tick: Tick,
) -> StoreResult:
    """Read one store in one snapshot. While the store's mark in the cache holds (see
    ``_mark_holds``), only the games added since it and those then in progress are read;
    the games to export among them go into one new segment.

    Changes neither ``seen`` nor ``workspace``'s manifest: the caller applies the result.
    """
    with StoreReader(meta.path) as reader:
        if reader.meta.spec != spec:
            raise StoreSpecMismatch(f"{meta.path}: spec changed to {reader.meta.spec}")
        total = reader.count_games()
        cached = workspace.for_store(meta.path)
        cached_ids = [workspace.game_ids(s) for s in cached]
        mark = workspace.marks.get(meta.path)
        if mark is not None and _mark_holds(mark, reader, total, cached_ids, seen):
            games = reader.games_at(mark.pending) + reader.games(after=mark.rowid)
        else:
            cached, cached_ids, games = [], [], reader.games()
            mark = StoreMark(
                store_id=reader.meta.store_id,
                rowid=0,
                rows=0,
                id_hex=None,
                pending=[],
                duplicates=[],
                skipped={},
            )
        ruled_out: Counter[str] = Counter(mark.skipped)
        pending: list[int] = []
        duplicates = list(mark.duplicates)
        todo = []
        for game in games:
            reason = triage(game, spec, filters)
            if reason is None and game.game_id in seen:
                reason = "duplicate"
            if reason is None:
                todo.append(game)
            elif reason == "in_progress":
                pending.append(game.rowid)
            elif reason == "duplicate":
                duplicates.append(game.game_id)
            else:
                ruled_out[reason] += 1
        tick(total - len(todo))
        segments, ids = list(cached), list(cached_ids)
        if todo:
            writer = workspace.writer(meta.path, reader.meta.store_id)
            try:
                bytes_per_move = spec.state_nbytes + 8 * spec.num_actions + 64
                for batch in _batches(todo, bytes_per_move):
                    game_ids = [game.game_id for game in batch]
                    writer.append(encode_batch(spec, batch, reader.moves(game_ids)))
                    tick(len(batch))
            except BaseException:
                writer.discard()
                raise
            segments.append(writer.finish())
            ids.append(writer.game_ids)
        last = max([mark.rowid, *(g.rowid for g in games)])
        new_mark = msgspec.structs.replace(
            mark,
            rowid=last,
            rows=total,
            id_hex=reader.id_hex(last),
            pending=pending,
            duplicates=duplicates,
            skipped=dict(ruled_out),
        )
    encode_failed = Counter(reason for s in segments for reason in s.skipped.values())
    skipped = ruled_out + encode_failed
    skipped.update(in_progress=len(pending), duplicate=len(duplicates))
    return StoreResult(
        meta=reader.meta,
        segments=segments,
        game_ids=ids,
        skipped=+skipped,
        encoded_games=len(todo),
        cached_games=sum(len(i) for i in cached_ids),
        mark=new_mark,
    )
