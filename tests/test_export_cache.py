"""The incremental cache: re-exports encode only new games and equal a fresh export; every
output option has its own cache; a stale or damaged cache is rebuilt, never trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest
from test_export_run import export, load
from test_gamestore import SPEC, make_games, sql, write_games

from consumer.cli import main


def cache_dir(tmp_path: Path) -> Path:
    (directory,) = (tmp_path / "out" / ".cache").iterdir()
    return directory


def assert_same_dataset(a: str | Path, b: str | Path) -> None:
    first, second = load(a), load(b)
    assert first.keys() == second.keys()
    for name in first.keys() - {"metadata"}:
        assert first[name].dtype == second[name].dtype, name
        assert np.array_equal(first[name], second[name]), name
    meta_a, meta_b = (json.loads(str(d.pop("metadata"))) for d in (first, second))
    meta_a.pop("created_at")
    meta_b.pop("created_at")
    assert meta_a == meta_b


def fresh(tmp_path: Path) -> str:
    return export(tmp_path, output=str(tmp_path / "fresh" / "data.npz")).output_path


def test_re_export_encodes_only_new_games_and_equals_a_fresh_export(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 20, "a"))
    write_games(tmp_path / "games" / "b.db", make_games(2, 10, "b"))
    first = export(tmp_path, use_cache=True)
    assert (first.encoded_games, first.cached_games) == (30, 0)

    write_games(tmp_path / "games" / "a.db", make_games(3, 5, "a-new"))
    write_games(tmp_path / "games" / "b.db", make_games(4, 3, "b-new"))
    second = export(tmp_path, use_cache=True)

    assert (second.encoded_games, second.cached_games, second.games) == (8, 30, 38)
    assert_same_dataset(second.output_path, fresh(tmp_path))


def test_nothing_new_is_a_cache_hit_that_leaves_the_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 5, "a"))
    first = export(tmp_path, use_cache=True)
    before = Path(first.output_path).stat()

    argv = [
        "export",
        "--board-type",
        "tictactoe",
        "--num-players",
        "2",
        "--use-cache",
        "--min-moves",
        "0",
    ]
    argv += ["--games-dir", str(tmp_path / "games"), "--output", first.output_path]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])

    assert result["unchanged"] is True and result["encoded_games"] == 0
    assert (result["games"], result["sha256"]) == (5, first.sha256)
    after = Path(first.output_path).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("change", [{"min_moves": 11}, {"include_incomplete": True}])
def test_each_output_option_has_its_own_cache(tmp_path: Path, change: dict) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 6, "a"))
    assert export(tmp_path, use_cache=True).encoded_games == 6

    changed = export(tmp_path, use_cache=True, **change)
    assert changed.cached_games == 0 and changed.encoded_games == changed.games > 0
    assert export(tmp_path, use_cache=True).cached_games == 6


def test_a_changed_state_spec_misses_the_cache(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 4, "a"))
    export(tmp_path, use_cache=True)
    shutil.rmtree(tmp_path / "games")
    flat = msgspec.structs.replace(SPEC, state_shape=(27,))
    games = [
        g._replace(moves=[m._replace(state=m.state.reshape(27)) for m in g.moves])
        for g in make_games(1, 4, "a")
    ]
    write_games(tmp_path / "games" / "a.db", games, flat)

    summary = export(tmp_path, use_cache=True)

    assert (summary.encoded_games, summary.cached_games) == (4, 0)
    assert load(summary.output_path)["states"].shape == (summary.samples, 27)


def _flip_a_byte(directory: Path) -> None:
    segment = max(directory.glob("*.seg"), key=lambda p: p.stat().st_size)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))


def _truncate(directory: Path) -> None:
    segment = next(directory.glob("*.seg"))
    segment.write_bytes(segment.read_bytes()[:100])


DAMAGE = {
    "flipped byte": _flip_a_byte,
    "truncated segment": _truncate,
    "deleted segment": lambda d: next(d.glob("*.seg")).unlink(),
    "garbage manifest": lambda d: (d / "manifest.json").write_bytes(b"\x00{not json"),
    "foreign manifest": lambda d: (d / "manifest.json").write_text(json.dumps({"a": 1})),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 12, "a"))
    write_games(tmp_path / "games" / "b.db", make_games(2, 12, "b"))
    export(tmp_path, use_cache=True)
    write_games(tmp_path / "games" / "a.db", make_games(3, 2, "a-new"))
    DAMAGE[damage](cache_dir(tmp_path))

    summary = export(tmp_path, use_cache=True)

    assert summary.games == 26 and summary.encoded_games >= 2 + 12
    assert_same_dataset(summary.output_path, fresh(tmp_path))
    assert export(tmp_path, use_cache=True).unchanged


def test_a_replaced_store_is_re_encoded(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 5, "a"))
    export(tmp_path, use_cache=True)
    (tmp_path / "games" / "a.db").unlink()
    write_games(tmp_path / "games" / "a.db", make_games(2, 3, "a"))  # same ids, new store

    summary = export(tmp_path, use_cache=True)

    assert (summary.encoded_games, summary.cached_games, summary.games) == (3, 0, 3)
    assert_same_dataset(summary.output_path, fresh(tmp_path))


def test_an_earlier_store_with_a_cached_game_keeps_dedupe_right(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "b.db", make_games(1, 4, "g"))
    export(tmp_path, use_cache=True)
    write_games(tmp_path / "games" / "a.db", make_games(2, 2, "g"))  # g-0000, g-0001 again

    summary = export(tmp_path, use_cache=True)

    assert summary.games == 4 and summary.skipped == {"duplicate": 2}
    assert_same_dataset(summary.output_path, fresh(tmp_path))
    assert load(summary.output_path)["game_sources"].tolist() == [0, 0, 1, 1]


def test_a_game_in_progress_at_one_export_is_taken_by_the_next(tmp_path: Path) -> None:
    path = tmp_path / "games" / "a.db"
    write_games(path, make_games(1, 6, "a"))
    sql(path, "UPDATE games SET status = 'in_progress', finished_at = NULL WHERE rowid = 6")
    first = export(tmp_path, use_cache=True)
    assert (first.games, first.skipped) == (5, {"in_progress": 1})

    sql(path, "UPDATE games SET status = 'completed', finished_at = started_at WHERE rowid = 6")
    write_games(path, make_games(2, 2, "a-new"))
    second = export(tmp_path, use_cache=True)

    assert (second.encoded_games, second.cached_games, second.games) == (3, 5, 8)
    assert second.skipped == {}
    assert_same_dataset(second.output_path, fresh(tmp_path))


def test_a_store_replaced_by_a_longer_one_is_read_again(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 5, "a"))
    export(tmp_path, use_cache=True)
    (tmp_path / "games" / "a.db").unlink()
    # The same ids at the same rowids and more after them: only the store id differs.
    write_games(tmp_path / "games" / "a.db", make_games(2, 8, "a"))

    summary = export(tmp_path, use_cache=True)

    assert (summary.encoded_games, summary.cached_games, summary.games) == (8, 0, 8)
    assert_same_dataset(summary.output_path, fresh(tmp_path))


def test_a_re_export_reads_only_the_rows_added_since(tmp_path: Path) -> None:
    path = tmp_path / "games" / "a.db"
    write_games(path, make_games(1, 10, "a"))
    export(tmp_path, use_cache=True)
    # Rows already exported can no longer be listed: a full read would fail on them.
    sql(path, "UPDATE games SET returns = CAST(x'ff' AS TEXT)")
    write_games(path, make_games(2, 3, "a-new"))

    summary = export(tmp_path, use_cache=True)

    assert summary.stores_skipped == []
    assert (summary.encoded_games, summary.cached_games, summary.games) == (3, 10, 13)


def test_a_duplicate_is_exported_once_the_earlier_copy_is_gone(tmp_path: Path) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 2, "g"))
    write_games(tmp_path / "games" / "b.db", make_games(2, 4, "g"))  # g-0000, g-0001 again
    assert export(tmp_path, use_cache=True).skipped == {"duplicate": 2}
    (tmp_path / "games" / "a.db").unlink()

    summary = export(tmp_path, use_cache=True)

    assert (summary.games, summary.skipped) == (4, {})
    assert_same_dataset(summary.output_path, fresh(tmp_path))


def test_skip_counts_of_earlier_exports_are_kept(tmp_path: Path) -> None:
    a, b = tmp_path / "games" / "a.db", tmp_path / "games" / "b.db"
    write_games(a, make_games(1, 6, "a"))
    write_games(a, make_games(2, 2, "cut"), finish=False)
    write_games(b, make_games(3, 3, "a"))  # a-0000..a-0002 again
    sql(a, "UPDATE games SET returns = NULL WHERE game_id = 'a-0003'")
    sql(a, "UPDATE moves SET player = 5 WHERE game_id = 'a-0004'")
    sql(a, "UPDATE games SET status = 'in_progress' WHERE game_id = 'a-0005'")
    expected = {
        "bad_moves": 1,
        "duplicate": 3,
        "in_progress": 1,
        "missing_result": 1,
        "not_completed": 2,
    }
    assert export(tmp_path, use_cache=True).skipped == expected
    write_games(a, make_games(4, 2, "a-new"))
    write_games(b, make_games(5, 2, "b-new"))

    summary = export(tmp_path, use_cache=True)

    assert (summary.encoded_games, summary.cached_games) == (4, 3)
    assert summary.skipped == expected
    assert_same_dataset(summary.output_path, fresh(tmp_path))


@pytest.mark.parametrize("deleted", ["a-0001", "a-0004"])  # a-0004's rowid is taken again
def test_a_store_that_lost_rows_is_read_again(tmp_path: Path, deleted: str) -> None:
    path = tmp_path / "games" / "a.db"
    write_games(path, make_games(1, 5, "a"))
    export(tmp_path, use_cache=True)
    sql(path, "DELETE FROM moves WHERE game_id = ?", deleted)
    sql(path, "DELETE FROM games WHERE game_id = ?", deleted)
    write_games(path, make_games(2, 1, "a-new"))

    summary = export(tmp_path, use_cache=True)

    assert (summary.encoded_games, summary.cached_games, summary.games) == (5, 0, 5)
    assert_same_dataset(summary.output_path, fresh(tmp_path))
