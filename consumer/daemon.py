"""The daemon: open the state, connect, and run ingest, scheduler, outbox and maintenance
as tasks until stopped; ``serve`` adds the embedded server and signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from consumer import control, telemetry
from consumer.ingest import Ingest
from consumer.outbox import Outbox
from consumer.retry import Retry
from consumer.scheduler import Scheduler
from consumer.store import Store, StoreError
from consumer.undelivered import Undelivered
from schemas.events import utc_from_unix as utc
from schemas.settings import Settings

log = logging.getLogger("autoexport")


async def connect(url: str, stop: asyncio.Event) -> Client | None:
    """Connect, retrying with a clear line each time; reconnect forever once connected."""

    async def disconnected() -> None:
        if not stop.is_set():
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        log.info("reconnected to NATS")

    async def error(exc: Exception) -> None:
        log.warning("NATS at %s: %r (the client keeps retrying)", url, exc)

    retry = Retry(first_s=1.0)
    while not stop.is_set():
        # Raced against stop: the client may retry inside connect() for a long time, and a
        # SIGTERM must still end the daemon.
        attempt = asyncio.ensure_future(
            nats.connect(
                [server.strip() for server in url.split(",")],  # a cluster: several URLs
                name="autoexport",
                max_reconnect_attempts=-1,
                reconnect_time_wait=1.0,
                allow_reconnect=True,
                connect_timeout=5,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        )
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([attempt, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, nats.errors.Error):
                await attempt
            return None
        try:
            return attempt.result()
        except (OSError, nats.errors.Error) as exc:
            log.error(
                "cannot connect to NATS at %s (%r); retrying in %.0fs", url, exc, retry.next_s
            )
            await retry.pause(stop)
    return None


def make_directories(settings: Settings) -> None:
    """Create the directories the daemon writes; raises OSError saying which one failed."""
    for name in ("data_dir", "games_dir", "output_dir"):
        path = getattr(settings, name) or ""
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot use {name} {path}: {exc.strerror}") from None


async def run_daemon(
    settings: Settings, stop: asyncio.Event | None = None, *, exit_when_idle: bool = False
) -> int:
    """Run until ``stop`` is set (or, with ``exit_when_idle``, until nothing is left to do)."""
    stop = stop or asyncio.Event()
    assert settings.nats_url is not None, "start an embedded server first"
    try:
        make_directories(settings)
        store = await Store.open(settings.state_db or "", owner=True)
    except (StoreError, OSError) as exc:
        log.error("%s", exc)
        return 1
    nc = await connect(settings.nats_url, stop)
    if nc is None:
        await store.close()
        return 0
    try:
        js = nc.jetstream()
        outbox = Outbox(store, js)
        scheduler = Scheduler(settings, store, outbox)
        ingest = Ingest(settings, nc, store, outbox, scheduler)
        undelivered = Undelivered(settings, nc, store, outbox, scheduler)
        metadata = {
            "durable": settings.durable_name,
            "data_dir": settings.data_dir,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
        }
        if peers := await control.daemons_consuming(nc, settings.durable_name):
            peer = peers[0]
            log.error(
                "another autoexport daemon (host %s, pid %s, data dir %s) already consumes"
                " durable %r on this server: the two would split the events. Give each"
                " daemon its own durable_name, or stop the other one.",
                peer.get("host"), peer.get("pid"), peer.get("data_dir"), settings.durable_name,
            )  # fmt: skip
            stop.set()  # quiet: the disconnect that follows is ours
            return 1
        service = await control.start(nc, store, scheduler, metadata)
        tasks = [
            asyncio.create_task(ingest.run(stop), name="ingest"),
            asyncio.create_task(scheduler.run(stop), name="scheduler"),
            asyncio.create_task(outbox.run(stop), name="outbox"),
            asyncio.create_task(undelivered.run(stop, ingest.provisioned), name="undelivered"),
            asyncio.create_task(maintain(store, settings, stop), name="maintenance"),
        ]
        if exit_when_idle:
            tasks.append(asyncio.create_task(_stop_when_idle(stop, ingest, scheduler, outbox)))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
        stop.set()  # one task ending (a bug) stops the rest
        scheduler.kick()
        outbox.notify()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.stop()
        failed = [t for t in tasks if not t.cancelled() and t.exception() is not None]
        for task in failed:
            log.error("%s failed", task.get_name(), exc_info=task.exception())
        return 1 if failed else 0
    finally:
        await store.close()
        with contextlib.suppress(nats.errors.Error):
            await nc.drain()


MAINTENANCE_INTERVAL_S = 3600.0


async def maintain(store: Store, settings: Settings, stop: asyncio.Event) -> None:
    """Hourly: forget batch ids and rejections older than the retention."""
    while not stop.is_set():
        before = time.time() - settings.retention_days * 86_400
        batches, rejections = await store.retire(before)
        if batches or rejections:
            log.info("retired %d batch ids and %d rejections older than %s", batches,
                     rejections, utc(before).isoformat())  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), MAINTENANCE_INTERVAL_S)


async def _stop_when_idle(
    stop: asyncio.Event, ingest: Ingest, scheduler: Scheduler, outbox: Outbox
) -> None:
    """For batch use and tests: stop once every message is counted and acknowledged (also
    those a crashed predecessor fetched: they return after ack_wait), no export runs or waits
    on a timer, and every announcement is published."""
    while not stop.is_set():
        await ingest.caught_up.wait()
        await outbox.empty.wait()
        if (
            ingest.caught_up.is_set()
            and outbox.empty.is_set()
            and scheduler.idle()
            and await ingest.drained()
        ):
            stop.set()
            return
        await asyncio.sleep(0.1)  # a finished job or kick changes idleness without an event


def serve(settings: Settings, *, exit_when_idle: bool = False) -> int:
    """``autoexport run``: start an embedded server if no URL is set, run until a signal."""
    from consumer.embedded import EmbeddedServer, EmbeddedServerError

    try:
        stop_telemetry = telemetry.setup_telemetry("autoexport")
    except telemetry.TelemetryError as exc:
        log.error("%s", exc)
        return 2
    try:
        make_directories(settings)  # before an embedded server starts in them
    except OSError as exc:
        log.error("%s", exc)
        stop_telemetry()
        return 1
    server = None
    if settings.nats_url is None:
        server = EmbeddedServer(
            os.path.join(settings.data_dir, "nats"), port=settings.embedded_nats_port
        )
        try:
            url = server.start()
        except EmbeddedServerError as exc:
            log.error("%s", exc)
            stop_telemetry()
            return 1
        settings = msgspec.structs.replace(settings, nats_url=url)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_daemon(settings, stop, exit_when_idle=exit_when_idle)

    try:
        return asyncio.run(main())
    finally:
        if server is not None:
            server.stop()
        stop_telemetry()
