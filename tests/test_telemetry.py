"""Traces and metrics through a real server: one trace from a node's publish through the daemon
and the export job to the completion a trainer reads; links; odd headers; the instruments;
exporter choice from OTEL_* and console output on stderr.

The daemon runs in this process, so its spans land in an in-memory exporter on the global
tracer provider (settable once per process: one per module, cleared per test). The export job
is a subprocess: it sends its spans over OTLP/HTTP to a small receiver run here.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from opentelemetry import metrics, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from test_gamestore import make_games, write_games

from consumer import telemetry
from consumer.embedded import EmbeddedServer
from consumer.logs import JsonFormatter
from consumer.publish import publish_selfplay
from consumer.streams import ensure_streams
from consumer.telemetry import attached, exporters_for, extract_context, setup_telemetry
from consumer.trainer import watch_exports
from schemas.events import ExportCompleted, ExportStarted, SelfplayCompleted
from tests.daemon_helpers import (
    collect_exports,
    daemon_settings,
    pending,
    running_daemon,
    selfplay_payload,
    wait_for_status,
)
from tests.daemon_helpers import (
    publish_selfplay as publish_untraced,
)

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
ROOT_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{ROOT_SPAN_ID:016x}-01"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "autoexport-test"}))
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later modules' spans are dropped, not kept in memory


@pytest.fixture
def spans(module_spans: InMemorySpanExporter) -> InMemorySpanExporter:
    module_spans.clear()
    return module_spans


@pytest.fixture(scope="module")
def metric_reader() -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    # Fail, never skip: a provider installed earlier would hide these tests' instruments.
    assert not isinstance(metrics.get_meter_provider(), MeterProvider), (
        "another SDK meter provider is installed in this process"
    )
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


class OtlpReceiver:
    """The OTLP/HTTP trace endpoint of a collector, enough for the export job's spans."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                reply = b""
                if self.path == "/v1/traces":
                    receiver._add(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            with self._lock:
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(resource, span) for span in scope_spans.spans]


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
    thread.join()


def in_trace(spans: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    found = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in found}
    assert len(by_name) == len(found), [s.name for s in found]
    return by_name


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


async def publish_traced(nc: Client, games: int, parent: str) -> None:
    """A selfplay event from a node whose trace context is ``parent``."""
    payload = selfplay_payload(games)
    event_id = msgspec.json.decode(payload)["event_id"]
    headers = {"Nats-Msg-Id": event_id, "traceparent": parent}
    await nc.jetstream().publish("selfplay.complete.hex8_2p", payload, headers=headers)


# ---- the whole trace ------------------------------------------------------------------


async def test_one_trace_from_a_node_through_the_export_job_to_the_trainer(
    tmp_path: Path,
    nats_server: EmbeddedServer,
    nc: Client,
    spans: InMemorySpanExporter,
    otlp_receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The daemon hands its environment to the job: the job sends its spans to the receiver.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    settings = daemon_settings(
        tmp_path, nats_server.url, min_games_threshold=5, export_command=None
    )  # the built-in exporter
    write_games(Path(settings.games_dir or "") / "node-1.db", make_games(1, 5, "g"))
    exports = await collect_exports(nc, "tictactoe_2p")
    event = msgspec.convert(
        msgspec.json.decode(selfplay_payload(5, board="tictactoe", db_path="node-1.db")),
        SelfplayCompleted,
    )
    async with running_daemon(settings):
        with attached(extract_context({"traceparent": TRACEPARENT})):  # a node's own trace
            await publish_selfplay(nc.jetstream(), event)
        _, started = await exports.next_msg()
        complete_msg, complete = await exports.next_msg(timeout=60)
        assert isinstance(started, ExportStarted)
        assert isinstance(complete, ExportCompleted), complete
        # A trainer (here: watch) continues the trace from the completion's headers.
        await watch_exports(nats_server.url, lambda line: None, config="tictactoe_2p", count=2)

    trace_spans = in_trace(spans, TRACE_ID)
    publish = trace_spans["publish selfplay.complete.tictactoe_2p"]
    process = trace_spans["process selfplay.complete.tictactoe_2p"]
    export = trace_spans["export tictactoe_2p"]
    announce = trace_spans["publish npz.export.complete.tictactoe_2p"]
    assert (publish.kind, parent_id(publish)) == (SpanKind.PRODUCER, ROOT_SPAN_ID)
    assert (process.kind, parent_id(process)) == (SpanKind.CONSUMER, publish.context.span_id)
    assert parent_id(export) == process.context.span_id
    assert export.attributes["autoexport.outcome"] == "success"
    assert export.attributes["autoexport.export_id"] == complete.export_id
    assert (announce.kind, parent_id(announce)) == (SpanKind.PRODUCER, export.context.span_id)
    started_announce = trace_spans["publish npz.export.started.tictactoe_2p"]
    assert parent_id(started_announce) == export.context.span_id
    assert dict(publish.attributes) == {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "selfplay.complete.tictactoe_2p",
        "messaging.message.id": event.event_id,
        "messaging.message.body.size": publish.attributes["messaging.message.body.size"],
    }
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.consumer.group.name"] == settings.durable_name
    assert process.attributes["messaging.message.id"] == event.event_id
    assert announce.attributes["messaging.message.id"] == f"{complete.export_id}:complete"

    # The completion carries the context of its own publish span.
    assert complete_msg.headers is not None
    assert complete_msg.headers["traceparent"] == traceparent(TRACE_ID, announce.context.span_id)
    # The trainer's processing is that span's child.
    trainer = trace_spans["process npz.export.complete.tictactoe_2p"]
    assert parent_id(trainer) == announce.context.span_id

    # The job's own spans, received over OTLP, hang under the daemon's export span.
    job = {
        span.name: (resource, span)
        for resource, span in otlp_receiver.spans
        if int.from_bytes(span.trace_id, "big") == TRACE_ID
    }
    assert {"discover", "encode", "write"} <= set(job)
    for name in ("discover", "encode", "write"):
        resource, span = job[name]
        assert resource["service.name"] == "autoexport-export"
        assert int.from_bytes(span.parent_span_id, "big") == export.context.span_id, name


async def test_an_export_is_the_child_of_its_last_event_and_links_the_others(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, spans: InMemorySpanExporter
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url, min_games_threshold=2)
    exports = await collect_exports(nc)
    first, second = 0x1111 << 64 | 1, 0x2222 << 64 | 2
    async with running_daemon(settings):
        await publish_traced(nc, 1, traceparent(first, 1))
        await wait_for_status(nats_server.url, lambda s: pending(s) == 1)
        await publish_traced(nc, 1, traceparent(second, 2))
        await exports.next()
        assert isinstance(await exports.next(), ExportCompleted)

    first_process = in_trace(spans, first)["process selfplay.complete.hex8_2p"]
    second_trace = in_trace(spans, second)
    export = second_trace["export hex8_2p"]
    assert parent_id(export) == second_trace["process selfplay.complete.hex8_2p"].context.span_id
    assert [link.context.span_id for link in export.links] == [first_process.context.span_id]
    assert export.links[0].context.trace_id == first


# ---- headers from other clients ---------------------------------------------------------


async def publish_raw(url: str, subject: str, header_block: bytes, payload: bytes) -> None:
    """HPUB over a plain socket: header bytes exactly as given (nats-py would encode them)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        headers = b"NATS/1.0\r\n" + header_block + b"\r\n"
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        writer.write(
            f"HPUB {subject} {len(headers)} {len(headers) + len(payload)}\r\n".encode()
            + headers
            + payload
            + b"\r\nPING\r\n"
        )
        await writer.drain()
        assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_non_ascii_and_malformed_headers_keep_the_trace_and_count(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, spans: InMemorySpanExporter
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js)
    utf8, latin1, go_client = 0xA1 << 64 | 1, 0xA2 << 64 | 2, 0xA3 << 64 | 3
    subject = "selfplay.complete.hex8_2p"
    async with running_daemon(settings):
        # A UTF-8 note next to the trace context.
        await js.publish(subject, selfplay_payload(1, event_id="utf8"), headers={
            "Nats-Msg-Id": "utf8", "X-Note": "café ☕", "traceparent": traceparent(utf8, 1),
        })  # fmt: skip
        # Bytes that are not UTF-8 at all, from a client that sends Latin-1.
        await publish_raw(
            nats_server.url,
            subject,
            b"Nats-Msg-Id: latin1\r\nX-Note: caf\xe9\r\n"
            + f"traceparent: {traceparent(latin1, 2)}\r\n".encode(),
            selfplay_payload(1, event_id="latin1"),
        )
        # Go's header carrier canonicalises the name.
        await js.publish(subject, selfplay_payload(1, event_id="go"), headers={
            "Nats-Msg-Id": "go", "Traceparent": traceparent(go_client, 3),
        })  # fmt: skip
        # Garbage, and a trace id that is not ASCII.
        for n, value in enumerate(["garbage", f"00-{'é' * 32}-{1:016x}-01"]):
            await js.publish(subject, selfplay_payload(1, event_id=f"bad{n}"), headers={
                "Nats-Msg-Id": f"bad{n}", "traceparent": value, "tracestate": "ü=1",
            })  # fmt: skip
        st = await wait_for_status(nats_server.url, lambda s: pending(s) == 5)
        assert st["rejected_messages"] == 0

    for trace_id, span_id in ((utf8, 1), (latin1, 2), (go_client, 3)):
        process = in_trace(spans, trace_id)["process selfplay.complete.hex8_2p"]
        assert parent_id(process) == span_id
    by_id = {
        s.attributes["messaging.message.id"]: s
        for s in spans.get_finished_spans()
        if s.name.startswith("process ")
    }
    for bad in ("bad0", "bad1"):
        assert by_id[bad].parent is None  # a new trace, not an error
        assert by_id[bad].context.trace_id not in (utf8, latin1, go_client)


# ---- metrics ------------------------------------------------------------------------------


def points(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset], float]:
    """Every data point now: counters and gauges by value, histograms by count."""
    out: dict[tuple[str, frozenset], float] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, frozenset(point.attributes.items()))
                    out[key] = getattr(point, "value", None) or getattr(point, "count", 0)
    return out


def delta(before: dict, after: dict, name: str, **attributes: str) -> float:
    key = (name, frozenset(attributes.items()))
    return after.get(key, 0) - before.get(key, 0)


async def wait_for_gauge(reader: InMemoryMetricReader, config: str, games: int) -> None:
    key = ("autoexport.games.pending", frozenset({"config": config}.items()))
    deadline = asyncio.get_running_loop().time() + 10
    while points(reader).get(key) != games:  # the scheduler's next pass sets it
        assert asyncio.get_running_loop().time() < deadline, points(reader).get(key)
        await asyncio.sleep(0.02)


async def test_instruments_count_events_rejections_exports_and_samples(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, metric_reader: InMemoryMetricReader
) -> None:
    config = "metrica_2p"
    settings = daemon_settings(tmp_path, nats_server.url, min_games_threshold=10)
    exports = await collect_exports(nc, config)
    before = points(metric_reader)
    async with running_daemon(settings):
        await publish_untraced(nc, 6, board="metrica")
        await nc.jetstream().publish(f"selfplay.complete.{config}", b"{not json")
        await wait_for_gauge(metric_reader, config, 6)
        await publish_untraced(nc, 4, board="metrica")
        await exports.next()
        assert isinstance(await exports.next(), ExportCompleted)
        await wait_for_gauge(metric_reader, config, 0)
    after = points(metric_reader)

    assert delta(before, after, "autoexport.events.consumed") == 3
    assert delta(before, after, "autoexport.events.rejected", reason="malformed_json") == 1
    assert delta(before, after, "autoexport.exports", config=config, outcome="success") == 1
    assert delta(before, after, "autoexport.export.duration", config=config, outcome="success") == 1
    assert delta(before, after, "autoexport.samples.exported", config=config) == 7


async def test_a_failed_export_is_counted_by_outcome_and_its_span_is_an_error(
    tmp_path: Path,
    nats_server: EmbeddedServer,
    nc: Client,
    metric_reader: InMemoryMetricReader,
    spans: InMemorySpanExporter,
) -> None:
    config = "metricb_2p"
    settings = daemon_settings(
        tmp_path, nats_server.url, mode="fail", min_games_threshold=1, backoff_base_seconds=60
    )
    exports = await collect_exports(nc, config)
    before = points(metric_reader)
    async with running_daemon(settings):
        await publish_untraced(nc, 1, board="metricb")
        await exports.next()
        await exports.next()  # failed
    after = points(metric_reader)

    assert delta(before, after, "autoexport.exports", config=config, outcome="failure") == 1
    assert delta(before, after, "autoexport.export.duration", config=config, outcome="failure") == 1
    assert delta(before, after, "autoexport.samples.exported", config=config) == 0
    (export,) = [s for s in spans.get_finished_spans() if s.name == f"export {config}"]
    assert export.status.status_code is StatusCode.ERROR
    assert "no usable games" in (export.status.description or "")
    assert export.attributes["autoexport.outcome"] == "failure"


# ---- setup from OTEL_* ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "traces"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp, Console"}, ["otlp", "console"]),
    ],
)
def test_exporter_choice(environ: dict[str, str], traces: list[str]) -> None:
    assert exporters_for("traces", environ) == traces


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unknown exporter 'zipkin'"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTLP protocol 'http/json' is not supported",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"},
            "needs the opentelemetry-exporter-otlp-proto-grpc package",
        ),
    ],
)
def test_settings_that_cannot_be_honoured_are_refused_by_name(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(telemetry.TelemetryError, match=message):
        setup_telemetry("autoexport-test", environ)


def test_no_exporter_installs_nothing() -> None:
    provider = trace.get_tracer_provider()
    setup_telemetry("autoexport-test", {})()
    assert trace.get_tracer_provider() is provider


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *argv],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def console_spans(stderr: str) -> list[dict[str, Any]]:
    """The console exporter's JSON objects (one per span, pretty-printed) from stderr."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := stderr.find("{", at)) >= 0:
        try:
            obj, end = decoder.raw_decode(stderr, at)
        except json.JSONDecodeError:
            at += 1
            continue
        if isinstance(obj, dict) and "context" in obj:
            found.append(obj)
        at = end
    return found


def test_the_export_job_joins_traceparent_and_keeps_stdout_for_its_result(
    tmp_path: Path,
) -> None:
    write_games(tmp_path / "games" / "a.db", make_games(1, 3, "g"))
    proc = run_cli(
        "export", "--board-type", "tictactoe", "--num-players", "2",
        "--games-dir", str(tmp_path / "games"), "--output", str(tmp_path / "out.npz"),
        "--no-progress",
        env={"OTEL_TRACES_EXPORTER": "console", "TRACEPARENT": TRACEPARENT},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()  # spans never reach stdout
    assert json.loads(line)["games"] == 3
    by_name = {s["name"]: s for s in console_spans(proc.stderr)}
    assert {"discover", "encode", "write"} <= set(by_name)
    for name in ("discover", "encode", "write"):
        assert by_name[name]["context"]["trace_id"] == f"0x{TRACE_ID:032x}"
        assert by_name[name]["parent_id"] == f"0x{ROOT_SPAN_ID:016x}"
        assert by_name[name]["resource"]["attributes"]["service.name"] == "autoexport-export"


async def test_autoexport_publish_starts_the_trace_and_sends_it_in_the_headers(
    nats_server: EmbeddedServer, nc: Client
) -> None:
    js = nc.jetstream()
    await ensure_streams(js)
    proc = await asyncio.to_thread(
        run_cli,
        "publish", "selfplay", "--nats-url", nats_server.url, "--board-type", "hex8",
        "--num-players", "2", "--games", "5", "--node-id", "n1",
        env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "node-n1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (span,) = console_spans(proc.stderr)
    assert span["name"] == "publish selfplay.complete.hex8_2p"
    assert span["kind"] == "SpanKind.PRODUCER"
    assert span["parent_id"] is None
    assert span["resource"]["attributes"]["service.name"] == "node-n1"
    stored = await js.get_last_msg("SELFPLAY_EVENTS", "selfplay.complete.hex8_2p")
    assert stored.headers is not None
    trace_id, span_id = span["context"]["trace_id"][2:], span["context"]["span_id"][2:]
    assert stored.headers["traceparent"].startswith(f"00-{trace_id}-{span_id}-")


def test_the_daemon_refuses_to_start_with_an_unknown_exporter(tmp_path: Path) -> None:
    proc = run_cli(
        "run", "--nats-url", "nats://127.0.0.1:1", "--data-dir", str(tmp_path),
        env={"OTEL_TRACES_EXPORTER": "jaeger"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "OTEL_TRACES_EXPORTER='jaeger': unknown exporter 'jaeger'" in proc.stderr


def test_json_log_lines_carry_the_trace_they_were_written_in(
    spans: InMemorySpanExporter,
) -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "autoexport", logging.INFO, __file__, 1, "%s: counted +%d games", ("hex8_2p", 5), None
    )
    with telemetry.tracer.start_as_current_span("process x") as span:
        inside = json.loads(formatter.format(record))
    outside = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert inside["msg"] == "hex8_2p: counted +5 games"
    assert (inside["trace_id"], inside["span_id"]) == (
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
    )
    assert "trace_id" not in outside
