"""The scheduler: applies the export gate when anything changed or a hold expires, runs
the export jobs, and records and announces their outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping

from opentelemetry.trace import Link, SpanKind, StatusCode

from consumer import telemetry
from consumer.decide import (
    ConfigState,
    GatePolicy,
    Hold,
    StartExport,
    backoff_s,
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
from consumer.outbox import Outbox, announcement
from consumer.store import Store
from consumer.telemetry import (
    extract_context,
    traceparent_of,
    tracer,
    trigger_context,
)
from schemas import subjects
from schemas.events import (
    ExportCompleted,
    ExportFailed,
    ExportStarted,
)
from schemas.events import utc_from_unix as utc
from schemas.settings import Settings, SettingsError

log = logging.getLogger("autoexport")

MAX_LINKED_EVENTS = 32
GAUGE_REFRESH_S = 5.0


class Scheduler:
    """Applies the export gate whenever something changed or a hold expires; runs the jobs."""

    def __init__(self, settings: Settings, store: Store, outbox: Outbox) -> None:
        self._settings, self._store, self._outbox = settings, store, outbox
        self._policy = GatePolicy.from_settings(settings)
        self._wake = asyncio.Event()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self.holds: dict[str, Hold] = {}
        self._gauge_due = 0.0
        # Trace contexts of the events whose games the next export of a config includes.
        self.triggers: dict[str, list[str]] = {}

    def note_trigger(self, config: str, traceparent: str) -> None:
        """Remember an event whose games the next export of ``config`` includes (bounded)."""
        links = self.triggers.setdefault(config, [])
        links.append(traceparent)
        del links[:-MAX_LINKED_EVENTS]

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
            # The pending gauge covers every config: refreshed at most every few seconds,
            # and once more after the last change, so it never stays stale.
            gauge_stale = now < self._gauge_due
            if gauge_stale:
                states = await self._store.config_states(min_pending=self._policy.threshold)
            else:  # every config: the gate holds the extra ones for games, as always
                states = await self._store.config_states()
                telemetry.set_games_pending({s.config: s.games_pending for s in states})
                self._gauge_due = now + GAUGE_REFRESH_S
            plan = plan_exports(
                states,
                live=frozenset(self._jobs),
                policy=self._policy,
                now=now,
            )
            for start in plan.starts:
                self._jobs[start.config] = asyncio.create_task(self._export(start))
            self._note_holds(plan.holds)
            wake_at = plan.wake_at
            if gauge_stale:
                wake_at = min(wake_at or self._gauge_due, self._gauge_due)
            timeout = None if wake_at is None else max(0.0, wake_at - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        await self.shutdown()

    def explain(self, states: list[ConfigState]) -> dict[str, Hold]:
        """Why each of ``states`` is not exporting now (for status: the same gate)."""
        live = frozenset(self._jobs)
        plan = plan_exports(states, live=live, policy=self._policy, now=time.time())
        return {hold.config: hold for hold in plan.holds}

    def _note_holds(self, holds: tuple[Hold, ...]) -> None:
        """Log a hold when its kind changes. Waiting for games is the normal state of every
        config between exports: that one is logged at DEBUG, not once per batch."""
        previous, self.holds = self.holds, {h.config: h for h in holds}
        for hold in holds:
            old = previous.get(hold.config)
            if old is None or old.kind != hold.kind:
                until = f" until {utc(hold.until).isoformat()}" if hold.until else ""
                level = logging.DEBUG if hold.kind == "threshold" else logging.INFO
                log.log(level, "%s: export held: %s%s", hold.config, hold.reason, until)

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
                    announcement(started),
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
        # Games counted during an export stay pending, though the export may have included
        # them: the next export can then find nothing new. Say so, rather than make every
        # trainer retrain on the same file.
        unchanged = valid.sha256 == await self._store.last_sha256(config)
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
            unchanged=unchanged,
            timestamp=utc(now),
        )
        await self._store.finish_export_success(
            export_id,
            output_path=valid.output_path,
            samples=valid.samples,
            games_exported=valid.games,
            sha256=valid.sha256,
            announce=announcement(complete),
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
            announce=announcement(failed),
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
