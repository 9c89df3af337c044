"""A JetStream pull consumer read through one inbox subscription.

nats-py's ``fetch`` starts a task, a ``wait_for`` and a uuid per message, which cost more
than everything the daemon does with a message (the benchmark in BENCHMARKS.md). This
speaks the pull protocol itself: a request to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>``
whose replies (messages, then a status) arrive on a per-request subject under one
wildcard subscription, collected by a plain callback. nats-py still does everything else
(connection, reconnects, acks).

Statuses (headers ``Status``/``Description``, no payload, no ack subject):
100 idle heartbeat, 404 no messages, 408 request expired, 409 a condition of the consumer
or of this request, 503 no responders (no such consumer, or no JetStream).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from consumer.retry import unless_stopped

FETCH_SILENCE_S = 1.0  # a no-wait request's answer normally takes milliseconds
FETCH_SETTLE_S = 0.05  # a pause this long within an answer: the server holds the rest back
# Conditions that end one pull request but say nothing is wrong with the consumer.
RETRYABLE_409 = ("Exceeded MaxWaiting", "Leadership Change", "Server Shutdown")


class PullError(Exception):
    """The server ended a pull with a status that needs more than another pull (the
    consumer or stream was deleted, JetStream is unavailable, the request was refused)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"pull answered {code} {description}")
        self.code, self.description = code, description


class PullStalled(Exception):
    """Nothing came back for a pull (no message, status or heartbeat) in time: the
    connection or the server is gone."""


class PullRequest(msgspec.Struct, omit_defaults=True):
    batch: int
    expires: int = 0  # nanoseconds
    no_wait: bool = False
    idle_heartbeat: int = 0  # nanoseconds


_encode = msgspec.json.Encoder().encode


class PullConsumer:
    """Pull batches of one durable consumer. ``fetch`` takes what is available now;
    ``wait`` holds a request open until a message arrives, with idle heartbeats."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        *,
        expires_s: float = 10.0,
        heartbeat_s: float = 2.0,
    ) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._expires_s, self._heartbeat_s = expires_s, heartbeat_s
        self._sub: Subscription | None = None
        self._requests = 0
        self._current = ""  # reply subject of the request being waited for
        self._ended: tuple[int, str] | None = None  # its final status
        self._buffer: list[Msg] = []  # messages of any request, not yet handed out
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    async def fetch(self, batch: int) -> list[Msg]:
        """Up to ``batch`` messages that are available now (maybe none).

        The server answers a no-wait request at once, except when the consumer has
        max_ack_pending messages unacknowledged: then it sends what the limit allows and
        stays silent. So silence here ends the fetch rather than meaning a dead link (``wait``,
        with heartbeats, tells those apart); what the request brings later is kept."""
        if len(self._buffer) < batch:
            had = len(self._buffer)
            await self._request(PullRequest(batch - had, no_wait=True))
            # Messages of one answer arrive back to back: a pause after some means the
            # server is holding the rest back, so take those rather than wait.
            await self._until(
                lambda: len(self._buffer) >= batch,
                lambda: FETCH_SETTLE_S if len(self._buffer) > had else FETCH_SILENCE_S,
                stalled=False,
            )
        return self._take(batch)

    async def wait(self, stop: asyncio.Event | None = None) -> list[Msg]:
        """Hold a request open until a message arrives (returned, with any already
        buffered), until it expires, or until ``stop`` is set (both return nothing).

        The request asks for one message, so it ends with it: the server never holds more
        than one of ours, however often a trickle of messages wakes us; ``fetch`` then
        takes whatever followed."""
        if stop is None:
            return await self._wait()
        # Stopped: a message of the open request comes back after ack_wait.
        return await unless_stopped(self._wait(), stop) or []

    async def _wait(self) -> list[Msg]:
        if not self._buffer:
            await self._request(
                PullRequest(
                    1,
                    expires=int(self._expires_s * 1e9),
                    idle_heartbeat=int(self._heartbeat_s * 1e9),
                )
            )
            await self._until(lambda: bool(self._buffer), 2 * self._heartbeat_s)
        return self._take(len(self._buffer))

    # ---- internals -----------------------------------------------------------------------

    async def _request(self, request: PullRequest) -> None:
        if self._sub is None:
            await self.start()
        self._requests += 1
        self._current, self._ended = f"{self._inbox}.{self._requests}", None
        await self._nc.publish(self._next_subject, _encode(request), reply=self._current)

    async def _until(
        self,
        enough: Callable[[], bool],
        silence_s: float | Callable[[], float],
        *,
        stalled: bool = True,
    ) -> None:
        """Wait until ``enough()`` or the current request ended. If nothing at all arrives
        for ``silence_s`` (heartbeats count): raise ``PullStalled``, or with ``stalled``
        false, return."""
        while not enough():
            if self._ended is not None:
                code, description = self._ended
                if code in (404, 408) or (code == 409 and description in RETRYABLE_409):
                    return
                raise PullError(code, description)
            self._wake.clear()
            limit = silence_s() if callable(silence_s) else silence_s
            try:
                await asyncio.wait_for(self._wake.wait(), limit)
            except TimeoutError:
                if not stalled:
                    return
                raise PullStalled(
                    f"no reply to a pull request on {self._next_subject} in {limit:.0f}s"
                ) from None

    def _take(self, batch: int) -> list[Msg]:
        taken, self._buffer = self._buffer[:batch], self._buffer[batch:]
        return taken

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a stream message (its reply subject is the ack subject)
            self._buffer.append(msg)
        elif msg.subject == self._current:  # a status of the request being waited for
            headers = msg.headers or {}
            code = int(headers.get("Status", "0") or 0)
            if code != 100:  # heartbeats only show the link is alive
                # A 503 has no description: nats-py puts the next header line there.
                description = headers.get("Description", "").strip().split("\r\n", 1)[0]
                self._ended = (code, "No Responders" if code == 503 else description)
        self._wake.set()
