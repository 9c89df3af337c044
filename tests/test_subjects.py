import pytest

from schemas.subjects import (
    InvalidConfigKey,
    config_from_subject,
    config_key,
    parse_config_key,
)


@pytest.mark.parametrize(
    ("board", "players", "key"),
    [("hex8", 2, "hex8_2p"), ("tictactoe", 2, "tictactoe_2p"), ("a", 16, "a_16p")],
)
def test_config_key_round_trips(board: str, players: int, key: str) -> None:
    assert config_key(board, players) == key
    assert parse_config_key(key) == (board, players)


@pytest.mark.parametrize(
    ("board", "players"),
    [
        ("hex.8", 2),
        ("hex*", 2),
        ("hex>", 2),
        ("hex 8", 2),
        ("Hex8", 2),
        ("8hex", 2),
        ("", 2),
        ("a" * 33, 2),
        ("hex8", 0),
        ("hex8", 17),
        ("hex8", True),
    ],
)
def test_config_key_rejects_routing_characters_and_ranges(board: str, players: int) -> None:
    with pytest.raises(InvalidConfigKey):
        config_key(board, players)


@pytest.mark.parametrize("key", ["hex8_2", "hex8_0p", "hex8_17p", "hex8_02p", "hex.8_2p", "x_2p.y"])
def test_parse_config_key_rejects(key: str) -> None:
    with pytest.raises(InvalidConfigKey):
        parse_config_key(key)


def test_config_from_subject() -> None:
    assert config_from_subject("selfplay.complete.hex8_2p", "selfplay.complete") == "hex8_2p"
    with pytest.raises(InvalidConfigKey):
        config_from_subject("selfplay.complete.hex8_2p.extra", "selfplay.complete")
