"""Ingest: the durable pull consumer. Fetch a batch, classify each message, record the
batch in one SQLite transaction, then acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
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
from consumer.retry import Retry
from consumer.scheduler import Scheduler
from consumer.store import Outgoing, RejectedMessage, Store
from consumer.streams import ensure_streams
from consumer.telemetry import (
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

FETCH_TIMEOUT_S = 1.0


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.durable_name,
        description="autoexport: counts selfplay games per config",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        filter_subjects=list(subjects.EVENTS_SUBJECTS),
    )


class Ingest:
    """The durable pull consumer: one SQLite transaction per fetched batch, then acks."""

    def __init__(
        self, settings: Settings, js: JetStreamContext, store: Store, outbox: Outbox,
        scheduler: Scheduler,
    ) -> None:  # fmt: skip
        self._settings, self._js, self._store = settings, js, store
        self._outbox, self._scheduler = outbox, scheduler
        self._sub: JetStreamContext.PullSubscription | None = None
        self.caught_up = asyncio.Event()  # the last fetch found nothing pending

    async def provision(self) -> None:
        """Create or update the streams and the consumer (binding alone would ignore a
        changed consumer config), then bind."""
        await ensure_streams(self._js)
        await self._js.add_consumer(subjects.EVENTS_STREAM, consumer_config(self._settings))
        self._sub = await self._js.pull_subscribe_bind(
            self._settings.durable_name, subjects.EVENTS_STREAM
        )

    async def run(self, stop: asyncio.Event) -> None:
        retry = Retry()
        while not stop.is_set():
            try:
                if self._sub is None:
                    await self.provision()
                    log.info(
                        "consuming %s as durable %r",
                        subjects.EVENTS_STREAM,
                        self._settings.durable_name,
                    )
                assert self._sub is not None
                # Heartbeats during the pull tell a dead server from an empty stream.
                msgs = await self._sub.fetch(
                    self._settings.fetch_batch_size,
                    timeout=FETCH_TIMEOUT_S,
                    heartbeat=FETCH_TIMEOUT_S / 4,
                )
            except TimeoutError:  # nats.errors.TimeoutError and asyncio's: nothing to fetch
                self.caught_up.set()
                continue
            except (
                APIError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionReconnectingError,
            ) as exc:
                # The consumer or stream was deleted, or JetStream is unavailable: fetch would
                # fail instantly forever, so re-provision, pausing longer each time.
                log.warning(
                    "JetStream unavailable (%r): no JetStream on the server, or the stream"
                    " or consumer was deleted; re-provisioning in %.1fs",
                    exc,
                    retry.next_s,
                )
                await self._drop_subscription()
                await retry.pause(stop)
                continue
            retry.reset()
            self.caught_up.clear()
            await self.process(msgs)
        await self._drop_subscription()

    async def drained(self) -> bool:
        """Nothing left in the consumer: none pending and none awaiting an ack."""
        try:
            info = await self._js.consumer_info(subjects.EVENTS_STREAM, self._settings.durable_name)
        except (APIError, nats.errors.Error):
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def _drop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def process(self, msgs: list[Msg]) -> None:
        counted: list[Counted] = []
        rejected: list[RejectedMessage] = []
        dead: list[Outgoing] = []
        verdicts: list[bool] = []
        now = time.time()
        for msg in msgs:
            meta = msg.metadata
            with process_span(
                msg.subject, msg.headers, len(msg.data), self._settings.durable_name
            ) as span:
                verdict = classify(msg.subject, msg.data)
                if isinstance(verdict, Reject):
                    span.set_status(StatusCode.ERROR, f"rejected: {verdict.reason}")
                    rejected.append(
                        RejectedMessage(msg.subject, meta.sequence.stream, verdict, msg.data)
                    )
                    dead.append(self._dead_letter(msg, verdict, now))
                    log.warning(
                        "rejected %s (stream seq %d): %s: %s",
                        msg.subject,
                        meta.sequence.stream,
                        verdict.reason,
                        verdict.detail,
                    )
                else:
                    counted.append(verdict)
                    if (tp := traceparent_of()) is not None:
                        self._scheduler.note_trigger(verdict.config, tp)
                verdicts.append(isinstance(verdict, Counted))
        added = await self._store.record_messages(counted, rejected, dead, now)
        # Acknowledge only now that the transaction has committed.
        for msg, ok in zip(msgs, verdicts, strict=True):
            await (msg.ack() if ok else msg.term())
        telemetry.events_consumed.add(len(msgs))
        for item in rejected:
            telemetry.events_rejected.add(1, {"reason": item.reject.reason})
        for config, games in sorted(added.items()):
            log.info("%s: counted +%d games", config, games)
        if dead:
            self._outbox.notify()
        if added:
            self._scheduler.kick()

    def _dead_letter(self, msg: Msg, reject: Reject, now: float) -> Outgoing:
        meta = msg.metadata
        letter = DeadLetter(
            reason=reject.reason + ": " + reject.detail,
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            deliveries=meta.num_delivered,
            payload=msg.data[:4096].decode("utf-8", errors="replace"),
            timestamp=utc(now),
        )
        return outgoing(
            f"{subjects.DEAD_LETTER}.{reject.reason}",
            letter,
            f"dlq:{meta.stream}:{meta.sequence.stream}",
        )
