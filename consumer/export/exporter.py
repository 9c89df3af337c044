"""The export job: options in, one atomically written ``.npz`` and a JSON summary out.

Store discovery and encoding live in ``collect``, files in ``segments`` and ``npzwrite``;
this module orders the run and writes down what the targets mean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta, Struct
from opentelemetry import trace
from tqdm import tqdm

from consumer.export.collect import (
    Discovered,
    SkippedStore,
    StoreResult,
    collect_store,
    discover,
    with_lock_retry,
)
from consumer.export.encode import PER_ENTRY_ARRAYS, Filters, chunk_layout
from consumer.export.gamestore import POLICY_SUM_TOLERANCE, StoreError, StoreSpec
from consumer.export.npzwrite import (
    InvalidOutput,
    Member,
    OutputBusy,
    Progress,
    Written,
    member,
    output_lock,
    validate_npz,
    work_dir,
    write_npz_atomic,
)
from consumer.export.segments import (
    CacheCorrupt,
    Segment,
    Workspace,
    cache_key,
    cache_lock,
)
from consumer.telemetry import attached, context_from_env
from schemas.events import BoardType, NumPlayers
from schemas.subjects import config_key

EXPORTER_VERSION = "1"
POLICY_DROP_WARN_FRACTION = 0.01

log = logging.getLogger(__name__)
tracer = trace.get_tracer("autoexport.exporter")


class ExportError(Exception):
    """The export produced no file; the message is the one-line reason."""


class ExportOptions(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    board_type: BoardType
    num_players: NumPlayers
    games_dir: str
    output: str
    use_cache: bool = False
    cache_dir: str | None = None  # default: <output dir>/.cache
    min_moves: Annotated[int, Meta(ge=0)] = 10
    include_incomplete: bool = False
    lock_attempts: Annotated[int, Meta(ge=1)] = 5
    lock_backoff_s: Annotated[float, Meta(ge=0)] = 0.2


class StoreSummary(Struct, frozen=True):
    path: str
    store_id: str
    games: int
    samples: int


class ExportSummary(Struct, frozen=True, kw_only=True):
    """The job's result, printed as the last stdout line."""

    output_path: str
    samples: int
    games: int
    config: str
    bytes: int
    sha256: str
    unchanged: bool  # the existing file already held exactly this dataset
    encoded_games: int  # games read and encoded by this run
    cached_games: int  # games taken from the cache
    skipped: dict[str, int]  # games, by reason
    policy_dropped: dict[str, int]  # games and moves rejected for their policy
    stores: list[StoreSummary]
    stores_skipped: list[SkippedStore]
    stores_other_config: int
    duration_seconds: float


def no_progress(stage: str, done: int, total: int) -> None:
    pass


def run_export(options: ExportOptions, progress: Progress = no_progress) -> ExportSummary:
    """Export ``options``' config from its stores to ``options.output``; raises
    ``ExportError`` when no file was written (the previous one is untouched)."""
    started = time.monotonic()
    output = Path(options.output).absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(output):
            try:
                summary = _export(options, output, progress, rebuild_cache=False)
            except CacheCorrupt as exc:
                log.warning("export cache is corrupt (%s); rebuilding it", exc)
                summary = _export(options, output, progress, rebuild_cache=True)
    except (OutputBusy, InvalidOutput, OSError) as exc:
        raise ExportError(str(exc)) from exc
    duration = round(time.monotonic() - started, 3)
    return msgspec.structs.replace(summary, duration_seconds=duration)


def _export(
    options: ExportOptions, output: Path, progress: Progress, rebuild_cache: bool
) -> ExportSummary:
    config = config_key(options.board_type, options.num_players)
    games_dir = Path(options.games_dir).absolute()
    if not games_dir.is_dir():
        raise ExportError(f"games directory {games_dir} does not exist")
    with tracer.start_as_current_span("discover") as span:
        found = discover(
            games_dir,
            options.board_type,
            options.num_players,
            options.lock_attempts,
            options.lock_backoff_s,
        )
        span.set_attribute("autoexport.stores", len(found.stores))
    if found.spec is None:
        unread = ", ".join(f"{s.path} ({s.reason})" for s in found.skipped)
        raise ExportError(
            f"no usable game store for {config} under {games_dir}"
            + (f"; unreadable: {unread}" if unread else "")
        )
    spec = found.spec
    key = _cache_key_fields(options, spec)
    with _workspace(options, output, config, key, rebuild_cache) as workspace:
        with tracer.start_as_current_span("encode"):
            results, stores_skipped = _collect_all(found, spec, options, workspace, progress)
        if options.use_cache:
            workspace.save()
        segments = [s for r in results for s in r.segments]
        samples = sum(s.samples for s in segments)
        skipped = sum((r.skipped for r in results), Counter())
        if samples == 0:
            raise ExportError(
                f"no usable games for {config} in {len(results)} store(s) under {games_dir}"
                f" (skipped: {dict(skipped) or 'none'})"
            )
        metadata = _metadata(options, spec, results, stores_skipped, skipped, segments)
        members = _members(workspace, spec, results, metadata)
        existing = _unchanged(output, members, metadata["fingerprint"])
        written = existing
        if written is None:
            with tracer.start_as_current_span("write") as span:
                written = write_npz_atomic(output, members, progress)
                span.set_attribute("autoexport.bytes", written.bytes)
    return ExportSummary(
        output_path=str(output),
        samples=samples,
        games=metadata["counts"]["games"],
        config=config,
        bytes=written.bytes,
        sha256=written.sha256,
        unchanged=existing is not None,
        encoded_games=sum(r.encoded_games for r in results),
        cached_games=sum(r.cached_games for r in results),
        skipped=dict(sorted(skipped.items())),
        policy_dropped=metadata["policy_dropped"],
        stores=[StoreSummary(**source) for source in _sources(results)],
        stores_skipped=stores_skipped,
        stores_other_config=found.other_config,
        duration_seconds=0.0,
    )


def _cache_key_fields(options: ExportOptions, spec: StoreSpec) -> dict[str, Any]:
    """Every input that changes the output besides the games themselves."""
    return {
        "exporter_version": EXPORTER_VERSION,
        "board_type": spec.board_type,
        "num_players": spec.num_players,
        "game": spec.game,
        "state_shape": list(spec.state_shape),
        "state_dtype": spec.state_dtype,
        "num_actions": spec.num_actions,
        "min_moves": options.min_moves,
        "include_incomplete": options.include_incomplete,
        "policy_sum_tolerance": POLICY_SUM_TOLERANCE,
    }


@contextmanager
def _workspace(
    options: ExportOptions, output: Path, config: str, key: dict[str, Any], rebuild: bool
) -> Iterator[Workspace]:
    if not options.use_cache:
        directory = work_dir(output)
        directory.mkdir()
        try:
            yield Workspace(directory, key, [], {}, persistent=False)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    root = Path(options.cache_dir).absolute() if options.cache_dir else output.parent / ".cache"
    directory = root / f"{config}-{cache_key(key)}"
    with cache_lock(directory):
        workspace = Workspace.open(directory, key)
        if rebuild:
            workspace.clear()
        yield workspace


def _collect_all(
    found: Discovered,
    spec: StoreSpec,
    options: ExportOptions,
    workspace: Workspace,
    progress: Progress,
) -> tuple[list[StoreResult], list[SkippedStore]]:
    filters = Filters(min_moves=options.min_moves, include_incomplete=options.include_incomplete)
    seen: set[str] = set()  # game ids exported so far: a later store's copy is a duplicate
    results: list[StoreResult] = []
    skipped = list(found.skipped)
    done = 0

    def tick(games: int) -> None:
        nonlocal done
        done += games
        progress("encode", done, found.games)

    tick(0)
    for meta in found.stores:
        try:
            result = with_lock_retry(
                lambda m=meta: collect_store(m, spec, filters, workspace, seen, tick),
                options.lock_attempts,
                options.lock_backoff_s,
            )
        except StoreError as exc:
            log.warning("skipping game store %s", exc)
            skipped.append(SkippedStore(meta.path, exc.reason, str(exc)))
            continue
        results.append(result)
        seen.update(game_id for ids in result.game_ids for game_id in ids)
    # The cache keeps the segments and marks of stores skipped this time (they may be
    # readable next time) and forgets stores that are gone.
    unread = {s.path for s in skipped}
    workspace.segments = [s for s in workspace.segments if s.store_path in unread]
    workspace.segments += [s for r in results for s in r.segments]
    workspace.marks = {p: m for p, m in workspace.marks.items() if p in unread}
    workspace.marks |= {r.meta.path: r.mark for r in results}
    return results, skipped


def _sources(results: list[StoreResult]) -> list[dict[str, Any]]:
    return [
        {
            "path": r.meta.path,
            "store_id": r.meta.store_id,
            "games": sum(len(ids) for ids in r.game_ids),
            "samples": sum(s.samples for s in r.segments),
        }
        for r in results
    ]


def _metadata(
    options: ExportOptions,
    spec: StoreSpec,
    results: list[StoreResult],
    stores_skipped: list[SkippedStore],
    skipped: Counter[str],
    segments: list[Segment],
) -> dict[str, Any]:
    games = sum(s.games for s in segments)
    bad_policy_moves = sum(s.bad_policy_moves for s in segments)
    considered = games + skipped["bad_policy"]
    if considered and skipped["bad_policy"] / considered > POLICY_DROP_WARN_FRACTION:
        log.warning(
            "%d of %d games dropped for an invalid policy (%d moves)",
            skipped["bad_policy"],
            considered,
            bad_policy_moves,
        )
    ids_digest = hashlib.sha256()
    for r in results:
        for ids in r.game_ids:
            ids_digest.update("\n".join(ids).encode() + b"\n")
    metadata: dict[str, Any] = {
        "format": "autoexport-npz",
        "exporter_version": EXPORTER_VERSION,
        "config": config_key(spec.board_type, spec.num_players),
        "board_type": spec.board_type,
        "num_players": spec.num_players,
        "game": spec.game,
        "state_shape": list(spec.state_shape),
        "state_dtype": spec.state_dtype,
        "policy_size": spec.num_actions,
        "value_perspective": "player_to_move",
        "targets": {
            "states": "encoded state before the move, as the selfplay node wrote it",
            "values": "final result for the player to move: values_per_seat[i, players[i]]",
            "values_per_seat": "final result of every seat, indexed by absolute seat",
            "policy": (
                "search policy as CSR rows: policy_indices/policy_probs"
                "[policy_indptr[i]:policy_indptr[i+1]]; ids in [0, policy_size); rows sum"
                f" to 1 +/- {POLICY_SUM_TOLERANCE}; never replaced by a one-hot move"
            ),
            "players": "seat to move",
            "actions": "action played",
            "move_numbers": "0-based ply within the game",
            "game_index": "index into game_ids; game_sources[g] indexes metadata sources",
        },
        "filters": {
            "completed_only": not options.include_incomplete,
            "min_moves": options.min_moves,
            "dedupe": "by game_id; the first store in path order wins",
        },
        "counts": {
            "samples": sum(s.samples for s in segments),
            "games": games,
            "policy_entries": sum(s.entries for s in segments),
        },
        "skipped_games": dict(sorted(skipped.items())),
        "policy_dropped": {"games": skipped["bad_policy"], "moves": bad_policy_moves},
        "sources": _sources(results),
        "stores_skipped": [msgspec.to_builtins(s) for s in stores_skipped],
        "game_ids_sha256": ids_digest.hexdigest(),
    }
    text = json.dumps(metadata, sort_keys=True)
    metadata["fingerprint"] = hashlib.sha256(text.encode()).hexdigest()
    metadata["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return metadata


def _members(
    workspace: Workspace, spec: StoreSpec, results: list[StoreResult], metadata: dict[str, Any]
) -> list[Member]:
    segments = [s for r in results for s in r.segments]
    samples = metadata["counts"]["samples"]
    entries = metadata["counts"]["policy_entries"]
    per_segment = [(i, ids) for i, r in enumerate(results) for ids in r.game_ids]
    games = sum(len(ids) for _, ids in per_segment)
    width = max((len(game_id) for _, ids in per_segment for game_id in ids), default=1)
    members = [member("metadata", np.array(json.dumps(metadata)))]
    for name, (dtype, trailing) in chunk_layout(spec).items():
        if name == "policy_counts":
            blocks = lambda: workspace.indptr_blocks(segments)  # noqa: E731
            members.append(Member("policy_indptr", "<i8", (samples + 1,), blocks))
        elif name == "game_index":
            blocks = lambda: workspace.game_index_blocks(segments)  # noqa: E731
            members.append(Member(name, "<i4", (samples,), blocks))
        else:
            length = entries if name in PER_ENTRY_ARRAYS else samples
            blocks = lambda n=name: workspace.blocks(segments, n)  # noqa: E731
            members.append(Member(name, dtype.str, (length, *trailing), blocks))
    members.append(
        Member(
            "game_ids",
            f"<U{width}",
            (games,),
            lambda: (np.array(ids, dtype=f"<U{width}").tobytes() for _, ids in per_segment),
        )
    )
    members.append(
        Member(
            "game_sources",
            "<i4",
            (games,),
            lambda: (np.full(len(ids), i, dtype="<i4").tobytes() for i, ids in per_segment),
        )
    )
    return members


def _unchanged(output: Path, members: list[Member], fingerprint: str) -> Written | None:
    """The existing output, if it already holds this exact dataset (same fingerprint and
    layout): then there is nothing to write."""
    if not output.is_file():
        return None
    try:
        metadata = validate_npz(output, members)
    except InvalidOutput:
        return None
    if metadata.get("fingerprint") != fingerprint:
        return None
    with open(output, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return Written(path=str(output), bytes=output.stat().st_size, sha256=digest)


class _TqdmProgress:
    """One tqdm bar per stage on stderr."""

    def __init__(self) -> None:
        self._stage = ""
        self._bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            in_bytes = stage == "write"
            self._bar = tqdm(
                total=total,
                desc=stage,
                unit="B" if in_bytes else " games",
                unit_scale=in_bytes,
                file=sys.stderr,
                leave=False,
            )
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def export_main(args: argparse.Namespace) -> int:
    """``autoexport export``: run the export, print the summary as the last stdout line."""
    try:
        options = msgspec.convert(
            {
                "board_type": args.board_type,
                "num_players": args.num_players,
                "games_dir": str(Path(args.games_dir).absolute()),
                "output": str(Path(args.output).absolute()),
                "use_cache": args.use_cache,
                "cache_dir": str(Path(args.cache_dir).absolute()) if args.cache_dir else None,
                "min_moves": args.min_moves,
                "include_incomplete": args.include_incomplete,
            },
            ExportOptions,
        )
    except msgspec.ValidationError as exc:
        print(f"autoexport export: invalid option: {exc}", file=sys.stderr)
        return 2
    progress = _TqdmProgress() if sys.stderr.isatty() and not args.no_progress else None
    try:
        # The daemon passes its export span in TRACEPARENT: our spans join that trace.
        with attached(context_from_env(os.environ)):
            summary = run_export(options, progress or no_progress)
    except ExportError as exc:
        print(f"autoexport export: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    print(msgspec.json.encode(summary).decode(), flush=True)
    return 0
