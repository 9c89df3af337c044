"""Events JetStream gave up on. After ``max_deliver`` deliveries without an ack (a daemon
that kept crashing, a disk that kept failing) the server stops delivering a message and
only says so in an advisory: its games would never count, and nobody would know. A stream
keeps those advisories, even while the daemon is down; this task reads the daemon's own,
fetches each given-up event from the events stream and processes it like any other
(counted once, or rejected and dead-lettered with its reason)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from consumer.decide import Reject, classify
from consumer.ingest import dead_letter
from consumer.outbox import Outbox
from consumer.pull import PullConsumer, PullError, PullStalled
from consumer.retry import Retry, unless_stopped
from consumer.scheduler import Scheduler
from consumer.store import RejectedMessage, Store
from consumer.streams import ensure_streams
from schemas import subjects
from schemas.settings import Settings

log = logging.getLogger("autoexport")


class MaxDeliveries(msgspec.Struct):
    """The fields of ``io.nats.jetstream.advisory.v1.max_deliver`` this task reads."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_decode_advisory = msgspec.json.Decoder(MaxDeliveries).decode


class Undelivered:
    def __init__(
        self, settings: Settings, nc: Client, store: Store, outbox: Outbox, scheduler: Scheduler
    ) -> None:
        self._durable = settings.durable_name
        self._nc, self._js = nc, nc.jetstream()
        self._store, self._outbox, self._scheduler = store, outbox, scheduler
        self._pull: PullConsumer | None = None

    async def run(self, stop: asyncio.Event, streams_ready: asyncio.Event) -> None:
        """Read advisories until ``stop``; starts once ``streams_ready`` (ingest creates
        every stream at start, and two creators would race)."""
        await unless_stopped(streams_ready.wait(), stop)
        retry = Retry()
        while not stop.is_set():
            try:
                if self._pull is None:
                    self._pull = await self._subscribe()
                msgs = await self._pull.fetch(100) or await self._pull.wait(stop)
                for msg in msgs:
                    await self._recover(msg)
                    await msg.ack()
            except (APIError, PullError, PullStalled, nats.errors.Error) as exc:
                log.warning("reading undelivered-event advisories failed (%r); retrying", exc)
                await self._unsubscribe()
                await retry.pause(stop)
                continue
            retry.reset()
        await self._unsubscribe()

    async def _subscribe(self) -> PullConsumer:
        durable = f"{self._durable}-undelivered"
        config = ConsumerConfig(
            durable_name=durable,
            description="autoexport: events the server stopped delivering to the daemon",
            filter_subject=f"{subjects.UNDELIVERED_PREFIX}.{self._durable}",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
        )
        try:
            await self._js.add_consumer(subjects.UNDELIVERED_STREAM, config)
        except NotFoundError:  # the stream was deleted (ingest creates them all at start)
            await ensure_streams(self._js)
            await self._js.add_consumer(subjects.UNDELIVERED_STREAM, config)
        pull = PullConsumer(self._nc, subjects.UNDELIVERED_STREAM, durable)
        await pull.start()
        return pull

    async def _unsubscribe(self) -> None:
        pull, self._pull = self._pull, None
        if pull is not None:
            with contextlib.suppress(nats.errors.Error):
                await pull.close()

    async def _recover(self, msg: Msg) -> None:
        try:
            advisory = _decode_advisory(msg.data)
        except msgspec.DecodeError as exc:
            log.error("ignoring an unreadable max-deliveries advisory: %s", exc)
            return
        seq, now = advisory.stream_seq, time.time()
        try:
            event = await self._js.get_msg(subjects.EVENTS_STREAM, seq)
        except NotFoundError:
            log.error(
                "JetStream gave up delivering event %d after %d deliveries, and the stream no"
                " longer holds it: its games were not counted", seq, advisory.deliveries,
            )  # fmt: skip
            return
        subject, payload = event.subject or "", event.data or b""
        verdict = classify(subject, payload)
        if isinstance(verdict, Reject):
            rejected = [RejectedMessage(subject, seq, verdict, payload)]
            dead = [dead_letter(subject, seq, advisory.deliveries, payload, verdict, now)]
            await self._store.record_messages([], rejected, dead, now)
            self._outbox.notify()
            log.warning("rejected undelivered %s (stream seq %d): %s", subject, seq, verdict.detail)
            return
        added = await self._store.record_messages([verdict], [], [], now)
        log.warning(
            "JetStream gave up delivering %s (stream seq %d) after %d deliveries;"
            " recovered it: %s", subject, seq, advisory.deliveries,
            f"+{sum(added.values())} games" if added else "already counted",
        )  # fmt: skip
        if added:
            self._scheduler.kick()
