"""compose.yaml without Docker: the services are there and wired together, their commands
parse with our CLI, their settings load, every variable they set is one something reads, and
the data they share sits on declared volumes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from consumer.cli import build_parser
from consumer.telemetry import exporters_for
from schemas.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = {name: svc for name, svc in SERVICES.items() if "build" in svc}

# The OTEL_* variables this project reads (consumer/telemetry.py) or hands to the SDK and
# its OTLP exporter, which read them themselves.
OTEL_VARIABLES = {
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "NAME=value" form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def volume_of(service: dict[str, Any], path: str) -> tuple[str, str]:
    """The named volume holding ``path`` in ``service`` and the path inside that volume."""
    for target, source in sorted(mounts(service).items(), key=lambda m: -len(m[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source, path[len(target) :].lstrip("/")
    raise AssertionError(f"{path} is on no volume")


def test_the_four_services_are_there() -> None:
    assert set(SERVICES) == {"nats", "jaeger", "autoexport", "selfplay"}
    assert set(OURS) == {"autoexport", "selfplay"}
    for name, svc in SERVICES.items():
        for dependency in svc.get("depends_on", {}):
            assert dependency in SERVICES, (name, dependency)


def test_nats_runs_jetstream_on_a_persistent_volume_and_reports_health() -> None:
    nats = SERVICES["nats"]
    command = nats["command"]
    assert "-js" in command or "--jetstream" in command
    store = flag(command, "-sd" if "-sd" in command else "--store_dir")
    volume, _ = volume_of(nats, store)
    assert volume in COMPOSE["volumes"]
    assert "4222:4222" in nats["ports"]
    assert "healthz" in " ".join(nats["healthcheck"]["test"])
    assert SERVICES["autoexport"]["depends_on"]["nats"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_commands_parse_with_the_cli_and_reach_nats(name: str) -> None:
    command = OURS[name]["command"]
    assert command[0] == "autoexport"
    args = build_parser().parse_args(command[1:])  # exits (fails the test) on a bad flag
    url = urlparse(args.nats_url)
    assert (url.scheme, url.hostname, url.port) == ("nats", "nats", 4222)
    assert (ROOT / OURS[name]["build"] / "Dockerfile").is_file()


def test_the_image_has_what_the_services_use() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = re.search(r"pip install '\.\[([a-z,]+)\]'", dockerfile)
    assert extras is not None
    assert {"selfplay", "otlp"} <= set(extras.group(1).split(","))


def test_the_daemon_settings_load_and_every_variable_is_read() -> None:
    daemon = OURS["autoexport"]
    env = environment(daemon)
    for name in env:
        assert name.startswith((ENV_PREFIX, "OTEL_")), name
        if name.startswith(ENV_PREFIX):
            assert name[len(ENV_PREFIX) :].lower() in Settings.__struct_fields__, name
    args = build_parser().parse_args(daemon["command"][1:])
    settings = load_settings(
        env, args.config, {"nats_url": args.nats_url, "data_dir": args.data_dir}, cwd=Path("/")
    )
    assert settings.nats_url == "nats://nats:4222"
    assert settings.min_games_threshold == int(env["AUTOEXPORT_MIN_GAMES_THRESHOLD"])


@pytest.mark.parametrize("name", sorted(OURS))
def test_traces_go_to_the_viewer_over_otlp(name: str) -> None:
    env = environment(OURS[name])
    assert set(n for n in env if n.startswith("OTEL_")) <= OTEL_VARIABLES
    assert exporters_for("traces", env) == ["otlp"]
    assert exporters_for("metrics", env) == []  # Jaeger does not take metrics
    endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "jaeger"
    # OTLP over HTTP (the otlp extra) listens on 4318.
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"
    assert endpoint.port == 4318


def test_the_node_writes_games_where_the_daemons_export_job_reads_them() -> None:
    daemon, node = OURS["autoexport"], OURS["selfplay"]
    daemon_args = build_parser().parse_args(daemon["command"][1:])
    env = environment(daemon)
    settings = load_settings(env, None, {"data_dir": daemon_args.data_dir}, cwd=Path("/"))
    games_dir = settings.games_dir or ""
    node_args = build_parser().parse_args(node["command"][1:])
    assert volume_of(daemon, games_dir) == volume_of(node, node_args.games_dir)
    # And the daemon keeps its state and datasets on a volume too.
    for path in (settings.state_db or "", settings.output_dir or ""):
        assert volume_of(daemon, path)[0] in COMPOSE["volumes"]


def test_every_named_volume_is_declared() -> None:
    for name, svc in SERVICES.items():
        for target, source in mounts(svc).items():
            if not source.startswith((".", "/")):
                assert source in COMPOSE["volumes"], (name, target, source)
