"""Synthetic game stores with byte-heavy states, written through the game store writer API.

``bench/export_bench.py`` (``fill``) makes stores of tiny tic-tac-toe states; these hold
states the size of a real board encoding, so the exporter's figures are byte-bound, not
only per-sample-bound. They declare the same config (``tictactoe_2p``) so the exporter
helpers in ``export_bench`` run on them unchanged; the spec tells them apart.
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from pathlib import Path

import numpy as np

from consumer.export.gamestore import GameStore, StoreSpec

SPEC = StoreSpec(
    board_type="tictactoe",
    num_players=2,
    game="synthetic-6x8x8",
    state_shape=(6, 8, 8),  # 1.5 KiB of float32 per move
    state_dtype="float32",
    num_actions=65,
)
MOVES = 30
POLICY_ENTRIES = 16


def write_store(path: Path, games: int, seed: int) -> None:
    """``games`` completed games of ``MOVES`` moves through ``GameStore``/``GameWriter``."""
    rng = np.random.default_rng(seed)
    states = rng.random((MOVES, *SPEC.state_shape), dtype=np.float32)
    probs = np.full(POLICY_ENTRIES, 1 / POLICY_ENTRIES, dtype=np.float32)
    with GameStore.open(path, SPEC) as store:
        for _ in range(games):
            with store.game(source=path.stem) as game:
                for move in range(MOVES):
                    ids = rng.choice(SPEC.num_actions, POLICY_ENTRIES, replace=False)
                    game.add_move(states[move], move % 2, int(ids[0]), ids, probs)
                game.finish([1.0, -1.0])


def clone_store(source: Path, target: Path) -> None:
    """A copy of ``source`` with new game ids and a new store id (its games are distinct
    to the exporter's dedupe); far quicker than writing the games again."""
    shutil.copyfile(source, target)
    prefix = uuid.uuid4().hex[:8] + "-"
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("UPDATE moves SET game_id = ? || game_id", (prefix,))
        conn.execute("UPDATE games SET game_id = ? || game_id", (prefix,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'store_id'", (str(uuid.uuid4()),))
        conn.execute("COMMIT")
    finally:
        conn.close()


def make_stores(games_dir: Path, unit: Path, copies: int) -> None:
    """``copies`` stores of ``unit``'s games under ``games_dir`` (the unit itself first)."""
    games_dir.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        target = games_dir / f"node{i:02d}.db"
        if i == 0:
            shutil.copyfile(unit, target)
        else:
            clone_store(unit, target)
