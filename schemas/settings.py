"""The daemon's ``Settings`` and ``load_settings``: defaults < TOML file < env < flags.

Settings are strict: an unknown key or an out-of-range value stops the start with one line
naming the value, where it came from, and why. Paths become absolute at load time.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct

ENV_PREFIX = "AUTOEXPORT_"

YEAR_S = 365 * 86_400.0
# Bounded above too: an infinite or absurd duration would overflow timestamps later.
PositiveSeconds = Annotated[float, Meta(gt=0, le=YEAR_S)]


class Settings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats_url: str | None = None  # None: start an embedded nats-server
    embedded_nats_port: Annotated[int, Meta(ge=0, le=65535)] = 4222  # 0: any free port
    data_dir: str = "data"
    games_dir: str | None = None  # default <data_dir>/games
    output_dir: str | None = None  # default <data_dir>/training
    state_db: str | None = None  # default <data_dir>/export_daemon_state.db

    min_games_threshold: Annotated[int, Meta(ge=1)] = 100
    export_cooldown_seconds: Annotated[float, Meta(ge=0, le=YEAR_S)] = 300.0
    max_concurrent_exports: Annotated[int, Meta(ge=1, le=64)] = 2
    export_timeout_seconds: PositiveSeconds = 3600.0
    use_incremental_export: bool = True
    require_completed_games: bool = True
    min_moves: Annotated[int, Meta(ge=0)] = 10
    # argv template for a custom export job; fields: {board_type} {num_players} {config}
    # {games_dir} {output_path} {output_dir} {min_moves} {export_id}
    export_command: Annotated[list[str], Meta(min_length=1)] | None = None

    backoff_base_seconds: PositiveSeconds = 30.0
    backoff_max_seconds: PositiveSeconds = 3600.0

    # Batch ids (the dedupe memory) and rejected messages are forgotten after this long.
    # Keep it well past the events stream's 7-day retention: an older batch announced
    # again would count again.
    retention_days: Annotated[float, Meta(ge=8, le=3650)] = 14.0

    durable_name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "autoexport"
    fetch_batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 1000
    ack_wait_seconds: PositiveSeconds = 60.0
    max_deliver: Annotated[int, Meta(ge=1, le=1000)] = 20
    max_ack_pending: Annotated[int, Meta(ge=1)] = 50_000
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        if self.nats_url is not None:
            _check_nats_url(self.nats_url)
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_base_seconds")
        if self.max_ack_pending < self.fetch_batch_size:
            raise ValueError("max_ack_pending must be >= fetch_batch_size")


def _check_nats_url(value: str) -> None:
    """nats://host:port (or tls/ws/wss), several separated by commas for a cluster."""
    for url in value.split(","):
        try:
            parts = urlsplit(url.strip())
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"nats_url {url!r} is not a URL: {exc}") from None
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(
                f"nats_url {url!r} must look like nats://host:4222 (or tls://, ws://, wss://)"
            )


class SettingsError(ValueError):
    """A setting that stops the start; the message is one line for the operator."""


FIELDS = frozenset(Settings.__struct_fields__)


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or raw == "":
            continue  # an empty variable (common in compose files) means "not set"
        key = name[len(ENV_PREFIX) :].lower()
        if key not in FIELDS:
            raise SettingsError(f"unknown setting {name} (known: {_known('AUTOEXPORT_')})")
        try:
            values[key] = shlex.split(raw) if key == "export_command" else raw
        except ValueError as exc:  # an unbalanced quote
            raise SettingsError(f"invalid setting {name}={raw!r}: {exc}") from None
    return values


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None
    # Accept either top-level keys or an [autoexport] table, not both.
    if "autoexport" in data:
        table = data["autoexport"]
        if not isinstance(table, dict):
            raise SettingsError(f"autoexport in {path} must be a table ([autoexport])")
        if len(data) > 1:
            others = sorted(set(data) - {"autoexport"})
            raise SettingsError(f"{path} has both an [autoexport] table and top-level {others}")
        data = table
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r} in {path} (known: {_known('')})")
    return data


def _known(prefix: str) -> str:
    return ", ".join(prefix + (f.upper() if prefix else f) for f in sorted(FIELDS))


def load_settings(
    environ: Mapping[str, str],
    file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Merge the layers, validate, and make every path absolute (relative to ``cwd``)."""
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file is not None:
        layers.append((str(file), _from_file(Path(file))))
    layers.append(("environment", _from_env(environ)))
    layers.append(("command line", {k: v for k, v in (flags or {}).items() if v is not None}))
    for origin, values in layers:
        for key, value in values.items():
            merged[key] = value
            sources[key] = origin
    try:
        settings = msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(exc, merged, sources)) from None
    return _absolute(settings, cwd or Path.cwd())


def _explain(
    exc: msgspec.ValidationError, merged: Mapping[str, Any], sources: Mapping[str, str]
) -> str:
    text = str(exc)
    marker = " - at `$."
    if marker in text:
        message, field = text.split(marker, 1)
        field = field.rstrip("`").split("[")[0].split(".")[0]
        origin = sources.get(field, "defaults")
        value = merged.get(field, "<default>")
        return f"invalid setting {field}={value!r} (from {origin}): {message}"
    # A rule across fields (__post_init__): name each field it mentions, its value and source.
    named = [
        f"{f}={merged.get(f, getattr(_DEFAULTS, f))!r} (from {sources.get(f, 'defaults')})"
        for f in sorted(FIELDS)
        if f in text
    ]
    return (
        f"invalid settings: {text}: " + ", ".join(named) if named else f"invalid settings: {text}"
    )


_DEFAULTS = Settings()


def _absolute(settings: Settings, cwd: Path) -> Settings:
    def resolve(path: str) -> str:
        return str((cwd / Path(path).expanduser()).resolve())

    data_dir = resolve(settings.data_dir)
    return msgspec.structs.replace(
        settings,
        data_dir=data_dir,
        games_dir=resolve(settings.games_dir or os.path.join(data_dir, "games")),
        output_dir=resolve(settings.output_dir or os.path.join(data_dir, "training")),
        state_db=resolve(settings.state_db or os.path.join(data_dir, "export_daemon_state.db")),
    )
