"""The game store: writer API, what readers see, format checks. Also holds the helpers that
write real stores for the exporter tests (``test_export_*.py`` import them)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pytest

from consumer.export.gamestore import (
    GameStore,
    StoreCorrupt,
    StoreReader,
    StoreSpec,
    StoreSpecMismatch,
    UnsupportedFormat,
    read_store_meta,
    winner_of,
)

SPEC = StoreSpec(
    board_type="tictactoe",
    num_players=2,
    game="tic_tac_toe",
    state_shape=(3, 3, 3),
    state_dtype="float32",
    num_actions=9,
)


class Move(NamedTuple):
    state: np.ndarray
    player: int
    action: int
    policy_ids: np.ndarray
    policy_probs: np.ndarray


class Game(NamedTuple):
    game_id: str
    moves: list[Move]
    returns: list[float]


def make_game(
    rng: np.random.Generator, game_id: str, num_moves: int, spec: StoreSpec = SPEC
) -> Game:
    moves = []
    for i in range(num_moves):
        size = int(rng.integers(1, spec.num_actions + 1))
        ids = rng.choice(spec.num_actions, size, replace=False).astype(np.int32)
        probs = rng.random(size).astype(np.float32) + 0.01
        probs /= probs.sum()
        state = rng.random(spec.state_shape).astype(spec.state_dtype)
        moves.append(Move(state, i % spec.num_players, int(ids[0]), ids, probs))
    result = [float(rng.choice([-1.0, 0.0, 1.0])) for _ in range(spec.num_players)]
    return Game(game_id, moves, result)


def make_games(seed: int, count: int, prefix: str, moves: int = 10) -> list[Game]:
    rng = np.random.default_rng(seed)
    return [make_game(rng, f"{prefix}-{i:04d}", moves + i % 3) for i in range(count)]


def write_games(
    path: Path, games: Sequence[Game], spec: StoreSpec = SPEC, *, finish: bool = True
) -> None:
    with GameStore.open(path, spec) as store:
        for game in games:
            with store.game(game.game_id, source=path.stem) as writer:
                for move in game.moves:
                    writer.add_move(*move)
                if finish:
                    writer.finish(game.returns)
                else:
                    writer.abandon(game.returns)


def sql(path: Path, statement: str, *params: object) -> None:
    """Change a store behind the writer's back (to build the bad inputs other writers make)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement, params)
    conn.close()


def test_round_trip_through_reader(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    games = make_games(1, 2, "g")
    write_games(path, games)

    with StoreReader(path) as reader:
        assert reader.meta.format_version == 1
        assert reader.meta.spec == SPEC
        rows = reader.games()
        assert [r.game_id for r in rows] == ["g-0000", "g-0001"]
        assert [r.status for r in rows] == ["completed", "completed"]
        assert [json.loads(r.returns) for r in rows] == [g.returns for g in games]
        assert [r.move_count for r in rows] == [len(g.moves) for g in games]
        moves = reader.moves(["g-0001"])
    expected = games[1].moves
    assert [m[1] for m in moves] == list(range(len(expected)))
    for (_, _, player, action, state, ids, probs), move in zip(moves, expected, strict=True):
        assert (player, action) == (move.player, move.action)
        assert np.array_equal(np.frombuffer(state, "<f4").reshape(3, 3, 3), move.state)
        assert np.array_equal(np.frombuffer(ids, "<i4"), move.policy_ids)
        assert np.array_equal(np.frombuffer(probs, "<f4"), move.policy_probs)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    conn.close()
    assert json.loads(meta["state_shape"]) == [3, 3, 3]
    assert meta["state_dtype"] == "float32" and meta["num_actions"] == "9"


def test_reopen_checks_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    GameStore.open(path, SPEC).close()
    GameStore.open(path, SPEC).close()
    other = msgspec.structs.replace(SPEC, state_shape=(27,))
    with pytest.raises(StoreSpecMismatch, match="state=\\[3, 3, 3\\]"):
        GameStore.open(path, other)


def test_a_failed_or_unfinished_game_is_never_completed(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    (game,) = make_games(2, 1, "g")
    with GameStore.open(path, SPEC) as store:
        with pytest.raises(RuntimeError), store.game("crashed") as writer:
            writer.add_move(*game.moves[0])
            raise RuntimeError("engine died")
        with store.game("forgotten") as writer:
            writer.add_move(*game.moves[0])
    with StoreReader(path) as reader:
        rows = {r.game_id: r for r in reader.games()}
    assert {r.status for r in rows.values()} == {"abandoned"}
    assert rows["crashed"].returns is None and rows["crashed"].move_count == 1


def test_a_game_in_play_is_invisible_to_readers(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    (game,) = make_games(3, 1, "g")
    with GameStore.open(path, SPEC) as store, store.game("live") as writer:
        for move in game.moves:
            writer.add_move(*move)
        with StoreReader(path) as reader:
            assert reader.games() == []
        writer.finish(game.returns)
        with StoreReader(path) as reader:
            assert [r.status for r in reader.games()] == ["completed"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"state": np.zeros(27)}, "state shape"),
        ({"player": 2}, "player"),
        ({"action": 9}, "action"),
        ({"policy_ids": [0, 9], "policy_probs": [0.5, 0.5]}, "policy"),
        ({"policy_ids": [1, 1], "policy_probs": [0.5, 0.5]}, "policy"),
        ({"policy_ids": [0, 1], "policy_probs": [0.5, 0.4]}, "policy"),
        ({"policy_ids": [], "policy_probs": []}, "policy"),
    ],
)
def test_add_move_rejects_bad_values(tmp_path: Path, change: dict, match: str) -> None:
    (game,) = make_games(4, 1, "g")
    move = game.moves[0]._replace(**change)
    with GameStore.open(tmp_path / "node.db", SPEC) as store, store.game() as writer:
        with pytest.raises(ValueError, match=match):
            writer.add_move(*move)
        with pytest.raises(ValueError, match="returns"):
            writer.finish([1.0])


def test_winner_is_the_unique_best_seat() -> None:
    assert winner_of([1.0, -1.0]) == 0
    assert winner_of([-1.0, 0.0, 1.0]) == 2
    assert winner_of([0.0, 0.0]) is None
    assert winner_of([1.0, 1.0, -1.0]) is None


def test_spec_validation() -> None:
    with pytest.raises(msgspec.ValidationError, match="board_type"):
        msgspec.structs.replace(SPEC, board_type="Tic Tac")
    with pytest.raises(ValueError, match="state_dtype"):
        msgspec.structs.replace(SPEC, state_dtype="object")
    with pytest.raises(msgspec.ValidationError, match="state_shape"):
        msgspec.structs.replace(SPEC, state_shape=(3, 0))


def test_unreadable_stores_raise_store_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(StoreCorrupt):
        read_store_meta(garbage)
    plain = tmp_path / "plain.db"
    sql(plain, "CREATE TABLE t (x)")
    with pytest.raises(StoreCorrupt, match="not a game store"):
        read_store_meta(plain)
    future = tmp_path / "future.db"
    GameStore.open(future, SPEC).close()
    sql(future, "UPDATE meta SET value = '2' WHERE key = 'format_version'")
    with pytest.raises(UnsupportedFormat, match="format 2"):
        read_store_meta(future)
    with pytest.raises(UnsupportedFormat):
        GameStore.open(future, SPEC)


def test_reader_lists_games_by_rowid(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    write_games(path, make_games(1, 5, "g"))

    with StoreReader(path) as reader:
        assert [r.rowid for r in reader.games()] == [1, 2, 3, 4, 5]
        assert [r.game_id for r in reader.games(after=3)] == ["g-0003", "g-0004"]
        assert [r.game_id for r in reader.games_at([4, 2, 9])] == ["g-0001", "g-0003"]
        assert (reader.count_games(), reader.count_games(after=3)) == (5, 2)
        assert reader.id_hex(1) == b"g-0000".hex().upper()
        assert reader.id_hex(9) is None
