"""Tracing setup and W3C trace-context propagation through NATS headers."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link

tracer = trace.get_tracer("autoexport")


def inject_headers(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add ``traceparent``/``tracestate`` for the current (or given) context to ``headers``."""
    propagate.inject(headers, context=context)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


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
