"""Pure decisions: is this message countable, may this config export now, how long to back off.

No I/O, no clock, no ``async``: time and state come in as arguments, values come out.
The daemon executes what these functions return.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from msgspec import Struct

from schemas import subjects
from schemas.events import (
    MAX_EVENT_BYTES,
    DataSyncCompleted,
    SelfplayCompleted,
    decode,
    selfplay_decoder,
    sync_decoder,
)
from schemas.settings import Settings


class Counted(Struct, frozen=True, kw_only=True):
    """A valid inbound event: the batches it announces for one config."""

    config: str
    board_type: str
    num_players: int
    event_id: str
    source: str
    batches: tuple[tuple[str, int], ...]  # (batch_id, games)


class Reject(Struct, frozen=True, kw_only=True):
    reason: str  # one of REJECT_REASONS
    detail: str


REJECT_REASONS = (
    "oversized",
    "malformed_json",
    "invalid_event",
    "subject_mismatch",
    "unknown_subject",
)


def classify(subject: str, payload: bytes) -> Counted | Reject:
    """Decide what one inbound message means: batches to count, or why it is rejected."""
    if len(payload) > MAX_EVENT_BYTES:
        return Reject(
            reason="oversized", detail=f"{len(payload)} bytes exceeds {MAX_EVENT_BYTES} bytes"
        )
    if subject.startswith(subjects.SELFPLAY_COMPLETE + "."):
        prefix, decoder = subjects.SELFPLAY_COMPLETE, selfplay_decoder
    elif subject.startswith(subjects.DATA_SYNC_COMPLETED + "."):
        prefix, decoder = subjects.DATA_SYNC_COMPLETED, sync_decoder
    else:
        return Reject(reason="unknown_subject", detail=f"no handler for subject {subject!r}")
    try:
        event = decode(decoder, payload)
    except msgspec.ValidationError as exc:
        return Reject(reason="invalid_event", detail=str(exc))
    except msgspec.DecodeError as exc:
        return Reject(reason="malformed_json", detail=str(exc))
    # The decoder validated board type and players, so this is a valid key; a subject token
    # equal to it is valid too, and the regexes run only for a message that is rejected.
    config = f"{event.board_type}_{event.num_players}p"
    token = subject[len(prefix) + 1 :]
    if token != config:
        try:
            subjects.config_from_subject(subject, prefix)
        except subjects.InvalidConfigKey as exc:
            return Reject(reason="subject_mismatch", detail=str(exc))
        return Reject(
            reason="subject_mismatch",
            detail=f"subject says {token!r} but payload says {config!r}",
        )
    return _counted(event, config)


def _counted(event: SelfplayCompleted | DataSyncCompleted, config: str) -> Counted:
    if isinstance(event, SelfplayCompleted):
        assert event.batch_id is not None  # set from event_id in __post_init__
        batches: tuple[tuple[str, int], ...] = ((event.batch_id, event.games),)
        source = event.node_id
    else:
        batches = tuple((b.batch_id, b.games) for b in event.counted_batches())
        source = event.source_node
    return Counted(
        config=config,
        board_type=event.board_type,
        num_players=event.num_players,
        event_id=event.event_id,
        source=source,
        batches=batches,
    )


# ---- the export gate -------------------------------------------------------------------


class ConfigState(Struct, frozen=True, kw_only=True):
    """What the gate needs to know about one config (read from the state store)."""

    config: str
    games_pending: int = 0
    last_export_time: float = 0.0  # unix seconds; 0 = never exported
    consecutive_failures: int = 0
    backoff_until: float = 0.0  # unix seconds; 0 = not backing off
    paused: bool = False
    force_requested: bool = False
    # An export intent persisted and not finished: running now, or interrupted by a crash.
    running_export_id: str | None = None


class GatePolicy(Struct, frozen=True, kw_only=True):
    threshold: int
    cooldown_s: float
    max_concurrent: int

    @classmethod
    def from_settings(cls, settings: Settings) -> GatePolicy:
        return cls(
            threshold=settings.min_games_threshold,
            cooldown_s=settings.export_cooldown_seconds,
            max_concurrent=settings.max_concurrent_exports,
        )


class StartExport(Struct, frozen=True, kw_only=True):
    config: str
    games_pending: int
    forced: bool
    resume_export_id: str | None = None  # run an interrupted export again


class Hold(Struct, frozen=True, kw_only=True):
    """Not now. ``until`` is when time alone lifts the hold (None: an event or slot must)."""

    config: str
    kind: str  # running | paused | threshold | backoff | cooldown | slots
    reason: str
    until: float | None = None


def gate(
    state: ConfigState, *, live: bool, running_total: int, policy: GatePolicy, now: float
) -> StartExport | Hold:
    """The one export gate every path uses (new games, timers, a freed slot, force, resume).

    ``live``: this process runs a job for the config. A persisted intent without a live job
    was interrupted and is resumed first, before any threshold or cooldown applies.
    """
    config = state.config
    if live:
        return Hold(config=config, kind="running", reason="an export of this config is running")
    forced = state.force_requested
    resuming = state.running_export_id is not None
    if not (forced or resuming):
        if state.paused:
            return Hold(config=config, kind="paused", reason="paused by an operator")
        if state.games_pending < policy.threshold:
            return Hold(
                config=config,
                kind="threshold",
                reason=f"{state.games_pending}/{policy.threshold} games pending",
            )
        if state.backoff_until > now:
            return Hold(
                config=config,
                kind="backoff",
                reason=f"backing off after {state.consecutive_failures} failed exports",
                until=state.backoff_until,
            )
        ready_at = state.last_export_time + policy.cooldown_s
        if state.last_export_time > 0 and ready_at > now:
            return Hold(
                config=config,
                kind="cooldown",
                reason="in cooldown since the last export",
                until=ready_at,
            )
    if running_total >= policy.max_concurrent:
        return Hold(
            config=config,
            kind="slots",
            reason=f"all {policy.max_concurrent} export slots are busy",
        )
    return StartExport(
        config=config,
        games_pending=state.games_pending,
        forced=forced,
        resume_export_id=state.running_export_id,
    )


class Plan(Struct, frozen=True, kw_only=True):
    starts: tuple[StartExport, ...]
    holds: tuple[Hold, ...]
    wake_at: float | None  # earliest time a hold lifts by itself


def plan_exports(
    states: Iterable[ConfigState], *, live: frozenset[str], policy: GatePolicy, now: float
) -> Plan:
    """Apply the gate to every config: resumed exports first, then forced, then the
    longest-waiting. ``live`` holds the configs whose export job runs in this process."""
    order = sorted(
        states,
        key=lambda s: (
            s.running_export_id is None,
            not s.force_requested,
            s.last_export_time,
            s.config,
        ),
    )
    starts: list[StartExport] = []
    holds: list[Hold] = []
    for state in order:
        decision = gate(
            state,
            live=state.config in live,
            running_total=len(live) + len(starts),
            policy=policy,
            now=now,
        )
        if isinstance(decision, StartExport):
            starts.append(decision)
        else:
            holds.append(decision)
    untils = [h.until for h in holds if h.until is not None]
    return Plan(starts=tuple(starts), holds=tuple(holds), wake_at=min(untils, default=None))


def backoff_s(consecutive_failures: int, *, base_s: float, max_s: float) -> float:
    """Exponential backoff after the n-th consecutive failure (n >= 1), capped."""
    if consecutive_failures <= 0:
        return 0.0
    return min(max_s, base_s * 2.0 ** min(consecutive_failures - 1, 60))


def games_left_pending(pending_now: int, taken_at_start: int) -> int:
    """After a successful export: games counted during the export stay pending."""
    return max(0, pending_now - taken_at_start)
