"""Traces and metrics: SDK setup from the standard ``OTEL_*`` variables, W3C trace context
in NATS headers, messaging spans, and the daemon's instruments. What to record is the caller's.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanKind

tracer = trace.get_tracer("autoexport")
meter = metrics.get_meter("autoexport")

# ---- setup ---------------------------------------------------------------------------

EXPORTERS = ("otlp", "console", "none")
OTLP_MODULES = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc",
}
FLUSH_TIMEOUT_MS = 5000


class TelemetryError(RuntimeError):
    """An ``OTEL_*`` setting this process cannot honour; the message names it."""


def exporters_for(signal: str, environ: Mapping[str, str]) -> list[str]:
    """The exporters ``OTEL_<SIGNAL>_EXPORTER`` asks for (``traces``/``metrics``); unset means
    OTLP when an OTLP endpoint is set, else none."""
    name = signal.upper()
    chosen = environ.get(f"OTEL_{name}_EXPORTER", "").strip().lower()
    if not chosen:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            f"OTEL_EXPORTER_OTLP_{name}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TelemetryError(
            f"OTEL_{name}_EXPORTER={chosen!r}: unknown exporter {unknown[0]!r}"
            f" (known: {', '.join(EXPORTERS)})"
        )
    return [n for n in names if n != "none"]


def _exporter_factory(signal: str, name: str, environ: Mapping[str, str]) -> Callable[[], Any]:
    """What builds exporter ``name`` for ``signal``; checked (and OTLP imported) now, so a
    setting this process cannot honour fails at start."""
    if name == "console":
        # stderr: the export job's stdout carries its result line.
        if signal == "traces":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return lambda: ConsoleSpanExporter(out=sys.stderr)
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return lambda: ConsoleMetricExporter(out=sys.stderr)
    variable = signal.upper()
    protocol = (
        environ.get(f"OTEL_EXPORTER_OTLP_{variable}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol not in OTLP_MODULES:
        raise TelemetryError(
            f"OTLP protocol {protocol!r} is not supported (use {' or '.join(OTLP_MODULES)})"
        )
    module, cls = (
        ("trace_exporter", "OTLPSpanExporter")
        if signal == "traces"
        else ("metric_exporter", "OTLPMetricExporter")
    )
    try:
        found = importlib.import_module(f"{OTLP_MODULES[protocol]}.{module}")
    except ImportError:
        package = OTLP_MODULES[protocol].replace(".", "-")
        hint = "pip install 'autoexport[otlp]'" if protocol == "http/protobuf" else ""
        raise TelemetryError(
            f"OTEL_{variable}_EXPORTER=otlp ({protocol}) needs the {package} package"
            + (f": {hint}" if hint else "")
        ) from None
    return getattr(found, cls)  # it reads the endpoint, headers and timeout from OTEL_*


def setup_telemetry(
    service_name: str, environ: Mapping[str, str] = os.environ
) -> Callable[[], None]:
    """Install tracer and meter providers as the ``OTEL_*`` variables say; return the call that
    flushes and stops them (a short-lived process must call it before exiting).

    With no exporter nothing is installed: spans cost nothing and the incoming trace context
    passes through unchanged. A provider someone already installed (a test's) is kept.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return lambda: None
    span_exporters = [
        _exporter_factory("traces", n, environ) for n in exporters_for("traces", environ)
    ]
    metric_exporters = [
        _exporter_factory("metrics", n, environ) for n in exporters_for("metrics", environ)
    ]
    if not span_exporters and not metric_exporters:
        return lambda: None

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME") or service_name})
    stops: list[Callable[[], None]] = []
    if span_exporters and not isinstance(trace.get_tracer_provider(), TracerProvider):
        tracer_provider = TracerProvider(resource=resource)
        for make in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(make()))
        trace.set_tracer_provider(tracer_provider)

        def stop_traces() -> None:
            tracer_provider.force_flush(FLUSH_TIMEOUT_MS)
            tracer_provider.shutdown()

        stops.append(stop_traces)
    if metric_exporters and not isinstance(metrics.get_meter_provider(), MeterProvider):
        readers = [PeriodicExportingMetricReader(make()) for make in metric_exporters]
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        stops.append(lambda: meter_provider.shutdown(timeout_millis=FLUSH_TIMEOUT_MS))

    def shutdown() -> None:
        for stop in stops:
            stop()

    return shutdown


# ---- W3C trace context in NATS headers -----------------------------------------------


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Header names compare case-insensitively: Go clients send ``Traceparent``."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            wanted = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == wanted), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_getter = _HeaderGetter()


def inject_headers(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add ``traceparent``/``tracestate`` for the current (or given) context to ``headers``."""
    propagate.inject(headers, context=context)
    return headers


def tracing_enabled() -> bool:
    """A tracer provider is installed (setup_telemetry, or a test's): spans are worth making."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def header_traceparent(headers: Mapping[str, str] | None) -> str | None:
    """The message's ``traceparent`` header, whatever its case."""
    for key, value in (headers or {}).items():
        if key.lower() == "traceparent":
            return value
    return None


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The context a message's headers carry; a missing or malformed ``traceparent`` gives
    an empty context (a new trace), never an error."""
    return propagate.extract(headers or {}, context=Context(), getter=_getter)


def context_from_env(environ: Mapping[str, str]) -> Context:
    """The context the daemon handed an export job in ``TRACEPARENT``/``TRACESTATE``."""
    carrier = {
        "traceparent": environ.get("TRACEPARENT", ""),
        "tracestate": environ.get("TRACESTATE", ""),
    }
    return extract_context({k: v for k, v in carrier.items() if v})


@contextlib.contextmanager
def attached(context: Context) -> Iterator[None]:
    """Make ``context`` current for a block (spans started in it become its children)."""
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def traceparent_of(context: Context | None = None) -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier.get("traceparent")


def trigger_context(traceparents: list[str]) -> tuple[Context | None, list[Link]]:
    """Parent an export on the event that triggered it (the last one) and link the others
    whose games it includes."""
    if not traceparents:
        return None, []
    spans = [
        trace.get_current_span(extract_context({"traceparent": tp})).get_span_context()
        for tp in traceparents[:-1]
    ]
    links = [Link(ctx) for ctx in spans if ctx.is_valid]
    return extract_context({"traceparent": traceparents[-1]}), links


# ---- messaging spans (OpenTelemetry messaging semantic conventions) ------------------


@contextlib.contextmanager
def publish_span(
    subject: str, headers: dict[str, str], payload_size: int, parent: Context | None = None
) -> Iterator[Span]:
    """A PRODUCER span ``publish <subject>`` (child of ``parent``, else of the current span);
    ``headers`` is given its context, so the consumer continues from this span."""
    with tracer.start_as_current_span(
        f"publish {subject}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": subject,
            "messaging.message.id": headers.get("Nats-Msg-Id", ""),
            "messaging.message.body.size": payload_size,
        },
    ) as span:
        inject_headers(headers)
        yield span


def process_span(
    subject: str, headers: Mapping[str, str] | None, payload_size: int, consumer: str
) -> contextlib.AbstractContextManager[Span]:
    """A CONSUMER span ``process <subject>`` continuing the trace the message carries."""
    return tracer.start_as_current_span(
        f"process {subject}",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": subject,
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": (headers or {}).get("Nats-Msg-Id", ""),
            "messaging.message.body.size": payload_size,
        },
    )


# ---- metrics -------------------------------------------------------------------------

events_consumed = meter.create_counter(
    "autoexport.events.consumed",
    unit="{event}",
    description="Inbound messages taken from the stream and committed, valid or not",
)
events_rejected = meter.create_counter(
    "autoexport.events.rejected",
    unit="{event}",
    description="Inbound messages dead-lettered, by reason",
)
exports = meter.create_counter(
    "autoexport.exports",
    unit="{export}",
    description="Finished export jobs, by config and outcome (success, failure, timeout)",
)
export_duration = meter.create_histogram(
    "autoexport.export.duration",
    unit="s",
    description="Run time of export jobs, by config and outcome",
    explicit_bucket_boundaries_advisory=[1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600],
)
samples_exported = meter.create_counter(
    "autoexport.samples.exported",
    unit="{sample}",
    description="Samples in announced datasets, by config",
)

_games_pending: dict[str, int] = {}


def set_games_pending(pending: Mapping[str, int]) -> None:
    """Replace the snapshot the gauge reports (the callback runs on the reader's thread, so it
    gets a whole new dict, never one being changed)."""
    global _games_pending
    _games_pending = dict(pending)


def _observe_games_pending(options: CallbackOptions) -> list[Observation]:
    return [Observation(n, {"config": c}) for c, n in sorted(_games_pending.items())]


meter.create_observable_gauge(
    "autoexport.games.pending",
    callbacks=[_observe_games_pending],
    unit="{game}",
    description="Games counted and not yet exported, per config (the daemon's last view)",
)
