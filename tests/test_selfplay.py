"""The OpenSpiel selfplay node against real games, a real nats-server and real stores."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyspiel
import pytest
from nats.aio.client import Client
from nats.js.api import RawStreamMsg

from consumer.cli import main
from consumer.embedded import EmbeddedServer
from consumer.export.gamestore import StoreSpecMismatch
from consumer.selfplay import (
    BatchResult,
    SelfplayError,
    SelfplayOptions,
    load_game,
    run_selfplay,
)
from schemas.events import SelfplayCompleted, selfplay_decoder
from schemas.subjects import EVENTS_STREAM


def make_options(server: EmbeddedServer, games_dir: Path, **overrides: Any) -> SelfplayOptions:
    fields: dict[str, Any] = {
        "nats_url": server.url,
        "games_dir": games_dir,
        "game": "tic_tac_toe",
        "board_type": "tictactoe",
        "num_players": 2,
        "games": 4,
        "simulations": 8,
        "node_id": "node1",
        "seed": 1,
    }
    return SelfplayOptions(**(fields | overrides))


async def stream_messages(nc: Client) -> list[RawStreamMsg]:
    js = nc.jetstream()
    state = (await js.stream_info(EVENTS_STREAM)).state
    if state.messages == 0:
        return []
    return [await js.get_msg(EVENTS_STREAM, seq) for seq in range(1, state.last_seq + 1)]


def events_of(messages: list[RawStreamMsg]) -> list[SelfplayCompleted]:
    return [selfplay_decoder.decode(msg.data or b"") for msg in messages]


class StoredGame(NamedTuple):
    game_id: str
    status: str
    winner: int | None
    returns: str | None
    move_count: int
    source: str


class StoredMove(NamedTuple):
    game_id: str
    move_number: int
    player: int
    action: int
    state: bytes
    policy_actions: bytes
    policy_probs: bytes


def read_store(path: Path) -> tuple[dict[str, str], list[tuple[StoredGame, list[StoredMove]]]]:
    """The meta table and the games with their moves, read as docs/GAME_STORE.md says."""
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        games = [
            StoredGame(*row)
            for row in db.execute(
                "SELECT game_id, status, winner, returns, move_count, source"
                " FROM games ORDER BY rowid"
            )
        ]
        moves = [
            StoredMove(*row)
            for row in db.execute(
                "SELECT game_id, move_number, player, action, state, policy_actions,"
                " policy_probs FROM moves ORDER BY game_id, move_number"
            )
        ]
    return meta, [(g, [m for m in moves if m.game_id == g.game_id]) for g in games]


def read_games(path: Path) -> list[tuple[StoredGame, list[StoredMove]]]:
    return read_store(path)[1]


def assert_replays_in_openspiel(path: Path, game_name: str) -> None:
    """Every stored game replays in the engine: same players, observations, legal actions
    and results; policies are distributions over legal actions holding the chosen one."""
    game = pyspiel.load_game(game_name)
    for row, moves in read_games(path):
        assert row.status == "completed"
        assert row.move_count == len(moves) > 0
        assert [m.move_number for m in moves] == list(range(len(moves)))
        state = game.new_initial_state()
        for move in moves:
            assert move.player == state.current_player()
            observation = np.frombuffer(move.state, dtype="<f4")
            assert observation.size == np.prod(game.observation_tensor_shape())
            np.testing.assert_array_equal(observation, state.observation_tensor(move.player))
            actions = np.frombuffer(move.policy_actions, dtype="<i4")
            probs = np.frombuffer(move.policy_probs, dtype="<f4")
            assert set(actions) <= set(state.legal_actions())
            assert move.action in actions
            assert probs.min() > 0
            assert probs.sum() == pytest.approx(1.0, abs=1e-5)
            state.apply_action(move.action)
        assert state.is_terminal()
        assert json.loads(row.returns or "null") == state.returns()


async def test_plays_stores_and_announces_one_batch(
    nats_server: EmbeddedServer, nc: Client, tmp_path: Path
) -> None:
    games_dir = tmp_path / "games"
    summary = await run_selfplay(make_options(nats_server, games_dir, games=5))

    store = games_dir / "node1.db"
    assert (summary.games, summary.batches, summary.db_path) == (5, 1, str(store))
    meta, games = read_store(store)
    assert json.loads(meta["state_shape"]) == [3, 3, 3]
    assert (meta["state_dtype"], meta["num_actions"], meta["game"]) == (
        "float32",
        "9",
        "tic_tac_toe",
    )
    assert len(games) == 5
    assert summary.moves == sum(row.move_count for row, _ in games)
    for row, _ in games:
        returns = json.loads(row.returns or "null")
        assert returns in ([1.0, -1.0], [-1.0, 1.0], [0.0, 0.0])
        assert row.winner == (returns.index(1.0) if 1.0 in returns else None)
        assert row.source == "node1"
    assert_replays_in_openspiel(store, "tic_tac_toe")

    [message] = await stream_messages(nc)
    [event] = events_of([message])
    assert message.subject == "selfplay.complete.tictactoe_2p"
    assert message.headers == {"Nats-Msg-Id": event.event_id}
    assert (event.games, event.node_id, event.db_path) == (5, "node1", "node1.db")
    assert event.batch_id != event.event_id
    assert games_dir / event.db_path == store


async def test_each_batch_is_committed_then_announced(
    nats_server: EmbeddedServer, nc: Client, tmp_path: Path
) -> None:
    games_dir = tmp_path / "games"
    seen: list[tuple[BatchResult, int]] = []

    def on_batch(result: BatchResult) -> None:
        # Called after the publish, so the store must already hold the batch.
        seen.append((result, len(read_games(games_dir / "node1.db"))))

    options = make_options(nats_server, games_dir, games=5, batch_size=2)
    summary = await run_selfplay(options, on_batch=on_batch)

    assert [(r.games, stored) for r, stored in seen] == [(2, 2), (2, 4), (1, 5)]
    events = events_of(await stream_messages(nc))
    assert [e.games for e in events] == [2, 2, 1]
    assert [e.batch_id for e in events] == [r.batch_id for r, _ in seen]
    assert len({e.batch_id for e in events}) == 3
    assert (summary.games, summary.batches) == (5, 3)
    assert summary.moves == sum(r.moves for r, _ in seen)


async def test_two_nodes_write_two_stores_and_two_events(
    nats_server: EmbeddedServer, nc: Client, tmp_path: Path
) -> None:
    games_dir = tmp_path / "games"
    await asyncio.gather(
        run_selfplay(make_options(nats_server, games_dir, node_id="alpha", seed=1)),
        run_selfplay(make_options(nats_server, games_dir, node_id="beta", seed=2)),
    )

    assert sorted(p.name for p in games_dir.glob("*.db")) == ["alpha.db", "beta.db"]
    events = events_of(await stream_messages(nc))
    assert sorted((e.node_id, e.db_path, e.games) for e in events) == [
        ("alpha", "alpha.db", 4),
        ("beta", "beta.db", 4),
    ]
    ids = [
        row.game_id for name in ("alpha.db", "beta.db") for row, _ in read_games(games_dir / name)
    ]
    assert len(set(ids)) == 8


async def test_same_seed_plays_the_same_games(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    games_dir = tmp_path / "games"
    for node in ("first", "second", "other"):
        seed = 9 if node == "other" else 7
        await run_selfplay(make_options(nats_server, games_dir, node_id=node, seed=seed))

    def played(node: str) -> list[list[tuple[int, bytes]]]:
        games = read_games(games_dir / f"{node}.db")
        return [[(m.action, m.policy_probs) for m in moves] for _, moves in games]

    assert played("first") == played("second")
    assert played("first") != played("other")


async def test_chance_nodes_are_sampled_not_recorded(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    games_dir = tmp_path / "games"
    options = make_options(
        nats_server, games_dir, game="pig(winscore=10)", board_type="pig", games=2
    )
    summary = await run_selfplay(options)

    games = read_games(games_dir / "node1.db")
    assert summary.games == len(games) == 2
    for row, moves in games:
        assert {m.player for m in moves} <= {0, 1}
        assert sorted(json.loads(row.returns)) == [-1.0, 1.0]


@pytest.mark.parametrize(
    ("game", "players", "message"),
    [
        ("tic_tac_toe", 3, "tic_tac_toe is a 2-player game, but --num-players is 3"),
        ("goofspiel", 2, "simultaneous-move games are not supported"),
        ("kuhn_poker", 2, "only perfect-information games are supported"),
        ("no_such_game", 2, "unknown OpenSpiel game 'no_such_game'"),
    ],
)
def test_load_game_rejects_what_it_cannot_record(game: str, players: int, message: str) -> None:
    with pytest.raises(SelfplayError, match=message):
        load_game(game, players)


async def test_a_store_of_another_game_is_refused_before_playing(
    nats_server: EmbeddedServer, nc: Client, tmp_path: Path
) -> None:
    games_dir = tmp_path / "games"
    await run_selfplay(make_options(nats_server, games_dir, games=1))
    other = make_options(nats_server, games_dir, game="connect_four", board_type="connectfour")
    with pytest.raises(StoreSpecMismatch):
        await run_selfplay(other)
    assert len(await stream_messages(nc)) == 1


def test_cli_plays_and_prints_a_json_summary(
    nats_server: EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    games_dir = tmp_path / "games"
    argv = [
        "selfplay", "--nats-url", nats_server.url, "--games-dir", str(games_dir),
        "--game", "tic_tac_toe", "--board-type", "tictactoe", "--num-players", "2",
        "--games", "3", "--simulations", "8", "--batch-size", "2", "--node-id", "cli",
        "--seed", "3", "--db-name", "nodes/cli.db",
    ]  # fmt: skip
    assert main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("batch 1 (") and "2 games" in lines[0]
    assert lines[1].startswith("batch 2 (") and "1 games" in lines[1]
    summary = json.loads(lines[-1])
    assert summary["games"] == 3
    assert summary["seed"] == 3
    assert summary["db_path"] == str(games_dir / "nodes" / "cli.db")
    assert len(read_games(games_dir / "nodes" / "cli.db")) == 3

    async def announced() -> list[SelfplayCompleted]:
        import nats

        client = await nats.connect(nats_server.url)
        try:
            return events_of(await stream_messages(client))
        finally:
            await client.close()

    events = asyncio.run(announced())
    assert [(e.games, e.db_path) for e in events] == [(2, "nodes/cli.db"), (1, "nodes/cli.db")]


def test_cli_reports_a_player_count_mismatch(
    nats_server: EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    games_dir = tmp_path / "games"
    argv = [
        "selfplay", "--nats-url", nats_server.url, "--games-dir", str(games_dir),
        "--game", "tic_tac_toe", "--board-type", "tictactoe", "--num-players", "4",
        "--games", "1",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "autoexport selfplay: tic_tac_toe is a 2-player game, but --num-players is 4"
    )
    assert not games_dir.exists()
