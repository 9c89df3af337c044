"""Atomic output: a writer killed mid-write leaves the previous file intact and loadable,
and ``cleanup_stale_temp_files`` removes what it left, but never a live writer's files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_export_run import export, load
from test_gamestore import make_games, write_games

from consumer.export.exporter import ExportError
from consumer.export.npzwrite import cleanup_stale_temp_files, output_lock

# A real export whose progress callback stops for good once some bytes are written.
STALLING_EXPORT = """
import sys, time
from pathlib import Path
from consumer.export.exporter import ExportOptions, run_export

def progress(stage, done, total):
    if stage == "write" and done > 0:
        Path(sys.argv[3]).touch()
        time.sleep(60)

run_export(ExportOptions(board_type="tictactoe", num_players=2, games_dir=sys.argv[1],
                         output=sys.argv[2], min_moves=0, use_cache=sys.argv[4] == "cache"),
           progress)
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["cache", "scratch"])
def test_killed_writer_leaves_previous_file_and_cleanable_leftovers(
    tmp_path: Path, mode: str
) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 3, "old"))
    output = Path(export(tmp_path).output_path)
    previous = output.read_bytes()
    write_games(tmp_path / "games" / "a.db", make_games(2, 40, "new"))
    marker = tmp_path / "writing"

    argv = [sys.executable, "-c", STALLING_EXPORT, str(tmp_path / "games"), str(output)]
    proc = subprocess.Popen([*argv, str(marker), mode], stderr=subprocess.PIPE)
    try:
        _wait_for(marker, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate()

    assert proc.returncode == -signal.SIGKILL
    assert output.read_bytes() == previous
    assert load(output)["game_ids"].tolist() == ["old-0000", "old-0001", "old-0002"]
    leftovers = sorted(output.parent.glob(".data.npz.*.tmp.npz"))
    if mode == "scratch":
        leftovers += sorted(output.parent.glob(".data.npz.*.work"))
    assert len(leftovers) == (1 if mode == "cache" else 2)

    assert cleanup_stale_temp_files(output) == leftovers
    assert not any(p.exists() for p in leftovers)
    assert export(tmp_path, use_cache=mode == "cache").games == 43


def test_cleanup_spares_a_live_writer(tmp_path: Path) -> None:
    output = tmp_path / "data.npz"
    in_flight = tmp_path / ".data.npz.0123456789ab.tmp.npz"
    in_flight.write_bytes(b"partial")
    unrelated = tmp_path / ".other.npz.0123456789ab.tmp.npz"
    unrelated.write_bytes(b"partial")
    with output_lock(output):
        assert cleanup_stale_temp_files(output) == []
        write_games(tmp_path / "games" / "a.db", make_games(1, 1, "g"))
        with pytest.raises(ExportError, match="another export is writing"):
            export(tmp_path, output=str(output))
    assert in_flight.exists()
    assert cleanup_stale_temp_files(output) == [in_flight]
    assert unrelated.exists()
    assert cleanup_stale_temp_files(tmp_path / "missing" / "data.npz") == []


def test_the_file_loads_without_pickle_and_has_no_object_arrays(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 2, "g"))
    data = load(export(tmp_path).output_path)
    assert all(a.dtype != np.dtype("O") for a in data.values())
