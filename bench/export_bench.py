"""Exporter benchmark: write throughput vs ``np.savez``, incremental re-export, peak RSS.

Run: ``.venv/bin/python bench/export_bench.py [--games 10000] [--dir /tmp/export-bench]``.
Stores are filled with synthetic tic-tac-toe-like games through SQL for speed (the same
rows ``GameWriter`` writes); the exporter runs for real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np

from consumer.export.exporter import ExportOptions, run_export
from consumer.export.gamestore import GameStore, StoreSpec, utc_now_iso

SPEC = StoreSpec(
    board_type="tictactoe",
    num_players=2,
    game="tic_tac_toe",
    state_shape=(27,),
    state_dtype="float32",
    num_actions=9,
)
STORES = 4


def fill(games_dir: Path, games: int, seed: int, name: str = "node") -> None:
    """Append ``games`` games of 5-9 moves spread over ``STORES`` stores."""
    rng = np.random.default_rng(seed)
    for s in range(STORES):
        path = games_dir / f"{name}{s}.db"
        GameStore.open(path, SPEC).close()
        conn = sqlite3.connect(path)
        game_rows, move_rows = [], []
        for _ in range(games // STORES):
            game_id = str(uuid.uuid4())
            length = int(rng.integers(5, 10))
            for m in range(length):
                size = int(rng.integers(1, 10))
                ids = rng.choice(9, size, replace=False).astype("<i4")
                probs = rng.random(size).astype("<f4") + 0.01
                probs /= probs.sum(dtype=np.float32)
                state = rng.integers(0, 2, 27).astype("<f4").tobytes()
                move_rows.append(
                    (game_id, m, m % 2, int(ids[0]), state, ids.tobytes(), probs.tobytes())
                )
            now = utc_now_iso()
            game_rows.append(
                (game_id, "tictactoe", 2, "completed", 0, "[1.0, -1.0]", length, name, now, now)
            )
        with conn:
            conn.executemany("INSERT INTO games VALUES (?,?,?,?,?,?,?,?,?,?)", game_rows)
            conn.executemany("INSERT INTO moves VALUES (?,?,?,?,?,?,?)", move_rows)
        conn.close()


def export(games_dir: Path, output: Path, use_cache: bool) -> tuple[dict, float, float]:
    """Run one export; returns (summary, total seconds, seconds in the write stage)."""
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(stage, time.perf_counter())

    options = ExportOptions(
        board_type="tictactoe",
        num_players=2,
        games_dir=str(games_dir),
        output=str(output),
        use_cache=use_cache,
        min_moves=0,
    )
    start = time.perf_counter()
    summary = run_export(options, progress)
    end = time.perf_counter()
    return msgspec.to_builtins(summary), end - start, end - marks.get("write", end)


def savez_seconds(npz: Path) -> tuple[float, float]:
    """np.savez of the arrays in ``npz`` to a new file beside it, as the exporter writes a
    new temp file: (seconds, seconds including fsync)."""
    with np.load(npz, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    target = npz.with_name(f"savez-{uuid.uuid4().hex}.npz")
    start = time.perf_counter()
    np.savez(target, **arrays)
    saved = time.perf_counter()
    with open(target, "rb+") as f:
        os.fsync(f.fileno())
    synced = time.perf_counter()
    target.unlink()
    return saved - start, synced - start


def _vm_hwm_mb() -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss keeps the parent's peak across fork.
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def child(games_dir: Path, output: Path) -> None:
    """In a fresh process: export, report peak RSS, then time np.savez of the result."""
    base = _vm_hwm_mb()
    summary, total_s, write_s = export(games_dir, output, False)
    peak = _vm_hwm_mb()
    savez_s, savez_fsync_s = savez_seconds(output)
    result = {
        "samples": summary["samples"],
        "bytes": summary["bytes"],
        "rss_after_imports_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "total_s": round(total_s, 3),
        "write_stage_s": round(write_s, 3),
        "np_savez_new_file_s": round(savez_s, 3),
        "np_savez_plus_fsync_s": round(savez_fsync_s, 3),
    }
    print(json.dumps(result))


def run_child(games_dir: Path, output: Path) -> dict:
    argv = [sys.executable, __file__, "--child", str(games_dir), str(output)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--games", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    root = args.dir.absolute()
    shutil.rmtree(root, ignore_errors=True)
    report: dict[str, object] = {"games": args.games}

    base = root / "base"
    fill(base / "games", args.games, seed=1)
    runs = []
    for _ in range(3):
        (base / "out" / "full.npz").unlink(missing_ok=True)
        summary, total_s, write_s = export(base / "games", base / "out" / "full.npz", False)
        savez_s, savez_fsync_s = savez_seconds(base / "out" / "full.npz")
        runs.append((total_s, write_s, savez_s, savez_fsync_s))
    medians = (statistics.median(r) for r in zip(*runs, strict=True))
    total_s, write_s, savez_s, savez_fsync_s = medians
    report["full_export"] = {
        "samples": summary["samples"],
        "bytes": summary["bytes"],
        "total_s": round(total_s, 3),
        "write_stage_s": round(write_s, 3),
        "np_savez_new_file_s": round(savez_s, 3),
        "np_savez_plus_fsync_s": round(savez_fsync_s, 3),
        "write_throughput_vs_savez": round(savez_s / write_s, 2),
        "write_throughput_vs_savez_fsync": round(savez_fsync_s / write_s, 2),
        "end_to_end_vs_savez": round(savez_s / total_s, 2),
    }

    cached = base / "out" / "cached.npz"
    export(base / "games", cached, True)
    fill(base / "games", 100, seed=2, name="late")
    again, again_s, _ = export(base / "games", cached, True)
    alone = root / "alone"
    fill(alone / "games", 100, seed=2, name="late")
    small, alone_s, _ = export(alone / "games", alone / "out" / "alone.npz", False)
    report["incremental"] = {
        "re_export_after_100_new_s": round(again_s, 3),
        "encoded_games": again["encoded_games"],
        "cached_games": again["cached_games"],
        "export_100_alone_s": round(alone_s, 3),
        "samples_alone": small["samples"],
    }

    scale = {}
    for factor in (1, 4, 16):
        games_dir = root / f"x{factor}" / "games"
        fill(games_dir, args.games * factor, seed=factor)
        scale[f"{factor}x"] = run_child(games_dir, root / f"x{factor}" / "out.npz")
        shutil.rmtree(root / f"x{factor}")
    report["scale"] = scale
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
