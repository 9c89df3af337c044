"""The README's demo, end to end: real nodes, the daemon, the built-in exporter, a trainer."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consumer.cli import main
from consumer.store import Store


def run_demo(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "consumer.cli", "demo", "--data-dir", str(tmp_path),
        "--games-per-node", "8", "--batch-size", "4", "--simulations", "8",
        "--min-games", "12", *flags,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def test_the_demo_ends_with_a_trainer_loading_a_verified_dataset(tmp_path: Path) -> None:
    out = run_demo(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "npz.export.complete" in out.stdout
    assert "(sha256 verified)" in out.stdout
    dataset = tmp_path / "training" / "connectfour_2p.npz"
    with np.load(dataset, allow_pickle=False) as data:
        samples = data["values"].shape[0]
        assert samples > 0
        assert data["states"].shape == (samples, 3, 6, 7)
        indptr = data["policy_indptr"]
        sums = np.add.reduceat(data["policy_probs"], indptr[:-1])
        assert np.allclose(sums, 1.0, atol=1e-3)
    assert f'"samples": {samples}' in out.stdout


def test_the_demo_stops_with_the_reason_when_every_game_is_too_short(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "--game", "tic_tac_toe", "--board-type", "tictactoe")
    assert out.returncode == 1
    assert "npz.export.failed" in out.stdout and "too_short" in out.stdout


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--min-games", "0", "0 is less than 1"),
        ("--simulations", "1", "1 is less than 2"),
        ("--nodes", "two", "'two' is not an integer"),
        ("--min-moves", "-1", "-1 is less than 0"),
    ],
)
def test_bad_demo_flags_are_refused_before_anything_starts(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err


def test_a_failing_selfplay_node_ends_the_demo_with_its_error(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--game", "no_such_game")
    assert result.returncode == 1
    assert "unknown OpenSpiel game 'no_such_game'" in result.stderr
    assert "selfplay node 1 failed with exit code" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--board-type", "BAD"], "board type 'BAD' must be"),
        (["--num-players", "17"], "num_players 17 must be between 1 and 16"),
        (["--data-dir", "/proc/no/such"], "No such file or directory"),
    ],
)
def test_a_bad_config_or_data_dir_is_one_line_and_exit_2(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoexport demo: ") and says in err and "Traceback" not in err


async def test_the_demo_stops_when_its_daemon_cannot_start(tmp_path: Path) -> None:
    # Another daemon owns the state file in this data directory.
    async with await Store.open(tmp_path / "export_daemon_state.db", owner=True):
        result = await asyncio.to_thread(run_demo, tmp_path)
    assert result.returncode == 1
    assert "in use by another autoexport daemon" in result.stderr
    assert "the daemon stopped" in result.stdout
    assert "fewer than" not in result.stdout


def test_the_board_type_follows_the_game(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--game", "tic_tac_toe", "--min-moves", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "training" / "tictactoe_2p.npz").is_file()
