"""The OpenSpiel selfplay node: plays games with MCTS, writes them to its own game store and
publishes ``selfplay.complete`` per batch. open-spiel is the optional ``selfplay`` extra."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import numpy as np
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext

from consumer.export.gamestore import GameStore, StoreError, StoreSpec
from consumer.publish import publish_selfplay
from consumer.streams import ensure_streams
from schemas.events import MAX_GAMES_PER_EVENT, SelfplayCompleted, encoder, utc_now
from schemas.subjects import InvalidConfigKey, config_key

if TYPE_CHECKING:
    import pyspiel

log = logging.getLogger(__name__)

# The first plies sample the action in proportion to the root visit counts so games
# diverge; later plies take the most visited action (ties broken at random).
SAMPLED_MOVES = 4
UCT_C = 2.0  # OpenSpiel's MCTS example default
CONNECT_TIMEOUT_S = 30.0
# Retries reuse the event id as Nats-Msg-Id, so the stream drops a repeat that did land.
PUBLISH_ATTEMPTS = 5
PUBLISH_BACKOFF_S = 1.0
# The node id names the store file and travels in a NATS header.
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STORE_SUFFIXES = (".db", ".sqlite")  # what the exporter discovers


class SelfplayError(Exception):
    """A setting or an environment this node cannot play with; the message says why."""


class SelfplayOptions(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    games_dir: Path
    game: str
    board_type: str
    num_players: int
    games: int
    simulations: int = 25
    node_id: str
    seed: int | None = None
    batch_size: int | None = None  # None: all games in one batch
    db_name: str | None = None  # default: <node_id>.db


class PlayedMove(msgspec.Struct, frozen=True):
    state: np.ndarray
    player: int
    action: int
    policy_actions: np.ndarray  # int32, actions the search visited
    policy_probs: np.ndarray  # float32, visits / total


class PlayedGame(msgspec.Struct, frozen=True):
    moves: list[PlayedMove]
    returns: list[float]


class BatchResult(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    batch_id: str
    games: int
    moves: int
    seconds: float


class SelfplaySummary(msgspec.Struct, kw_only=True):
    node_id: str
    config: str
    game: str
    db_path: str  # absolute
    seed: int  # the entropy actually used: pass it as --seed to replay the run
    games: int = 0
    moves: int = 0
    batches: int = 0
    seconds: float = 0.0


def play_game(game: pyspiel.Game, bots: list[Any], rng: np.random.Generator) -> PlayedGame:
    """Play one game, ``bots[p]`` (an OpenSpiel ``MCTSBot``) searching for player ``p``."""
    shape = tuple(game.observation_tensor_shape())
    state = game.new_initial_state()
    moves: list[PlayedMove] = []
    while not state.is_terminal():
        if state.is_chance_node():
            outcomes, probs = zip(*state.chance_outcomes(), strict=True)
            state.apply_action(int(rng.choice(outcomes, p=probs)))
            continue
        player = state.current_player()
        root = bots[player].mcts_search(state)
        visited = sorted((c.action, c.explore_count) for c in root.children if c.explore_count)
        actions = np.array([a for a, _ in visited], dtype=np.int32)
        visits = np.array([n for _, n in visited], dtype=np.float64)
        policy = visits / visits.sum()
        if len(moves) < SAMPLED_MOVES:
            action = int(rng.choice(actions, p=policy))
        else:
            action = int(rng.choice(actions[visits == visits.max()]))
        observation = np.asarray(state.observation_tensor(player), dtype=np.float32)
        moves.append(
            PlayedMove(
                state=observation.reshape(shape),
                player=player,
                action=action,
                policy_actions=actions,
                policy_probs=policy.astype(np.float32),
            )
        )
        state.apply_action(action)
    return PlayedGame(moves=moves, returns=[float(r) for r in state.returns()])


def load_game(name: str, num_players: int) -> pyspiel.Game:
    """Load an OpenSpiel game and check that this node can play and record it."""
    pyspiel, _ = _import_openspiel()
    # Checked first: on an unknown name OpenSpiel prints every game it knows to stderr.
    if name.split("(", 1)[0] not in pyspiel.registered_names():
        raise SelfplayError(f"unknown OpenSpiel game {name!r}; see pyspiel.registered_names()")
    try:
        game = pyspiel.load_game(name)
    except pyspiel.SpielError as exc:
        raise SelfplayError(f"cannot load game {name!r}: {exc}") from exc
    kind = game.get_type()
    if kind.dynamics != pyspiel.GameType.Dynamics.SEQUENTIAL:
        raise SelfplayError(f"{name}: simultaneous-move games are not supported")
    if kind.reward_model != pyspiel.GameType.RewardModel.TERMINAL:
        raise SelfplayError(f"{name}: MCTS needs a game with terminal rewards")
    if kind.information != pyspiel.GameType.Information.PERFECT_INFORMATION:
        # MCTSBot searches the true state: the policy targets would leak hidden information.
        raise SelfplayError(f"{name}: only perfect-information games are supported")
    if not kind.provides_observation_tensor:
        raise SelfplayError(f"{name}: the game has no observation tensor to record")
    if game.num_players() != num_players:
        raise SelfplayError(
            f"{name} is a {game.num_players()}-player game, but --num-players is {num_players}"
        )
    return game


def _store_spec(options: SelfplayOptions, game: pyspiel.Game) -> StoreSpec:
    return StoreSpec(
        board_type=options.board_type,
        num_players=options.num_players,
        game=options.game,
        state_shape=tuple(game.observation_tensor_shape()),
        state_dtype="float32",
        num_actions=game.num_distinct_actions(),
    )


async def run_selfplay(
    options: SelfplayOptions,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> SelfplaySummary:
    """Play ``options.games`` games in batches; after each batch is committed to the
    store, publish one ``SelfplayCompleted`` for it."""
    db_path = _check_options(options)
    game = load_game(options.game, options.num_players)
    spec = _store_spec(options, game)
    store_path = options.games_dir / db_path
    GameStore.open(store_path, spec).close()  # fail on a foreign store before playing
    seed = secrets.randbits(63) if options.seed is None else options.seed
    search_seed, play_seed = np.random.SeedSequence(seed).spawn(2)
    # MCTSBot wants the legacy RandomState API; one stream for search, one for our choices.
    search_random = np.random.RandomState(np.random.MT19937(search_seed))
    # MCTSBot keeps nothing between searches, so every seat can share one.
    bots = [_make_bot(game, options.simulations, search_random)] * options.num_players
    rng = np.random.default_rng(play_seed)
    summary = SelfplaySummary(
        node_id=options.node_id,
        config=config_key(options.board_type, options.num_players),
        game=options.game,
        db_path=str(store_path.absolute()),
        seed=seed,
    )
    nc = await _connect(options.nats_url)
    stop = threading.Event()
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        batch_size = options.batch_size or options.games
        for number, first in enumerate(range(0, options.games, batch_size), start=1):
            count = min(batch_size, options.games - first)
            started = time.perf_counter()
            # A thread keeps the event loop free to answer server PINGs during a long batch.
            games, moves = await asyncio.to_thread(
                _play_batch, store_path, spec, game, bots, rng, count, options.node_id, stop
            )
            batch_id, event_id = str(uuid.uuid4()), str(uuid.uuid4())
            event = SelfplayCompleted(
                event_id=event_id,
                board_type=options.board_type,
                num_players=options.num_players,
                games=games,
                node_id=options.node_id,
                batch_id=batch_id,
                db_path=db_path,
                timestamp=utc_now(),
            )
            await _publish(js, event)
            result = BatchResult(
                number=number,
                batch_id=batch_id,
                games=games,
                moves=moves,
                seconds=round(time.perf_counter() - started, 3),
            )
            summary.games += games
            summary.moves += moves
            summary.batches += 1
            summary.seconds = round(summary.seconds + result.seconds, 3)
            if on_batch is not None:
                on_batch(result)
    finally:
        # On cancellation the batch thread ends after its current game, unannounced.
        stop.set()
        await nc.close()
    return summary


def selfplay_main(args: argparse.Namespace) -> int:
    """The ``autoexport selfplay`` command: play, print a line per batch and a JSON summary."""
    options = SelfplayOptions(
        nats_url=args.nats_url,
        games_dir=Path(args.games_dir).absolute(),
        game=args.game,
        board_type=args.board_type,
        num_players=args.num_players,
        games=args.games,
        simulations=args.simulations,
        node_id=args.node_id or default_node_id(),
        seed=args.seed,
        batch_size=args.batch_size,
        db_name=args.db_name,
    )
    try:
        summary = asyncio.run(run_selfplay(options, on_batch=_print_batch))
    except SelfplayError as exc:
        print(f"autoexport selfplay: {exc}", file=sys.stderr)
        return 2
    except (StoreError, sqlite3.Error, NatsError, OSError) as exc:
        print(f"autoexport selfplay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autoexport selfplay: interrupted", file=sys.stderr)
        return 130
    print(encoder.encode(summary).decode())
    return 0


def default_node_id() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:128] or "node"


def _print_batch(result: BatchResult) -> None:
    print(
        f"batch {result.number} ({result.batch_id}): {result.games} games, "
        f"{result.moves} moves, {result.seconds:.2f} s",
        flush=True,
    )


def _check_options(options: SelfplayOptions) -> str:
    """Validate what would otherwise fail after a batch was played; return the store's
    path relative to the games directory."""
    try:
        config_key(options.board_type, options.num_players)
    except InvalidConfigKey as exc:
        raise SelfplayError(str(exc)) from exc
    if not _NODE_ID_RE.match(options.node_id):
        raise SelfplayError(
            f"node id {options.node_id!r}: 1-128 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    for name, value, least in (
        ("--games", options.games, 1),
        ("--simulations", options.simulations, 2),  # one simulation only expands the root
        ("--batch-size", options.batch_size, 1),
        ("--seed", options.seed, 0),
    ):
        if value is not None and value < least:
            raise SelfplayError(f"{name} must be at least {least}, got {value}")
    if (options.batch_size or options.games) > MAX_GAMES_PER_EVENT:
        raise SelfplayError(
            f"a batch may hold at most {MAX_GAMES_PER_EVENT} games: set --batch-size"
        )
    db_name = options.db_name or f"{options.node_id}.db"
    relative = PurePosixPath(db_name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in db_name:
        raise SelfplayError(f"--db-name {db_name!r} must be a path inside the games directory")
    if relative.suffix not in STORE_SUFFIXES:
        raise SelfplayError(
            f"--db-name {db_name!r} must end in {' or '.join(STORE_SUFFIXES)}, "
            "or the exporter will not find it"
        )
    return str(relative)


def _import_openspiel() -> tuple[Any, Any]:
    try:
        import pyspiel
        from open_spiel.python.algorithms import mcts
    except ImportError as exc:
        raise SelfplayError(
            "open-spiel is not installed: pip install 'autoexport[selfplay]'"
        ) from exc
    return pyspiel, mcts


def _make_bot(game: pyspiel.Game, simulations: int, random_state: np.random.RandomState) -> Any:
    _, mcts = _import_openspiel()
    evaluator = mcts.RandomRolloutEvaluator(n_rollouts=1, random_state=random_state)
    return mcts.MCTSBot(game, UCT_C, simulations, evaluator, solve=True, random_state=random_state)


def _play_batch(
    store_path: Path,
    spec: StoreSpec,
    game: pyspiel.Game,
    bots: list[Any],
    rng: np.random.Generator,
    count: int,
    node_id: str,
    stop: threading.Event,
) -> tuple[int, int]:
    """Play and store up to ``count`` games; return (games, moves) committed."""
    games = moves = 0
    # sqlite3 connections belong to the thread that opened them: open the store here.
    with GameStore.open(store_path, spec) as store:
        for _ in range(count):
            if stop.is_set():
                break
            played = play_game(game, bots, rng)
            with store.game(source=node_id) as record:
                for m in played.moves:
                    record.add_move(m.state, m.player, m.action, m.policy_actions, m.policy_probs)
                record.finish(played.returns)
            games += 1
            moves += len(played.moves)
    return games, moves


async def _connect(url: str) -> Client:
    async def log_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    try:
        # Reconnect forever once connected (the default gives up after ~2 minutes and
        # would strand finished batches), but bound the first connection.
        return await asyncio.wait_for(
            nats.connect(url, max_reconnect_attempts=-1, error_cb=log_error),
            CONNECT_TIMEOUT_S,
        )
    except TimeoutError as exc:
        raise ConnectionError(f"cannot reach NATS at {url} in {CONNECT_TIMEOUT_S:.0f} s") from exc


async def _publish(js: JetStreamContext, event: SelfplayCompleted) -> None:
    for attempt in range(PUBLISH_ATTEMPTS):
        try:
            await publish_selfplay(js, event)
            return
        except (TimeoutError, NoRespondersError) as exc:  # nats. and asyncio. timeouts
            if attempt == PUBLISH_ATTEMPTS - 1:
                raise ConnectionError(
                    f"batch {event.batch_id} ({event.games} games) is in {event.db_path} but "
                    f"was not announced: {exc!r}"
                ) from exc
            log.warning("publish of batch %s failed (%r); retrying", event.batch_id, exc)
            await asyncio.sleep(PUBLISH_BACKOFF_S * 2**attempt)
