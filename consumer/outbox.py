"""The outbox publisher: sends what the state store decided, in order, after it committed.

A row leaves the outbox only once JetStream acknowledged it, so a crash delays an
announcement but never loses it; ``Nats-Msg-Id`` drops a repeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from consumer.retry import Retry
from consumer.store import Outgoing, Store
from consumer.streams import ensure_streams
from consumer.telemetry import (
    extract_context,
    inject_headers,
    publish_span,
)
from schemas.events import ExportEvent, encoder, subject_of

log = logging.getLogger("autoexport")


class Outbox:
    """Publishes the store's outbox in order; a row is deleted only after JetStream acked it."""

    def __init__(self, store: Store, js: JetStreamContext) -> None:
        self._store, self._js = store, js
        self._wake = asyncio.Event()
        self.empty = asyncio.Event()

    def notify(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        retry = Retry()
        while True:
            self._wake.clear()
            rows = await self._store.outbox()
            if not rows:
                self.empty.set()
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 5.0)
                continue
            self.empty.clear()
            for row in rows:
                try:
                    # The row's headers hold the deciding span's context (the export, or the
                    # processing of a rejected message): the publish span is its child, and the
                    # message carries the publish span's context on to its consumers.
                    headers = dict(row.headers)
                    with publish_span(
                        row.subject, headers, len(row.payload), parent=extract_context(row.headers)
                    ):
                        await self._js.publish(row.subject, row.payload, headers=headers, timeout=5)
                except (nats.errors.Error, APIError) as exc:
                    log.warning(
                        "publish of %s failed (%r); retrying in %.1fs",
                        row.subject,
                        exc,
                        retry.next_s,
                    )
                    if stop.is_set():
                        return  # stays in the outbox; published at the next start
                    await retry.pause(stop)
                    if isinstance(exc, NoStreamResponseError):
                        # Someone deleted the stream while we ran: put it back.
                        with contextlib.suppress(nats.errors.Error, APIError):
                            await ensure_streams(self._js)
                    break
                retry.reset()
                await self._store.delete_outbox(row.id)


def outgoing(subject: str, event: msgspec.Struct, msg_id: str) -> Outgoing:
    headers = inject_headers({"Nats-Msg-Id": msg_id})
    return Outgoing(subject, encoder.encode(event), headers)


def announcement(event: ExportEvent) -> Outgoing:
    """An export event on its subject. Its message id (export id and stage) makes the stream
    drop a second publish of the same announcement."""
    subject = subject_of(event)
    stage = subject.split(".")[2]  # npz.export.<stage>.<config>
    return outgoing(subject, event, f"{event.export_id}:{stage}")
