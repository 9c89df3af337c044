"""The exporter on real stores: exact arrays, filters, dedupe, bad input, CLI contract."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from test_gamestore import SPEC, Game, make_game, make_games, sql, write_games

from consumer.cli import main
from consumer.export.exporter import ExportError, ExportOptions, ExportSummary, run_export
from consumer.export.gamestore import GameStore


def options(tmp_path: Path, **changes: object) -> ExportOptions:
    base = ExportOptions(
        board_type="tictactoe",
        num_players=2,
        games_dir=str(tmp_path / "games"),
        output=str(tmp_path / "out" / "data.npz"),
        min_moves=0,
        lock_attempts=3,
        lock_backoff_s=0.01,
    )
    return msgspec.structs.replace(base, **changes)


def export(tmp_path: Path, **changes: object) -> ExportSummary:
    return run_export(options(tmp_path, **changes))


def load(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def expected_arrays(games: list[Game]) -> dict[str, np.ndarray]:
    moves = [(g, m) for g in games for m in g.moves]
    counts = [len(m.policy_ids) for _, m in moves]
    return {
        "states": np.stack([m.state for _, m in moves]),
        "policy_indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "policy_indices": np.concatenate([m.policy_ids for _, m in moves]),
        "policy_probs": np.concatenate([m.policy_probs for _, m in moves]),
        "values": np.array([g.returns[m.player] for g, m in moves], np.float32),
        "values_per_seat": np.array([g.returns for g, _ in moves], np.float32),
        "players": np.array([m.player for _, m in moves], np.int8),
        "actions": np.array([m.action for _, m in moves], np.int32),
        "move_numbers": np.array([i for g in games for i in range(len(g.moves))], np.int32),
        "game_index": np.array([i for i, g in enumerate(games) for _ in g.moves], np.int32),
        "game_ids": np.array([g.game_id for g in games]),
    }


def assert_dataset(path: str | Path, games: list[Game]) -> dict:
    data = load(path)
    for name, want in expected_arrays(games).items():
        assert data[name].dtype == want.dtype, name
        assert np.array_equal(data[name], want), name
    return json.loads(str(data["metadata"]))


def test_round_trip_is_exact(tmp_path: Path) -> None:
    first, second = make_games(1, 5, "a"), make_games(2, 4, "b")
    write_games(tmp_path / "games" / "a.db", first)
    write_games(tmp_path / "games" / "sub" / "b.sqlite", second)

    summary = export(tmp_path)

    assert summary.output_path == str(tmp_path / "out" / "data.npz")
    assert (summary.games, summary.samples) == (9, sum(len(g.moves) for g in first + second))
    assert summary.skipped == {} and summary.stores_skipped == []
    metadata = assert_dataset(summary.output_path, first + second)
    data = load(summary.output_path)
    assert data["game_sources"].tolist() == [0] * 5 + [1] * 4
    assert metadata["value_perspective"] == "player_to_move"
    assert metadata["policy_size"] == 9 and metadata["state_shape"] == [3, 3, 3]
    assert metadata["filters"] == {
        "completed_only": True,
        "min_moves": 0,
        "dedupe": "by game_id; the first store in path order wins",
    }
    assert [(s["path"], s["games"]) for s in metadata["sources"]] == [
        (str(tmp_path / "games" / "a.db"), 5),
        (str(tmp_path / "games" / "sub" / "b.sqlite"), 4),
    ]
    assert metadata["exporter_version"] == "1"
    assert metadata["counts"]["samples"] == summary.samples
    assert list(tmp_path.joinpath("out").glob("*.tmp.npz")) == []
    assert list(tmp_path.joinpath("out").glob("*.work")) == []


def test_duplicate_game_ids_count_once_first_store_wins(tmp_path: Path) -> None:
    a = make_games(1, 3, "g")
    rng = np.random.default_rng(9)
    b = [make_game(rng, "g-0001", 4), make_game(rng, "g-0100", 5)]
    write_games(tmp_path / "games" / "a.db", a)
    write_games(tmp_path / "games" / "b.db", b)

    summary = export(tmp_path)

    assert summary.games == 4 and summary.skipped == {"duplicate": 1}
    assert_dataset(summary.output_path, [*a, b[1]])


def test_filters_min_moves_and_incomplete_games(tmp_path: Path) -> None:
    path = tmp_path / "games" / "a.db"
    short, long_ = make_games(1, 1, "short", moves=3), make_games(2, 2, "long", moves=12)
    truncated = make_games(3, 1, "truncated", moves=12)
    write_games(path, short + long_)
    write_games(path, truncated, finish=False)  # abandoned, with a result
    with GameStore.open(path, SPEC) as store, store.game("crashed") as writer:
        writer.add_move(*long_[0].moves[0])  # abandoned without a result
    sql(path, "UPDATE games SET status = 'in_progress' WHERE game_id = 'long-0001'")

    summary = export(tmp_path, min_moves=10)
    assert summary.skipped == {"in_progress": 1, "not_completed": 2, "too_short": 1}
    assert_dataset(summary.output_path, long_[:1])

    summary = export(tmp_path, min_moves=1, include_incomplete=True)
    assert summary.skipped == {"in_progress": 1, "missing_result": 1}
    metadata = assert_dataset(summary.output_path, short + long_[:1] + truncated)
    assert metadata["filters"]["completed_only"] is False


def test_bad_games_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "games" / "a.db"
    games = make_games(5, 16, "g", moves=4)
    write_games(path, games)
    with GameStore.open(path, SPEC) as store, store.game("no-moves") as writer:
        writer.finish([0.0, 0.0])
    nan_state = np.full(27, np.nan, np.float32).tobytes()
    one = np.array([0], np.int32).tobytes()
    breakages = {
        "g-0001": ("UPDATE games SET returns = NULL", ()),
        "g-0002": ("UPDATE games SET returns = '[1.0]'", ()),
        "g-0003": ("UPDATE moves SET state = x'00' WHERE move_number = 1 AND", ()),
        "g-0004": ("UPDATE moves SET state = ? WHERE move_number = 2 AND", (nan_state,)),
        "g-0005": (
            "UPDATE moves SET policy_actions = ?, policy_probs = ? WHERE move_number = 0 AND",
            (one, np.array([0.5], np.float32).tobytes()),
        ),
        "g-0006": (
            "UPDATE moves SET policy_actions = ?, policy_probs = ? WHERE move_number = 1 AND",
            (np.array([9], np.int32).tobytes(), np.array([1.0], np.float32).tobytes()),
        ),
        "g-0007": (
            "UPDATE moves SET policy_actions = ?, policy_probs = ? WHERE move_number = 3 AND",
            (np.array([1, 1], np.int32).tobytes(), np.array([0.5, 0.5], np.float32).tobytes()),
        ),
        "g-0008": ("UPDATE moves SET player = 5 WHERE move_number = 0 AND", ()),
        "g-0009": ("UPDATE moves SET move_number = 99 WHERE move_number = 2 AND", ()),
        "g-0010": ("UPDATE games SET move_count = 99", ()),
        "g-0011": ("UPDATE moves SET player = 'x' WHERE move_number = 1 AND", ()),
        "g-0012": ("UPDATE games SET board_type = 'hex'", ()),
        "g-0013": ("UPDATE games SET game_id = CAST(game_id AS BLOB)", ()),
        "g-0014": ("UPDATE games SET game_id = 'two' || char(10) || 'lines'", ()),
    }
    for game_id, (statement, params) in breakages.items():
        where = " game_id = ?" if statement.endswith("AND") else " WHERE game_id = ?"
        sql(path, statement + where, *params, game_id)

    summary = export(tmp_path)

    assert summary.skipped == {
        "bad_game_id": 2,
        "bad_moves": 4,
        "bad_policy": 3,
        "bad_result": 1,
        "bad_state": 2,
        "config_mismatch": 1,
        "missing_result": 1,
        "no_moves": 1,
    }
    assert summary.policy_dropped == {"games": 3, "moves": 3}
    good = [g for g in games if g.game_id not in breakages]
    metadata = assert_dataset(summary.output_path, good)
    assert metadata["skipped_games"] == summary.skipped
    assert metadata["policy_dropped"] == summary.policy_dropped


@pytest.fixture
def locked_store(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "games" / "locked.db"
    write_games(path, make_games(7, 2, "locked"))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    yield path, conn
    conn.close()


def test_a_locked_store_is_retried_then_skipped(
    tmp_path: Path, locked_store: tuple[Path, sqlite3.Connection]
) -> None:
    write_games(tmp_path / "games" / "ok.db", make_games(8, 3, "ok"))

    summary = export(tmp_path)

    assert summary.games == 3
    assert [(s.path, s.reason) for s in summary.stores_skipped] == [
        (str(locked_store[0]), "locked")
    ]


def test_a_store_unlocked_during_backoff_is_exported(
    tmp_path: Path, locked_store: tuple[Path, sqlite3.Connection]
) -> None:
    timer = threading.Timer(0.05, locked_store[1].close)
    timer.start()
    summary = export(tmp_path, lock_attempts=6, lock_backoff_s=0.02)
    timer.join()
    assert summary.games == 2 and summary.stores_skipped == []


def test_unreadable_and_foreign_stores_are_skipped_by_name(tmp_path: Path) -> None:
    games_dir = tmp_path / "games"
    write_games(games_dir / "good.db", make_games(1, 2, "good"))
    games_dir.joinpath("garbage.db").write_bytes(np.random.default_rng(0).bytes(4096))
    write_games(games_dir / "future.db", make_games(2, 2, "future"))
    sql(games_dir / "future.db", "UPDATE meta SET value = '7' WHERE key = 'format_version'")
    write_games(games_dir / "shape.db", [], msgspec.structs.replace(SPEC, state_shape=(27,)))
    write_games(games_dir / "other.db", [], msgspec.structs.replace(SPEC, board_type="hex"))

    summary = export(tmp_path)

    assert summary.games == 2 and summary.stores_other_config == 1
    assert {(Path(s.path).name, s.reason) for s in summary.stores_skipped} == {
        ("garbage.db", "corrupt"),
        ("future.db", "unsupported_format"),
        ("shape.db", "spec_mismatch"),
    }
    metadata = json.loads(str(load(summary.output_path)["metadata"]))
    assert len(metadata["stores_skipped"]) == 3


def test_nothing_usable_fails_and_keeps_the_previous_file(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 2, "g", moves=3))
    previous = Path(export(tmp_path).output_path).read_bytes()

    with pytest.raises(ExportError, match="no usable games for tictactoe_2p"):
        export(tmp_path, min_moves=50)
    with pytest.raises(ExportError, match="no usable game store"):
        export(tmp_path, board_type="hex")
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path, games_dir=str(tmp_path / "missing"))

    assert (tmp_path / "out" / "data.npz").read_bytes() == previous


def test_an_unwritable_output_fails_cleanly(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 2, "g"))
    (tmp_path / "out" / "data.npz").mkdir(parents=True)  # a directory where the file goes
    with pytest.raises(ExportError, match=r"data\.npz"):
        export(tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".data.npz.lock", "data.npz"]


def test_cli_prints_one_json_line_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 3, "g"))
    monkeypatch.chdir(tmp_path)
    argv = ["export", "--board-type", "tictactoe", "--num-players", "2"]
    argv += ["--games-dir", "games", "--output", "out/data.npz", "--no-progress"]

    assert main([*argv, "--min-moves", "10"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["output_path"] == str(tmp_path / "out" / "data.npz")
    assert (result["games"], result["samples"]) == (3, 10 + 11 + 12)
    assert result["skipped"] == {} and result["stores_skipped"] == []
    assert len(result["sha256"]) == 64 and result["bytes"] > 0

    assert main([*argv, "--min-moves", "99"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no usable games" in captured.err

    assert main([*argv, "--min-moves", "-1"]) == 2
    assert "min_moves" in capsys.readouterr().err
