"""Turn games read from a store into training arrays, skipping bad games by reason.

Pure: game and move rows in, arrays out; reading stores and writing files live elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

import msgspec
import numpy as np
from msgspec import Struct

from consumer.export.gamestore import GameRow, StoreSpec, policy_rows_bad

# Arrays of one encoded chunk: name -> (dtype, shape after the first axis). policy_counts
# become the output's policy_indptr; game_index counts from 0 within a chunk.
_FIXED_LAYOUT = {
    "policy_counts": "<i4",
    "policy_indices": "<i4",
    "policy_probs": "<f4",
    "values": "<f4",
    "players": "i1",
    "actions": "<i4",
    "move_numbers": "<i4",
    "game_index": "<i4",
}
PER_ENTRY_ARRAYS = frozenset({"policy_indices", "policy_probs"})


def chunk_layout(spec: StoreSpec) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    layout = {"states": (spec.dtype, spec.state_shape)}
    layout |= {name: (np.dtype(dtype), ()) for name, dtype in _FIXED_LAYOUT.items()}
    layout["values_per_seat"] = (np.dtype("<f4"), (spec.num_players,))
    return layout


class Filters(Struct, frozen=True, kw_only=True):
    min_moves: int
    include_incomplete: bool


class Encoded(Struct):
    """One batch of games as arrays; ``kept`` lists the exported game ids in order."""

    arrays: dict[str, np.ndarray]
    kept: list[str]
    skipped: dict[str, str]  # game id -> reason
    bad_policy_moves: int


def returns_problem(text: Any, num_players: int) -> str | None:
    """Why a game's stored per-seat result is unusable, or None."""
    if text is None:
        return "missing_result"
    try:
        values = msgspec.json.decode(text, type=list[float])
    except (msgspec.DecodeError, TypeError):
        return "bad_result"
    # A sum is finite only if every value is (and none is absurdly large).
    if len(values) != num_players or not math.isfinite(sum(values)):
        return "bad_result"
    return None


def triage(game: GameRow, spec: StoreSpec, filters: Filters) -> str | None:
    """Why a listed game is not exported (checks that need no moves), or None."""
    if not isinstance(game.game_id, str) or not game.game_id or "\n" in game.game_id:
        return "bad_game_id"  # ids are kept newline-separated in the cache
    if game.status == "in_progress":
        return "in_progress"
    if game.status != "completed" and not filters.include_incomplete:
        return "not_completed"
    if game.board_type != spec.board_type or game.num_players != spec.num_players:
        return "config_mismatch"
    if not isinstance(game.move_count, int) or game.move_count < filters.min_moves:
        return "too_short"
    if game.move_count == 0:
        return "no_moves"
    return returns_problem(game.returns, spec.num_players)


def empty_arrays(spec: StoreSpec) -> dict[str, np.ndarray]:
    return {
        name: np.empty((0, *shape), dtype=dtype)
        for name, (dtype, shape) in chunk_layout(spec).items()
    }


def encode_batch(spec: StoreSpec, games: Sequence[GameRow], rows: Sequence[tuple]) -> Encoded:
    """Encode ``games`` (which passed ``triage``) from their move rows, in game order.

    ``rows`` are (game_id, move_number, player, action, state, policy_actions,
    policy_probs) tuples grouped by game. If a row holds a value of the wrong SQLite type,
    the batch is encoded one game at a time so only the culprit is skipped.
    """
    columns = _columns(rows)
    if columns is not None:
        return _encode(spec, games, columns)
    if len(games) == 1:
        return Encoded(empty_arrays(spec), [], {games[0].game_id: "bad_moves"}, 0)
    by_game: dict[str, list[tuple]] = {game.game_id: [] for game in games}
    for row in rows:
        by_game[row[0]].append(row)
    parts = [encode_batch(spec, [game], by_game[game.game_id]) for game in games]
    return _concat(spec, parts)


class _Columns(NamedTuple):
    game_ids: tuple[str, ...]
    move_numbers: tuple[int, ...]
    players: tuple[int, ...]
    actions: tuple[int, ...]
    states: tuple[bytes, ...]
    policy_ids: tuple[bytes, ...]
    policy_probs: tuple[bytes, ...]


def _columns(rows: Sequence[tuple]) -> _Columns | None:
    """The rows as columns, or None if a value has the wrong type (SQLite does not
    enforce column types, and other writers exist)."""
    if not rows:
        return _Columns((), (), (), (), (), (), ())
    columns = _Columns(*zip(*rows, strict=True))
    ints = chain(columns.move_numbers, columns.players, columns.actions)
    blobs = chain(columns.states, columns.policy_ids, columns.policy_probs)
    if {int}.issuperset(map(type, ints)) and {bytes}.issuperset(map(type, blobs)):
        return columns
    return None


def _concat(spec: StoreSpec, parts: list[Encoded]) -> Encoded:
    arrays = {}
    for name, (dtype, _) in chunk_layout(spec).items():
        pieces = [part.arrays[name] for part in parts]
        if name == "game_index":
            offsets = np.cumsum([0] + [len(part.kept) for part in parts[:-1]])
            pieces = [piece + offset for piece, offset in zip(pieces, offsets, strict=True)]
        arrays[name] = np.concatenate(pieces).astype(dtype, copy=False)
    return Encoded(
        arrays=arrays,
        kept=[game_id for part in parts for game_id in part.kept],
        skipped={k: v for part in parts for k, v in part.skipped.items()},
        bad_policy_moves=sum(part.bad_policy_moves for part in parts),
    )


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _per_game_any(game_of_row: np.ndarray, flags: np.ndarray, num_games: int) -> np.ndarray:
    return np.bincount(game_of_row, weights=flags, minlength=num_games) > 0


def _encode(spec: StoreSpec, games: Sequence[GameRow], columns: _Columns) -> Encoded:
    num_games, num_players, num_actions = len(games), spec.num_players, spec.num_actions
    position = {game.game_id: i for i, game in enumerate(games)}
    n = len(columns.game_ids)
    game_ids, move_numbers, players, actions, states, policy_ids, policy_probs = columns
    # Rows arrive grouped by game id; put them in the order of ``games`` (the store's).
    game_of_row = np.fromiter((position[g] for g in game_ids), np.int64, n)
    order = np.argsort(game_of_row, kind="stable")
    game_of_row = game_of_row[order]
    move_number = np.fromiter(move_numbers, np.int64, n)[order]
    player = np.fromiter(players, np.int64, n)[order]
    action = np.fromiter(actions, np.int64, n)[order]
    state_len = np.fromiter(map(len, states), np.int64, n)[order]
    ids_len = np.fromiter(map(len, policy_ids), np.int64, n)[order]
    probs_len = np.fromiter(map(len, policy_probs), np.int64, n)[order]

    reason = np.full(num_games, "", dtype=object)
    first_row = np.searchsorted(game_of_row, np.arange(num_games))
    expected = np.array([game.move_count for game in games], dtype=np.int64)
    bad_row = (
        (move_number != np.arange(n) - first_row[game_of_row])
        | (player < 0)
        | (player >= num_players)
        | (action < 0)
        | (action >= num_actions)
    )
    bad = _per_game_any(game_of_row, bad_row, num_games)
    bad |= np.bincount(game_of_row, minlength=num_games) != expected
    reason[bad] = "bad_moves"
    bad_state = ~bad & _per_game_any(game_of_row, state_len != spec.state_nbytes, num_games)
    reason[bad_state] = "bad_state"
    bad_shape = (ids_len != probs_len) | (ids_len == 0) | (ids_len % 4 != 0)
    bad_policy = ~bad & ~bad_state & _per_game_any(game_of_row, bad_shape, num_games)
    reason[bad_policy] = "bad_policy"
    bad_policy_moves = int(bad_shape[~(bad | bad_state)[game_of_row]].sum())

    # Decode the rows of games still good, then check values that need the decoded arrays.
    keep = (reason == "")[game_of_row]
    rows_kept = order[keep]
    game_kept = game_of_row[keep]
    k = len(rows_kept)
    state = np.frombuffer(b"".join([states[i] for i in rows_kept]), dtype=spec.dtype)
    state = state.reshape(k, *spec.state_shape)
    counts = ids_len[keep] // 4
    ids = np.frombuffer(b"".join([policy_ids[i] for i in rows_kept]), dtype="<i4")
    probs = np.frombuffer(b"".join([policy_probs[i] for i in rows_kept]), dtype="<f4")
    if spec.dtype.kind == "f" and k:
        nonfinite = ~np.isfinite(state.reshape(k, -1)).all(axis=1)
        newly = _per_game_any(game_kept, nonfinite, num_games) & (reason == "")
        reason[newly] = "bad_state"
    move_policy_bad = policy_rows_bad(ids, probs, counts, num_actions)
    move_policy_bad &= (reason == "")[game_kept]
    bad_policy_moves += int(move_policy_bad.sum())
    newly = _per_game_any(game_kept, move_policy_bad, num_games) & (reason == "")
    reason[newly] = "bad_policy"

    final = (reason == "")[game_kept]
    entry_final = np.repeat(final, counts)
    good_games = np.flatnonzero(reason == "")
    local_index = np.cumsum(reason == "") - 1
    # Results were validated by triage: decode the batch's in one call.
    text = b"[" + b",".join(_as_bytes(games[i].returns) for i in good_games) + b"]"
    returns = np.zeros((num_games, num_players), dtype="<f4")
    returns[good_games] = np.array(msgspec.json.decode(text), dtype="<f4").reshape(-1, num_players)
    game_final = game_kept[final]
    per_seat = returns[game_final]
    mover = player[keep][final]
    arrays = {
        "states": state[final],
        "policy_counts": counts[final].astype("<i4"),
        "policy_indices": ids[entry_final],
        "policy_probs": probs[entry_final],
        "values": per_seat[np.arange(len(game_final)), mover],
        "players": mover.astype("i1"),
        "actions": action[keep][final].astype("<i4"),
        "move_numbers": move_number[keep][final].astype("<i4"),
        "game_index": local_index[game_final].astype("<i4"),
        "values_per_seat": per_seat,
    }
    return Encoded(
        arrays=arrays,
        kept=[games[i].game_id for i in good_games],
        skipped={games[i].game_id: str(reason[i]) for i in np.flatnonzero(reason != "")},
        bad_policy_moves=bad_policy_moves,
    )
