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


def child_rss(games_dir: Path, output: Path) -> dict:
    """Export in a fresh process and report its peak RSS (VmHWM: ru_maxrss would carry
    the parent's high-water mark across fork) and its RSS after imports."""
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from consumer.export.exporter import ExportOptions, run_export\n"
        "def hwm():\n"
        "    status = Path('/proc/self/status').read_text().splitlines()\n"
        "    return next(int(l.split()[1]) for l in status if l.startswith('VmHWM'))\n"
        "base = hwm()\n"
        "s = run_export(ExportOptions(board_type='tictactoe', num_players=2,"
        " games_dir=sys.argv[1], output=sys.argv[2], min_moves=0))\n"
        "print(json.dumps({'samples': s.samples, 'bytes': s.bytes,"
        " 'rss_after_imports_mb': base / 1024, 'peak_rss_mb': hwm() / 1024}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(games_dir), str(output)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--games", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/export-bench"))
    args = parser.parse_args()
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

    rss = {}
    for factor in (1, 4, 16):
        games_dir = root / f"x{factor}" / "games"
        fill(games_dir, args.games * factor, seed=factor)
        rss[f"{factor}x"] = child_rss(games_dir, root / f"x{factor}" / "out.npz")
        shutil.rmtree(root / f"x{factor}")
    report["peak_rss"] = rss
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
