"""The built-in exporter: throughput against ``np.savez`` of the same arrays on the same
disk, incremental re-export, and peak memory as the dataset grows.

The timing, floor and child-process helpers are ``bench/export_bench.py``'s (``export``,
``savez_seconds``, ``run_child``), run on two datasets: its tiny tic-tac-toe states
(``fill``) and byte-heavy states from ``bench.games``.
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path

import msgspec

from bench import export_bench, games
from bench.report import Figure, Target, figure

THROUGHPUT_TARGET = Target(">=", 0.7)
INCREMENTAL_TARGET = Target("<=", 1.25)
MEMORY_TARGET = Target("<=", 1.25)
MiB = 2**20


class Size(msgspec.Struct, frozen=True):
    small_state_games: int  # tic-tac-toe games (export_bench.fill)
    large_state_games: int  # byte-heavy games (bench.games), a multiple of UNIT_GAMES
    reps: int
    incremental_base: int  # games already exported before 100 new ones
    memory_unit: int  # large-state games at 1x (memory runs 1x, 4x, 16x)


SIZES = {
    "small": Size(2_000, 500, 1, 2_000, 100),
    "default": Size(10_000, 2_000, 5, 10_000, 500),
    "large": Size(40_000, 8_000, 5, 10_000, 2_000),
}
NEW_GAMES = 100
STORES = export_bench.STORES


def small_state_dataset(games_dir: Path, count: int) -> None:
    export_bench.fill(games_dir, count, seed=1)


def large_state_dataset(games_dir: Path, count: int, unit_dir: Path) -> None:
    """``count`` byte-heavy games in ``STORES`` stores: one written, the rest cloned."""
    unit = unit_dir / f"unit-{count // STORES}.db"
    if not unit.exists():
        unit_dir.mkdir(parents=True, exist_ok=True)
        games.write_store(unit, count // STORES, seed=1)
    games.make_stores(games_dir, unit, STORES)


class Timing(msgspec.Struct, frozen=True):
    samples: int
    bytes: int
    export_s: float
    write_s: float
    floor_s: float  # np.savez of the same arrays to a new file, plus fsync


def time_export(games_dir: Path, out_dir: Path, reps: int) -> Timing:
    """Medians of ``reps`` cold exports (no cache) and as many numpy floors, alternating
    which goes first; dirty pages are flushed before each, so neither pays for the other."""
    first = out_dir / "first.npz"
    export_bench.export(games_dir, first, False)  # warms the page cache; source of the floor
    runs = []
    for rep in range(reps):
        output = out_dir / f"out{rep}.npz"
        floor_first = rep % 2 == 1
        if floor_first:
            os.sync()
            _, floor_s = export_bench.savez_seconds(first)
        os.sync()
        summary, total_s, write_s = export_bench.export(games_dir, output, False)
        if not floor_first:
            os.sync()
            _, floor_s = export_bench.savez_seconds(first)
        runs.append((summary["samples"], summary["bytes"], total_s, write_s, floor_s))
        output.unlink()
    first.unlink()
    medians = (statistics.median(column) for column in zip(*runs, strict=True))
    samples, size, total_s, write_s, floor_s = medians
    return Timing(int(samples), int(size), total_s, write_s, floor_s)


def throughput_figures(label: str, t: Timing) -> list[Figure]:
    ratio = t.floor_s / t.export_s
    return [
        figure(
            "export",
            f"{label}: samples/s ({t.samples:,} samples)",
            t.samples / t.export_s,
            "samples/s",
            baseline=t.samples / t.floor_s,
            baseline_label="np.savez+fsync",
            ratio=ratio,
            target=THROUGHPUT_TARGET,
        ),
        figure(
            "export",
            f"{label}: MiB/s ({t.bytes / MiB:,.0f} MiB)",
            t.bytes / MiB / t.export_s,
            "MiB/s",
            baseline=t.bytes / MiB / t.floor_s,
            baseline_label="np.savez+fsync",
            ratio=ratio,
            target=THROUGHPUT_TARGET,
        ),
        figure(
            "export",
            f"{label}: write stage alone, MiB/s",
            t.bytes / MiB / t.write_s,
            "MiB/s",
            baseline=t.bytes / MiB / t.floor_s,
            baseline_label="np.savez+fsync",
            note=f"export {t.export_s:.2f}s, of which writing {t.write_s:.2f}s; "
            f"floor {t.floor_s:.2f}s",
        ),
    ]


def run_throughput(size_name: str, workdir: Path) -> list[Figure]:
    size = SIZES[size_name]
    small, large = workdir / "small" / "games", workdir / "large" / "games"
    small_state_dataset(small, size.small_state_games)
    large_state_dataset(large, size.large_state_games, workdir / "units")
    return [
        *throughput_figures("small states", time_export(small, workdir / "small", size.reps)),
        *throughput_figures("large states", time_export(large, workdir / "large", size.reps)),
    ]


def new_small_state_games(games_dir: Path) -> None:
    # New games arrive as new node stores (export_bench.fill names them late0..3).
    export_bench.fill(games_dir, NEW_GAMES, seed=2, name="late")


def new_large_state_games(games_dir: Path) -> None:
    games_dir.mkdir(parents=True, exist_ok=True)
    games.write_store(games_dir / "late.db", NEW_GAMES, seed=2)


def run_incremental(size_name: str, workdir: Path) -> list[Figure]:
    """Re-export with the cache after ``NEW_GAMES`` new games on top of the base, against
    exporting the new games alone plus writing the full file."""
    size = SIZES[size_name]
    figures = []
    datasets = (
        ("small states", small_state_dataset, new_small_state_games),
        (
            "large states",
            lambda d, n: large_state_dataset(d, n, workdir / "units"),
            new_large_state_games,
        ),
    )
    for label, make, add_new in datasets:
        base = workdir / label.replace(" ", "-")
        games_dir = base / "games"
        make(games_dir, size.incremental_base)
        output = base / "out" / "dataset.npz"
        export_bench.export(games_dir, output, True)
        add_new(games_dir)
        alone_dir = base / "alone"
        add_new(alone_dir / "games")
        os.sync()
        again, again_s, again_write_s = export_bench.export(games_dir, output, True)
        os.sync()
        _, alone_s, _ = export_bench.export(alone_dir / "games", alone_dir / "a.npz", False)
        os.sync()
        _, floor_s = export_bench.savez_seconds(output)
        if again["encoded_games"] != NEW_GAMES:
            raise AssertionError(f"re-export encoded {again['encoded_games']} games")
        figures.append(
            figure(
                "incremental",
                f"{label}: re-export after {NEW_GAMES} new on {size.incremental_base:,} games",
                again_s,
                "s",
                baseline=alone_s + again_write_s,
                baseline_label="100 alone + writing",
                target=INCREMENTAL_TARGET,
                note=(
                    f"{again['encoded_games']} encoded, {again['cached_games']:,} from cache; "
                    f"re-export {again_s:.3f}s vs 100 alone {alone_s:.3f}s "
                    f"(x{again_s / alone_s:.1f}); writing the full file {again_write_s:.3f}s "
                    f"(np.savez floor {floor_s:.3f}s)"
                ),
            )
        )
        shutil.rmtree(base)
    return figures


def run_memory(size_name: str, workdir: Path) -> list[Figure]:
    """Peak RSS of a cold export in a fresh process at 1x, 4x and 16x the data."""
    size = SIZES[size_name]
    peaks: dict[int, dict[str, float]] = {}
    for factor in (1, 4, 16):
        base = workdir / f"x{factor}"
        large_state_dataset(base / "games", size.memory_unit * factor, workdir / "units")
        peaks[factor] = export_bench.run_child(base / "games", base / "out.npz")
        shutil.rmtree(base)
    one = peaks[1]
    figures = []
    for factor in (4, 16):
        got = peaks[factor]
        figures.append(
            figure(
                "memory",
                f"peak RSS at {factor}x ({got['samples']:,} samples,"
                f" {got['bytes'] / MiB:,.0f} MiB)",
                got["peak_rss_mb"],
                "MiB",
                baseline=one["peak_rss_mb"],
                baseline_label=f"1x: {one['bytes'] / MiB:,.0f} MiB",
                target=MEMORY_TARGET,
                note=(
                    f"above imports: {got['peak_rss_mb'] - got['rss_after_imports_mb']:.0f} MiB"
                    f" at {factor}x vs {one['peak_rss_mb'] - one['rss_after_imports_mb']:.0f}"
                    " MiB at 1x"
                ),
            )
        )
    return figures
