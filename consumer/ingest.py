"""Ingest: the durable pull consumer. Fetch a batch, classify each message, record the
batch in one SQLite transaction, then acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError
from opentelemetry.trace import StatusCode

from consumer import telemetry
from consumer.decide import (
    Counted,
    Reject,
    classify,
)
from consumer.outbox import Outbox, outgoing
from consumer.pull import PullConsumer, PullError, PullStalled
from consumer.retry import Retry
from consumer.scheduler import Scheduler
from consumer.store import Outgoing, RejectedMessage, Store, payload_digest
from consumer.streams import ensure_streams
from consumer.telemetry import (
    header_traceparent,
    process_span,
    traceparent_of,
)
from schemas import subjects
from schemas.events import (
    DeadLetter,
)
from schemas.events import utc_from_unix as utc
from schemas.settings import Settings

log = logging.getLogger("autoexport")


def _summarize(added: dict[str, int], shown: int = 5) -> str:
    """``+50 hex8_2p, +10 go9_2p`` (the largest first), then how many more configs."""
    top = sorted(added.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"+{games} games {config}" for config, games in top[:shown])
    return text + (f" and {len(top) - shown} more configs" if len(top) > shown else "")


def _describe(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return f"{type(exc).__name__} {exc.code} {exc.description}"
    if isinstance(exc, PullError | PullStalled):
        return str(exc)
    return repr(exc)


class Batch(msgspec.Struct):
    """One fetched batch: its messages and what each one means."""

    msgs: list[Msg]
    now: float
    counted: list[Counted] = msgspec.field(default_factory=list)
    rejected: list[RejectedMessage] = msgspec.field(default_factory=list)
    dead: list[Outgoing] = msgspec.field(default_factory=list)
    verdicts: list[bool] = msgspec.field(default_factory=list)  # counted (ack) or not (term)


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.durable_name,
        description="autoexport: counts selfplay games per config",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        # No filter_subjects: the stream holds only the inbound subjects, and a filter over
        # many distinct subjects makes the server deliver about 10x slower.
    )


class Ingest:
    """The durable pull consumer: one SQLite transaction per fetched batch, then acks."""

    def __init__(
        self, settings: Settings, nc: Client, store: Store, outbox: Outbox,
        scheduler: Scheduler,
    ) -> None:  # fmt: skip
        self._settings, self._nc, self._js = settings, nc, nc.jetstream()
        self._store, self._outbox, self._scheduler = store, outbox, scheduler
        self._pull: PullConsumer | None = None
        self.caught_up = asyncio.Event()  # the last fetch found nothing pending
        self.provisioned = asyncio.Event()  # the streams and the consumer exist

    async def provision(self) -> None:
        """Create or update the streams and the consumer (binding alone would ignore a
        changed consumer config), then subscribe for its messages."""
        await ensure_streams(self._js)
        await self._js.add_consumer(subjects.EVENTS_STREAM, consumer_config(self._settings))
        pull = PullConsumer(self._nc, subjects.EVENTS_STREAM, self._settings.durable_name)
        await pull.start()
        self._pull = pull
        self.provisioned.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch, classify, and commit; batch N commits (on aiosqlite's thread) while batch
        N+1 is fetched and classified. At most two batches are in hand at any time."""
        retry = Retry()
        committing: asyncio.Task[None] | None = None

        async def committed() -> None:
            nonlocal committing
            if committing is not None:
                task, committing = committing, None
                await task

        while not stop.is_set():
            try:
                msgs = await self._next_batch(stop, committed)
            except (
                APIError,
                PullError,
                PullStalled,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.TimeoutError,
            ) as exc:
                # The consumer or stream was deleted, JetStream is unavailable, or the
                # server stopped answering: pulling again would fail the same way, so
                # re-provision, pausing longer each time.
                log.warning(
                    "JetStream unavailable (%s): no JetStream on the server, the stream or"
                    " consumer was deleted, or the server stopped answering (or this process"
                    " was paused); re-provisioning in %.1fs",
                    _describe(exc),
                    retry.next_s,
                )
                await committed()
                await self._drop_subscription()
                await retry.pause(stop)
                continue
            retry.reset()
            if not msgs:
                continue
            batch = self.prepare(msgs)
            await committed()  # in order, and never more than one commit in flight
            committing = asyncio.create_task(self.commit(batch))
        await committed()
        await self._drop_subscription()

    async def _next_batch(
        self, stop: asyncio.Event, committed: Callable[[], Awaitable[None]]
    ) -> list[Msg]:
        """The next batch: what is pending now, or else the first messages to arrive
        (nothing when the wait expires or ``stop`` is set)."""
        if self._pull is None:
            await self.provision()
            durable = self._settings.durable_name
            log.info("consuming %s as durable %r", subjects.EVENTS_STREAM, durable)
        assert self._pull is not None
        size = self._settings.fetch_batch_size
        msgs = await self._pull.fetch(size)
        if msgs:
            self.caught_up.clear()
            return msgs
        await committed()
        self.caught_up.set()
        return await self._pull.wait(stop)

    async def drained(self) -> bool:
        """Nothing left in the consumer: none pending and none awaiting an ack."""
        try:
            info = await self._js.consumer_info(subjects.EVENTS_STREAM, self._settings.durable_name)
        except (APIError, nats.errors.Error):
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def _drop_subscription(self) -> None:
        pull, self._pull = self._pull, None
        if pull is not None:
            with contextlib.suppress(nats.errors.Error):
                await pull.close()

    def prepare(self, msgs: list[Msg]) -> Batch:
        """Decide what each message means (pure work on the loop, no I/O)."""
        batch = Batch(msgs=msgs, now=time.time())
        counted, rejected, dead, now = batch.counted, batch.rejected, batch.dead, batch.now
        # Without a tracer provider a span per message only costs time; the message's own
        # traceparent is then what the export continues.
        tracing = telemetry.tracing_enabled()
        for msg in msgs:
            span_cm = (
                process_span(msg.subject, msg.headers, len(msg.data), self._settings.durable_name)
                if tracing
                else contextlib.nullcontext(None)
            )
            with span_cm as span:
                try:
                    verdict = classify(msg.subject, msg.data)
                except Exception as exc:  # a bug must not crash-loop the daemon on one message
                    log.exception("classifying %s failed", msg.subject)
                    verdict = Reject(reason="invalid_event", detail=f"could not be read: {exc!r}")
                if isinstance(verdict, Reject):
                    if span is not None:
                        span.set_status(StatusCode.ERROR, f"rejected: {verdict.reason}")
                    meta = msg.metadata
                    seq = meta.sequence.stream
                    rejected.append(RejectedMessage(msg.subject, seq, verdict, msg.data))
                    dead.append(
                        dead_letter(msg.subject, seq, meta.num_delivered, msg.data, verdict, now)
                    )
                    log.warning(
                        "rejected %s (stream seq %d): %s: %s",
                        msg.subject, seq, verdict.reason, verdict.detail,
                    )  # fmt: skip
                else:
                    counted.append(verdict)
                    tp = traceparent_of() if tracing else header_traceparent(msg.headers)
                    if tp is not None:
                        self._scheduler.note_trigger(verdict.config, tp)
                batch.verdicts.append(isinstance(verdict, Counted))
        return batch

    async def commit(self, batch: Batch) -> None:
        """One transaction for the whole batch, then the acks."""
        rejected = batch.rejected
        added = await self._store.record_messages(batch.counted, rejected, batch.dead, batch.now)
        # Acknowledge only now that the transaction has committed.
        for msg, ok in zip(batch.msgs, batch.verdicts, strict=True):
            await (msg.ack() if ok else msg.term())
        telemetry.events_consumed.add(len(batch.msgs))
        for item in rejected:
            telemetry.events_rejected.add(1, {"reason": item.reject.reason})
        if added:
            log.info("counted %s", _summarize(added))
        if batch.dead:
            self._outbox.notify()
        if added:
            self._scheduler.kick()


def dead_letter(
    subject: str, stream_seq: int, deliveries: int, payload: bytes, reject: Reject, now: float
) -> Outgoing:
    """The dead-letter announcement of a rejected message of the events stream."""
    letter = DeadLetter(
        reason=reject.reason + ": " + reject.detail,
        subject=subject,
        stream_seq=stream_seq,
        deliveries=deliveries,
        payload=payload[:4096].decode("utf-8", errors="replace"),
        timestamp=utc(now),
    )
    return outgoing(
        f"{subjects.DEAD_LETTER}.{reject.reason}",
        letter,
        f"dlq:{subjects.EVENTS_STREAM}:{stream_seq}:{payload_digest(payload)}",
    )
