"""The daemon: connect, provision, fetch -> classify -> persist -> ack, gate and run exports.

Three long-lived tasks share one state store: ``Ingest`` (the JetStream pull consumer),
``Scheduler`` (the export gate and the export jobs) and ``Outbox`` (publishes what the
store decided, after it committed). ``control`` answers operators over NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError
from opentelemetry.trace import Link, SpanKind, StatusCode

from consumer import control, telemetry
from consumer.decide import (
    Counted,
    GatePolicy,
    Hold,
    Reject,
    StartExport,
    backoff_s,
    classify,
    plan_exports,
)
from consumer.export.npzwrite import cleanup_stale_temp_files
from consumer.jobs import (
    ValidatedOutput,
    build_argv,
    check_template,
    kill_stale_group,
    process_identity,
    run_job,
)
from consumer.store import Outgoing, RejectedMessage, Store, StoreError
from consumer.streams import ensure_streams
from consumer.telemetry import (
    extract_context,
    inject_headers,
    process_span,
    publish_span,
    traceparent_of,
    tracer,
    trigger_context,
)
from schemas import subjects
from schemas.events import (
    DeadLetter,
    ExportCompleted,
    ExportFailed,
    ExportStarted,
    encoder,
)
from schemas.settings import Settings, SettingsError

log = logging.getLogger("autoexport")

FETCH_TIMEOUT_S = 1.0
MAX_LINKED_EVENTS = 32
RETRY_MAX_S = 30.0


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Retry:
    """Exponential pause between attempts at something that failed (bounded, resettable)."""

    def __init__(self, first_s: float = 0.5, max_s: float = RETRY_MAX_S) -> None:
        self.first_s, self.max_s, self.next_s = first_s, max_s, first_s

    def reset(self) -> None:
        self.next_s = self.first_s

    async def pause(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.next_s)
        self.next_s = min(self.max_s, self.next_s * 2)


# ---- outbox --------------------------------------------------------------------------


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
                    break
                retry.reset()
                await self._store.delete_outbox(row.id)


def outgoing(subject: str, event: msgspec.Struct, msg_id: str) -> Outgoing:
    headers = inject_headers({"Nats-Msg-Id": msg_id})
    return Outgoing(subject, encoder.encode(event), headers)


# ---- scheduler -----------------------------------------------------------------------


class Scheduler:
    """Applies the export gate whenever something changed or a hold expires; runs the jobs."""

    def __init__(self, settings: Settings, store: Store, outbox: Outbox) -> None:
        self._settings, self._store, self._outbox = settings, store, outbox
        self._policy = GatePolicy.from_settings(settings)
        self._wake = asyncio.Event()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self.holds: dict[str, Hold] = {}
        # Trace contexts of the events whose games the next export of a config includes.
        self.triggers: dict[str, list[str]] = {}

    def kick(self) -> None:
        self._wake.set()

    @property
    def running(self) -> list[str]:
        return sorted(self._jobs)

    def idle(self) -> bool:
        """No job runs, no gate pass is due, and no hold lifts by itself later."""
        return (
            not self._jobs
            and not self._wake.is_set()
            and not any(h.until for h in self.holds.values())
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            now = time.time()
            states = await self._store.config_states()
            telemetry.set_games_pending({s.config: s.games_pending for s in states})
            plan = plan_exports(
                states,
                live=frozenset(self._jobs),
                policy=self._policy,
                now=now,
            )
            for start in plan.starts:
                self._jobs[start.config] = asyncio.create_task(self._export(start))
            self._note_holds(plan.holds)
            timeout = None if plan.wake_at is None else max(0.0, plan.wake_at - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        await self.shutdown()

    def _note_holds(self, holds: tuple[Hold, ...]) -> None:
        previous, self.holds = self.holds, {h.config: h for h in holds}
        for hold in holds:
            old = previous.get(hold.config)
            if old is None or old.reason != hold.reason:
                until = f" until {utc(hold.until).isoformat()}" if hold.until else ""
                log.info("%s: export held: %s%s", hold.config, hold.reason, until)

    async def shutdown(self) -> None:
        """Cancel running jobs: run_job kills their process groups. Their persisted intent
        stays, so the next start resumes them."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _export(self, start: StartExport) -> None:
        config = start.config
        try:
            await self._run_export(start)
        except asyncio.CancelledError:
            log.warning("%s: export interrupted by shutdown; it resumes at the next start", config)
            raise
        except Exception:
            # A bug must not kill the scheduler; it shows in the log with its traceback.
            log.exception("%s: export crashed", config)
        finally:
            self._jobs.pop(config, None)
            self.kick()

    async def _run_export(self, start: StartExport) -> None:
        settings, store, config = self._settings, self._store, start.config
        board_type, num_players = subjects.parse_config_key(config)
        resumed = None
        if start.resume_export_id:
            resumed = await store.resume_export(
                start.resume_export_id, start.games_pending, time.time()
            )
            # A resumed attempt continues the trace of the first one.
            parent = extract_context({"traceparent": resumed.traceparent or ""})
            links: list[Link] = []
        else:
            parent, links = trigger_context(self.triggers.pop(config, []))
        with tracer.start_as_current_span(
            f"export {config}", kind=SpanKind.INTERNAL, links=links, context=parent
        ) as span:
            now = time.time()
            output_path = os.path.join(settings.output_dir or "", f"{config}.npz")
            if start.resume_export_id and resumed is not None:
                export_id = start.resume_export_id
                await asyncio.to_thread(
                    _clean_up_attempt, output_path, resumed.job_pgid, resumed.job_identity
                )
                log.info(
                    "%s: resuming interrupted export %s (attempt %d, %d games pending)",
                    config, export_id, resumed.attempt, start.games_pending,
                )  # fmt: skip
            else:
                export_id = new_export_id(config, now)
                started = ExportStarted(
                    export_id=export_id,
                    config=config,
                    board_type=board_type,
                    num_players=num_players,
                    games_pending=start.games_pending,
                    timestamp=utc(now),
                )
                await store.begin_export(
                    export_id,
                    config,
                    start.games_pending,
                    start.forced,
                    traceparent_of(),
                    outgoing(
                        subjects.subject_for(subjects.EXPORT_STARTED, config),
                        started,
                        f"{export_id}:started",
                    ),
                    now,
                )
                self._outbox.notify()
                log.info(
                    "%s: export %s started (%d games pending%s)",
                    config,
                    export_id,
                    start.games_pending,
                    ", forced" if start.forced else "",
                )
            span.set_attribute("autoexport.export_id", export_id)
            argv = job_argv(
                settings,
                {
                    "board_type": board_type,
                    "num_players": num_players,
                    "config": config,
                    "games_dir": settings.games_dir,
                    "output_dir": settings.output_dir,
                    "output_path": output_path,
                    "min_moves": settings.min_moves,
                    "export_id": export_id,
                },
            )
            env = dict(os.environ)
            env.pop("TRACESTATE", None)
            if (tp := traceparent_of()) is not None:
                env["TRACEPARENT"] = tp

            async def remember_job(pgid: int) -> None:
                await store.record_job(export_id, pgid, process_identity(pgid))

            result = await run_job(
                argv, env=env, timeout_s=settings.export_timeout_seconds, on_start=remember_job
            )
            outcome = (
                "success" if result.result is not None
                else "timeout" if result.timed_out
                else "failure"
            )  # fmt: skip
            telemetry.exports.add(1, {"config": config, "outcome": outcome})
            telemetry.export_duration.record(
                result.duration_s, {"config": config, "outcome": outcome}
            )
            span.set_attribute("autoexport.outcome", outcome)
            if result.result is not None:
                await self._succeeded(
                    export_id, config, board_type, num_players, result.result, result.duration_s
                )
            else:
                span.set_status(StatusCode.ERROR, result.error or "export job failed")
                await self._failed(
                    export_id, config, board_type, num_players,
                    result.error or "export job failed", result.exit_code,
                )  # fmt: skip

    async def _succeeded(
        self,
        export_id: str,
        config: str,
        board_type: str,
        num_players: int,
        valid: ValidatedOutput,
        duration_s: float,
    ) -> None:
        now = time.time()
        complete = ExportCompleted(
            export_id=export_id,
            config=config,
            board_type=board_type,
            num_players=num_players,
            output_path=valid.output_path,
            samples=valid.samples,
            games_exported=valid.games,
            duration_seconds=round(duration_s, 3),
            size_bytes=valid.size_bytes,
            sha256=valid.sha256,
            timestamp=utc(now),
        )
        await self._store.finish_export_success(
            export_id,
            output_path=valid.output_path,
            samples=valid.samples,
            games_exported=valid.games,
            announce=outgoing(
                subjects.subject_for(subjects.EXPORT_COMPLETE, config),
                complete,
                f"{export_id}:complete",
            ),
            now=now,
        )
        self._outbox.notify()
        telemetry.samples_exported.add(valid.samples, {"config": config})
        log.info(
            "%s: export %s complete: %d games, %d samples, %.1fs -> %s",
            config,
            export_id,
            valid.games,
            valid.samples,
            duration_s,
            valid.output_path,
        )

    async def _failed(
        self,
        export_id: str,
        config: str,
        board_type: str,
        num_players: int,
        error: str,
        exit_code: int | None,
    ) -> None:
        now = time.time()
        failures = await self._store.consecutive_failures(config) + 1
        retry_at = now + backoff_s(
            failures,
            base_s=self._settings.backoff_base_seconds,
            max_s=self._settings.backoff_max_seconds,
        )
        failed = ExportFailed(
            export_id=export_id,
            config=config,
            board_type=board_type,
            num_players=num_players,
            error=error,
            exit_code=exit_code,
            consecutive_failures=failures,
            retry_at=utc(retry_at),
            timestamp=utc(now),
        )
        await self._store.finish_export_failure(
            export_id,
            error=error,
            exit_code=exit_code,
            backoff_until=retry_at,
            announce=outgoing(
                subjects.subject_for(subjects.EXPORT_FAILED, config), failed, f"{export_id}:failed"
            ),
            now=now,
        )
        self._outbox.notify()
        log.error(
            "%s: export %s failed (%d in a row): %s; backing off until %s",
            config,
            export_id,
            failures,
            error,
            utc(retry_at).isoformat(),
        )


def _clean_up_attempt(output_path: str, pgid: int | None, identity: str | None) -> None:
    """Stop a job the previous daemon left running and remove its half-written files."""
    if pgid is not None and kill_stale_group(pgid, identity):
        log.warning("killed the export job group %d left by the previous daemon", pgid)
    for leftover in cleanup_stale_temp_files(output_path):
        log.warning("removed %s left by the interrupted export", leftover)


def new_export_id(config: str, now: float) -> str:
    stamp = utc(now).strftime("%Y%m%dT%H%M%SZ")
    return f"{config}-{stamp}-{uuid.uuid4().hex[:8]}"


JOB_FIELDS = (
    "board_type", "num_players", "config", "games_dir", "output_dir", "output_path",
    "min_moves", "export_id",
)  # fmt: skip


def check_job_template(settings: Settings) -> None:
    """Refuse at start an export_command naming a field no job ever gets."""
    if settings.export_command is not None:
        try:
            check_template(settings.export_command, JOB_FIELDS)
        except ValueError as exc:
            raise SettingsError(f"invalid setting export_command: {exc}") from None


def job_argv(settings: Settings, fields: Mapping[str, object]) -> list[str]:
    """The configured command, or the built-in exporter run with this interpreter."""
    if settings.export_command is not None:
        return build_argv(settings.export_command, fields)
    argv = [
        sys.executable, "-m", "consumer.cli", "export",
        "--board-type", str(fields["board_type"]),
        "--num-players", str(fields["num_players"]),
        "--games-dir", str(fields["games_dir"]),
        "--output", str(fields["output_path"]),
        "--min-moves", str(fields["min_moves"]),
        "--no-progress",
    ]  # fmt: skip
    if settings.use_incremental_export:
        argv.append("--use-cache")
    if not settings.require_completed_games:
        argv.append("--include-incomplete")
    return argv


# ---- ingest --------------------------------------------------------------------------


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
                        links = self._scheduler.triggers.setdefault(verdict.config, [])
                        links.append(tp)
                        del links[:-MAX_LINKED_EVENTS]
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


# ---- wiring --------------------------------------------------------------------------


async def connect(url: str, stop: asyncio.Event) -> Client | None:
    """Connect, retrying with a clear line each time; reconnect forever once connected."""

    async def disconnected() -> None:
        if not stop.is_set():
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        log.info("reconnected to NATS")

    async def error(exc: Exception) -> None:
        log.warning("NATS client error: %r", exc)

    retry = Retry(first_s=1.0)
    while not stop.is_set():
        try:
            return await nats.connect(
                url,
                name="autoexport",
                max_reconnect_attempts=-1,
                reconnect_time_wait=1.0,
                allow_reconnect=True,
                connect_timeout=5,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except (OSError, nats.errors.Error) as exc:
            log.error(
                "cannot connect to NATS at %s (%r); retrying in %.0fs", url, exc, retry.next_s
            )
            await retry.pause(stop)
    return None


async def run_daemon(
    settings: Settings, stop: asyncio.Event | None = None, *, exit_when_idle: bool = False
) -> int:
    """Run until ``stop`` is set (or, with ``exit_when_idle``, until nothing is left to do)."""
    stop = stop or asyncio.Event()
    assert settings.nats_url is not None, "start an embedded server first"
    for directory in (settings.games_dir, settings.output_dir):
        os.makedirs(directory or "", exist_ok=True)
    try:
        store = await Store.open(settings.state_db or "", owner=True)
    except StoreError as exc:
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
        ingest = Ingest(settings, js, store, outbox, scheduler)
        service = await control.start(nc, store, scheduler)
        tasks = [
            asyncio.create_task(ingest.run(stop), name="ingest"),
            asyncio.create_task(scheduler.run(stop), name="scheduler"),
            asyncio.create_task(outbox.run(stop), name="outbox"),
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
    from consumer.embedded import EmbeddedServer

    try:
        stop_telemetry = telemetry.setup_telemetry("autoexport")
    except telemetry.TelemetryError as exc:
        log.error("%s", exc)
        return 2
    server = None
    if settings.nats_url is None:
        server = EmbeddedServer(
            os.path.join(settings.data_dir, "nats"), port=settings.embedded_nats_port
        )
        url = server.start()
        print(f"embedded nats-server with JetStream at {url}", flush=True)
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
