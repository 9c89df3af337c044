"""schemas.settings: seed defaults, file < env < flags, absolute paths, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.settings import Settings, SettingsError, load_settings


def write_toml(tmp_path: Path, text: str, name: str = "autoexport.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, **kwargs: Any) -> str:
    kwargs.setdefault("environ", {})
    with pytest.raises(SettingsError) as info:
        load_settings(cwd=tmp_path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---- defaults ----------------------------------------------------------------------------


def test_defaults_come_from_the_seed(tmp_path: Path) -> None:
    cwd = tmp_path.resolve()
    settings = load_settings({}, cwd=cwd)
    assert settings.min_games_threshold == 100
    assert settings.export_cooldown_seconds == 300
    assert settings.max_concurrent_exports == 2
    assert settings.export_timeout_seconds == 3600
    assert settings.use_incremental_export is True
    assert settings.require_completed_games is True
    assert settings.min_moves == 10
    assert settings.data_dir == str(cwd / "data")
    assert settings.output_dir == str(cwd / "data" / "training")
    assert settings.state_db == str(cwd / "data" / "export_daemon_state.db")
    assert settings.games_dir == str(cwd / "data" / "games")
    assert settings.nats_url is None  # embedded server


def test_environment_variables_without_the_prefix_are_ignored(tmp_path: Path) -> None:
    environ = {"HOME": "/root", "PATH": "/bin", "autoexport_min_games_threshold": "5"}
    assert load_settings(environ, cwd=tmp_path).min_games_threshold == 100


def test_settings_are_frozen_and_strict() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.min_games_threshold = 1  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"min_games_treshold": 5}, Settings)


# ---- layers ------------------------------------------------------------------------------


def test_precedence_is_file_then_env_then_flags(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "min_games_threshold = 10\nexport_cooldown_seconds = 5\n")
    env = {"AUTOEXPORT_MIN_GAMES_THRESHOLD": "20", "AUTOEXPORT_MAX_CONCURRENT_EXPORTS": "4"}
    flags = {"min_games_threshold": 30}

    only_file = load_settings({}, file, cwd=tmp_path)
    assert (only_file.min_games_threshold, only_file.export_cooldown_seconds) == (10, 5)

    file_and_env = load_settings(env, file, cwd=tmp_path)
    assert file_and_env.min_games_threshold == 20
    assert file_and_env.export_cooldown_seconds == 5  # untouched by env
    assert file_and_env.max_concurrent_exports == 4

    everything = load_settings(env, file, flags, cwd=tmp_path)
    assert everything.min_games_threshold == 30
    assert everything.export_cooldown_seconds == 5
    assert everything.max_concurrent_exports == 4


def test_flags_left_unset_do_not_override(tmp_path: Path) -> None:
    env = {"AUTOEXPORT_MIN_GAMES_THRESHOLD": "20"}
    settings = load_settings(env, flags={"min_games_threshold": None}, cwd=tmp_path)
    assert settings.min_games_threshold == 20


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False)],
    ids=lambda v: repr(v),
)
def test_booleans_from_the_environment(tmp_path: Path, raw: str, expected: bool) -> None:
    env = {"AUTOEXPORT_USE_INCREMENTAL_EXPORT": raw, "AUTOEXPORT_REQUIRE_COMPLETED_GAMES": raw}
    settings = load_settings(env, cwd=tmp_path)
    assert settings.use_incremental_export is expected
    assert settings.require_completed_games is expected


def test_numbers_from_the_environment(tmp_path: Path) -> None:
    env = {"AUTOEXPORT_EXPORT_COOLDOWN_SECONDS": "12.5", "AUTOEXPORT_MIN_MOVES": "0"}
    settings = load_settings(env, cwd=tmp_path)
    assert settings.export_cooldown_seconds == 12.5
    assert settings.min_moves == 0


def test_export_command_from_the_environment_is_split_like_a_shell(tmp_path: Path) -> None:
    env = {"AUTOEXPORT_EXPORT_COMMAND": "python export.py --out '{output_path}' --tag 'a b'"}
    settings = load_settings(env, cwd=tmp_path)
    assert settings.export_command == [
        "python", "export.py", "--out", "{output_path}", "--tag", "a b"
    ]  # fmt: skip


def test_toml_with_an_autoexport_table(tmp_path: Path) -> None:
    file = write_toml(
        tmp_path,
        '[autoexport]\nmin_games_threshold = 7\nexport_command = ["exp", "{config}"]\n'
        "use_incremental_export = false\n",
    )
    settings = load_settings({}, file, cwd=tmp_path)
    assert settings.min_games_threshold == 7
    assert settings.export_command == ["exp", "{config}"]
    assert settings.use_incremental_export is False


def test_toml_with_top_level_keys(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "max_concurrent_exports = 5\nlog_format = 'json'\n")
    settings = load_settings({}, file, cwd=tmp_path)
    assert settings.max_concurrent_exports == 5
    assert settings.log_format == "json"


def test_file_may_be_given_as_a_string(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "min_moves = 3\n")
    assert load_settings({}, str(file), cwd=tmp_path).min_moves == 3


# ---- paths -------------------------------------------------------------------------------


def test_paths_are_absolute_relative_to_the_cwd_argument(tmp_path: Path) -> None:
    cwd = tmp_path.resolve() / "run"
    file = write_toml(tmp_path, 'data_dir = "state"\noutput_dir = "../published"\n')
    settings = load_settings({}, file, cwd=cwd)
    assert settings.data_dir == str(cwd / "state")
    assert settings.output_dir == str(tmp_path.resolve() / "published")
    assert settings.games_dir == str(cwd / "state" / "games")
    assert settings.state_db == str(cwd / "state" / "export_daemon_state.db")
    for path in (settings.data_dir, settings.games_dir, settings.output_dir, settings.state_db):
        assert Path(path).is_absolute()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    target = tmp_path.resolve() / "elsewhere"
    flags = {"state_db": str(target / "s.db"), "games_dir": str(target / "games")}
    settings = load_settings({}, flags=flags, cwd=Path("/"))
    assert settings.state_db == str(target / "s.db")
    assert settings.games_dir == str(target / "games")


def test_paths_from_the_environment_are_made_absolute(tmp_path: Path) -> None:
    settings = load_settings({"AUTOEXPORT_OUTPUT_DIR": "out"}, cwd=tmp_path.resolve())
    assert settings.output_dir == str(tmp_path.resolve() / "out")


# ---- errors: one line naming the field, the value and where it came from ----------------


@pytest.mark.parametrize(
    ("layer", "origin"),
    [("file", "autoexport.toml"), ("env", "environment"), ("flags", "command line")],
)
def test_zero_concurrent_exports_stops_the_start(tmp_path: Path, layer: str, origin: str) -> None:
    kwargs: dict[str, Any] = {"environ": {}}
    if layer == "file":
        kwargs["file"] = write_toml(tmp_path, "max_concurrent_exports = 0\n")
    elif layer == "env":
        kwargs["environ"] = {"AUTOEXPORT_MAX_CONCURRENT_EXPORTS": "0"}
    else:
        kwargs["flags"] = {"max_concurrent_exports": 0}
    message = load_error(tmp_path, **kwargs)
    assert "max_concurrent_exports" in message
    assert "0" in message
    assert origin in message


def test_negative_threshold_stops_the_start(tmp_path: Path) -> None:
    message = load_error(tmp_path, environ={"AUTOEXPORT_MIN_GAMES_THRESHOLD": "-5"})
    assert "min_games_threshold" in message
    assert "-5" in message
    assert "environment" in message


def test_a_later_layer_is_blamed_for_the_value_it_set(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "min_games_threshold = 10\n")
    message = load_error(tmp_path, file=file, flags={"min_games_threshold": -1})
    assert "min_games_threshold=-1" in message
    assert "command line" in message


def test_negative_threshold_in_the_file_names_the_file(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "[autoexport]\nmin_games_threshold = -3\n")
    message = load_error(tmp_path, file=file)
    assert "min_games_threshold" in message
    assert "-3" in message
    assert str(file) in message


def test_unknown_environment_variable_stops_the_start(tmp_path: Path) -> None:
    message = load_error(tmp_path, environ={"AUTOEXPORT_MIN_GAMES_TRESHOLD": "5"})
    assert "AUTOEXPORT_MIN_GAMES_TRESHOLD" in message
    assert "AUTOEXPORT_MIN_GAMES_THRESHOLD" in message  # the list of known names helps


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("min_games_treshold = 5\n", id="top-level"),
        pytest.param("[autoexport]\nmin_games_treshold = 5\n", id="in-table"),
    ],
)
def test_unknown_toml_key_stops_the_start(tmp_path: Path, text: str) -> None:
    file = write_toml(tmp_path, text)
    message = load_error(tmp_path, file=file)
    assert "min_games_treshold" in message
    assert str(file) in message


def test_bad_toml_stops_the_start(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "min_games_threshold = \n[broken\n")
    message = load_error(tmp_path, file=file)
    assert str(file) in message
    assert "TOML" in message
    assert "line 1" in message


def test_autoexport_key_that_is_not_a_table_stops_the_start(tmp_path: Path) -> None:
    file = write_toml(tmp_path, "autoexport = 5\n")
    message = load_error(tmp_path, file=file)
    assert "autoexport" in message
    assert str(file) in message


def test_bool_maybe_from_the_environment_stops_the_start(tmp_path: Path) -> None:
    message = load_error(tmp_path, environ={"AUTOEXPORT_USE_INCREMENTAL_EXPORT": "maybe"})
    assert "use_incremental_export" in message
    assert "maybe" in message
    assert "environment" in message


def test_backoff_max_below_base_stops_the_start(tmp_path: Path) -> None:
    message = load_error(
        tmp_path,
        environ={"AUTOEXPORT_BACKOFF_MAX_SECONDS": "5"},
        flags={"backoff_base_seconds": 60},
    )
    assert "backoff_max_seconds" in message
    assert "backoff_base_seconds" in message
    assert "5" in message
    assert "60" in message
    assert "environment" in message
    assert "command line" in message


def test_missing_settings_file_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = load_error(tmp_path, file=missing)
    assert str(missing) in message
    assert "does not exist" in message


@pytest.mark.parametrize(
    ("env", "field"),
    [
        pytest.param({"AUTOEXPORT_EXPORT_TIMEOUT_SECONDS": "0"}, "export_timeout_seconds",
                     id="zero-timeout"),
        pytest.param({"AUTOEXPORT_EXPORT_COOLDOWN_SECONDS": "-1"}, "export_cooldown_seconds",
                     id="negative-cooldown"),
        pytest.param({"AUTOEXPORT_MAX_CONCURRENT_EXPORTS": "two"}, "max_concurrent_exports",
                     id="concurrency-not-a-number"),
        pytest.param({"AUTOEXPORT_LOG_FORMAT": "xml"}, "log_format", id="unknown-log-format"),
        pytest.param({"AUTOEXPORT_MIN_MOVES": "-1"}, "min_moves", id="negative-min-moves"),
        pytest.param({"AUTOEXPORT_EXPORT_COMMAND": "  "}, "export_command", id="blank-command"),
    ],
)  # fmt: skip
def test_other_nonsense_values_name_the_field(
    tmp_path: Path, env: dict[str, str], field: str
) -> None:
    message = load_error(tmp_path, environ=env)
    assert field in message
    assert "environment" in message


@pytest.mark.parametrize(
    "url", ["notaurl", "nats://127.0.0.1:notaport", "http://127.0.0.1:4222", "nats://:4222"]
)
def test_a_nats_url_that_is_not_one_stops_the_start(url: str) -> None:
    with pytest.raises(SettingsError, match="nats_url"):
        load_settings({"AUTOEXPORT_NATS_URL": url})


def test_an_empty_variable_means_not_set() -> None:
    settings = load_settings({"AUTOEXPORT_NATS_URL": "", "AUTOEXPORT_MIN_MOVES": ""})
    assert settings.nats_url is None  # the embedded server, not a URL ""
    assert settings.min_moves == 10


def test_a_cluster_is_several_urls() -> None:
    url = "nats://a:4222,nats://b:4222"
    assert load_settings({"AUTOEXPORT_NATS_URL": url}).nats_url == url


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"AUTOEXPORT_EXPORT_COOLDOWN_SECONDS": "inf"}, "export_cooldown_seconds"),
        ({"AUTOEXPORT_ACK_WAIT_SECONDS": "1e15"}, "ack_wait_seconds"),
        ({"AUTOEXPORT_EXPORT_COMMAND": 'python "unterminated'}, "EXPORT_COMMAND"),
    ],
)
def test_infinite_durations_and_unbalanced_quotes_stop_the_start(
    env: dict[str, str], field: str
) -> None:
    with pytest.raises(SettingsError, match=field):
        load_settings(env)
