"""consumer.decide from tables: classify, the gate, the plan, backoff, pending after success."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumer.decide import (
    REJECT_REASONS,
    ConfigState,
    Counted,
    GatePolicy,
    Hold,
    Reject,
    StartExport,
    backoff_s,
    classify,
    games_left_pending,
    gate,
    plan_exports,
)
from schemas.events import MAX_EVENT_BYTES, MAX_GAMES_PER_EVENT
from schemas.settings import Settings

SELFPLAY = "selfplay.complete.hex8_2p"
SYNC = "data.sync.completed.hex8_2p"
DROP = object()  # an override value that removes the field


def payload(base: dict[str, Any], overrides: dict[str, Any]) -> bytes:
    data = {**base, **overrides}
    return json.dumps({k: v for k, v in data.items() if v is not DROP}).encode()


def selfplay(**overrides: Any) -> bytes:
    base = {
        "event_id": "ev-1",
        "board_type": "hex8",
        "num_players": 2,
        "games": 25,
        "node_id": "node-a",
        "timestamp": "2024-05-01T12:00:00Z",
    }
    return payload(base, overrides)


def sync(**overrides: Any) -> bytes:
    base = {
        "event_id": "sync-1",
        "board_type": "hex8",
        "num_players": 2,
        "source_node": "node-a",
        "batches": [{"batch_id": "b1", "games": 10}, {"batch_id": "b2", "games": 7}],
        "timestamp": "2024-05-01T12:00:00+00:00",
    }
    return payload(base, overrides)


# ---- classify: rejections ----------------------------------------------------------------

REJECTIONS = [
    # (subject, payload, reason, text the detail must contain)
    pytest.param(
        SELFPLAY,
        b" " * (MAX_EVENT_BYTES + 1),
        "oversized",
        str(MAX_EVENT_BYTES),
        id="oversized-payload",
    ),
    pytest.param(SELFPLAY, b'{"event_id": ', "malformed_json", "", id="truncated-json"),
    pytest.param(SELFPLAY, b"\xff\xfe", "malformed_json", "", id="not-utf8"),
    pytest.param(SELFPLAY, b"", "malformed_json", "", id="empty-payload"),
    pytest.param(
        SELFPLAY,
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "malformed_json",
        "nested too deeply",
        id="deeply-nested-json",
    ),
    pytest.param(SELFPLAY, b"[1, 2]", "invalid_event", "object", id="json-array-not-object"),
    pytest.param(SELFPLAY, b"null", "invalid_event", "object", id="json-null"),
    pytest.param(SELFPLAY, selfplay(games="25"), "invalid_event", "$.games", id="games-as-string"),
    pytest.param(SELFPLAY, selfplay(games=2.5), "invalid_event", "$.games", id="games-as-float"),
    pytest.param(SELFPLAY, selfplay(games=True), "invalid_event", "$.games", id="games-as-bool"),
    pytest.param(
        SELFPLAY,
        selfplay(num_players="2"),
        "invalid_event",
        "$.num_players",
        id="players-as-string",
    ),
    pytest.param(SELFPLAY, selfplay(node_id=7), "invalid_event", "$.node_id", id="node-id-as-int"),
    pytest.param(SELFPLAY, selfplay(games=DROP), "invalid_event", "games", id="missing-games"),
    pytest.param(
        SELFPLAY,
        selfplay(games=DROP, games_generated=25),
        "invalid_event",
        "games",
        id="drifted-field-name-games-generated",
    ),
    pytest.param(
        SELFPLAY, selfplay(event_id=DROP), "invalid_event", "event_id", id="missing-event-id"
    ),
    pytest.param(
        SELFPLAY, selfplay(node_id=DROP), "invalid_event", "node_id", id="missing-node-id"
    ),
    pytest.param(
        SELFPLAY, selfplay(timestamp=DROP), "invalid_event", "timestamp", id="missing-timestamp"
    ),
    pytest.param(SELFPLAY, selfplay(games=-1), "invalid_event", "$.games", id="negative-games"),
    pytest.param(
        SELFPLAY,
        selfplay(games=MAX_GAMES_PER_EVENT + 1),
        "invalid_event",
        "$.games",
        id="absurd-games",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="hex.8"),
        "invalid_event",
        "$.board_type",
        id="board-type-with-dot",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="hex*"),
        "invalid_event",
        "$.board_type",
        id="board-type-with-star",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="hex>"),
        "invalid_event",
        "$.board_type",
        id="board-type-with-gt",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="hex 8"),
        "invalid_event",
        "$.board_type",
        id="board-type-with-space",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="Hex8"),
        "invalid_event",
        "$.board_type",
        id="board-type-uppercase",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="8hex"),
        "invalid_event",
        "$.board_type",
        id="board-type-starting-with-digit",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(board_type="h" * 33),
        "invalid_event",
        "$.board_type",
        id="board-type-too-long",
    ),
    pytest.param(
        SELFPLAY, selfplay(num_players=0), "invalid_event", "$.num_players", id="zero-players"
    ),
    pytest.param(
        SELFPLAY,
        selfplay(num_players=17),
        "invalid_event",
        "$.num_players",
        id="seventeen-players",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(event_id="has space"),
        "invalid_event",
        "$.event_id",
        id="event-id-with-space",
    ),
    pytest.param(
        SELFPLAY, selfplay(event_id=""), "invalid_event", "$.event_id", id="empty-event-id"
    ),
    pytest.param(
        SELFPLAY,
        selfplay(batch_id="x" * 129),
        "invalid_event",
        "$.batch_id",
        id="batch-id-too-long",
    ),
    pytest.param(
        "selfplay.complete.hex8_3p",
        selfplay(),
        "subject_mismatch",
        "hex8_3p",
        id="subject-players-disagree-with-payload",
    ),
    pytest.param(
        "selfplay.complete.go9_2p",
        selfplay(),
        "subject_mismatch",
        "go9_2p",
        id="subject-board-disagrees-with-payload",
    ),
    pytest.param(
        "data.sync.completed.go9_2p",
        sync(),
        "subject_mismatch",
        "go9_2p",
        id="sync-subject-disagrees-with-payload",
    ),
    pytest.param(
        "selfplay.complete.hex8_2p.extra",
        selfplay(),
        "subject_mismatch",
        "hex8_2p.extra",
        id="subject-with-extra-token",
    ),
    pytest.param(
        "selfplay.complete.Hex8_2p",
        selfplay(),
        "subject_mismatch",
        "Hex8_2p",
        id="subject-token-uppercase",
    ),
    pytest.param(
        "npz.export.complete.hex8_2p",
        selfplay(),
        "unknown_subject",
        "npz.export.complete",
        id="outbound-subject",
    ),
    pytest.param(
        "selfplay.completed.hex8_2p",
        selfplay(),
        "unknown_subject",
        "selfplay.completed",
        id="near-miss-subject",
    ),
    pytest.param(
        "selfplay.complete",
        selfplay(),
        "unknown_subject",
        "selfplay.complete",
        id="subject-without-config-token",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(timestamp="2024-05-01T12:00:00"),
        "invalid_event",
        "timezone",
        id="naive-timestamp",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(timestamp="yesterday"),
        "invalid_event",
        "$.timestamp",
        id="timestamp-not-iso",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(timestamp=1714564800),
        "invalid_event",
        "$.timestamp",
        id="timestamp-as-unix-number",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(db_path="/data/games/a.db"),
        "invalid_event",
        "db_path",
        id="db-path-absolute",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(db_path="../other/a.db"),
        "invalid_event",
        "db_path",
        id="db-path-escaping-with-dotdot",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(db_path="node/../../a.db"),
        "invalid_event",
        "db_path",
        id="db-path-escaping-after-normalising",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(db_path="node\\a.db"),
        "invalid_event",
        "db_path",
        id="db-path-with-backslash",
    ),
    pytest.param(SELFPLAY, selfplay(db_path=""), "invalid_event", "db_path", id="db-path-empty"),
    pytest.param(
        SYNC,
        sync(games_synced=5),
        "invalid_event",
        "exactly one",
        id="sync-with-both-batches-and-games-synced",
    ),
    pytest.param(
        SYNC,
        sync(batches=DROP),
        "invalid_event",
        "exactly one",
        id="sync-with-neither-batches-nor-games-synced",
    ),
    pytest.param(
        SYNC,
        sync(batches=None, games_synced=None),
        "invalid_event",
        "exactly one",
        id="sync-with-both-null",
    ),
    pytest.param(
        SYNC,
        sync(batches=[{"batch_id": f"b{i}", "games": 1_000_000} for i in range(3)]),
        "invalid_event",
        "add up to 3000000 games",
        id="sync-batches-add-up-to-an-absurd-count",
    ),
    pytest.param(
        SYNC,
        sync(batches=[{"batch_id": "b1", "games": -3}]),
        "invalid_event",
        "$.batches[0].games",
        id="sync-batch-negative-games",
    ),
    pytest.param(
        SYNC,
        sync(batches=[{"batch_id": "b1"}]),
        "invalid_event",
        "games",
        id="sync-batch-missing-games",
    ),
    pytest.param(
        SYNC,
        sync(batches=DROP, games_synced=-1),
        "invalid_event",
        "$.games_synced",
        id="sync-negative-games-synced",
    ),
    pytest.param(
        SYNC, sync(source_node=DROP), "invalid_event", "source_node", id="sync-missing-source"
    ),
    pytest.param(
        SYNC,
        selfplay(),
        "invalid_event",
        "source_node",
        id="selfplay-payload-on-sync-subject",
    ),
]


@pytest.mark.parametrize(("subject", "data", "reason", "detail"), REJECTIONS)
def test_classify_rejects(subject: str, data: bytes, reason: str, detail: str) -> None:
    decision = classify(subject, data)
    assert isinstance(decision, Reject), decision
    assert decision.reason == reason
    assert decision.reason in REJECT_REASONS
    assert detail in decision.detail


def test_classify_accepts_a_payload_of_exactly_the_size_limit() -> None:
    data = selfplay()
    data = data + b" " * (MAX_EVENT_BYTES - len(data))
    assert len(data) == MAX_EVENT_BYTES
    assert isinstance(classify(SELFPLAY, data), Counted)


def test_classify_checks_size_before_decoding() -> None:
    decision = classify("not.a.known.subject", b"x" * (MAX_EVENT_BYTES + 1))
    assert decision == Reject(reason="oversized", detail=decision.detail)


# ---- classify: counted shapes ------------------------------------------------------------

COUNTED = [
    pytest.param(
        SELFPLAY,
        selfplay(),
        "ev-1",
        "node-a",
        (("ev-1", 25),),
        id="selfplay-batch-id-defaults-to-event-id",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(batch_id=None),
        "ev-1",
        "node-a",
        (("ev-1", 25),),
        id="selfplay-null-batch-id-defaults-to-event-id",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(batch_id="batch-9"),
        "ev-1",
        "node-a",
        (("batch-9", 25),),
        id="selfplay-explicit-batch-id",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(games=0),
        "ev-1",
        "node-a",
        (("ev-1", 0),),
        id="selfplay-zero-games",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(games=MAX_GAMES_PER_EVENT),
        "ev-1",
        "node-a",
        (("ev-1", MAX_GAMES_PER_EVENT),),
        id="selfplay-games-at-limit",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(db_path="node-a/games.db"),
        "ev-1",
        "node-a",
        (("ev-1", 25),),
        id="selfplay-relative-db-path",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(db_path="node-a/../node-b/games.db"),
        "ev-1",
        "node-a",
        (("ev-1", 25),),
        id="selfplay-db-path-with-inner-dotdot-staying-inside",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(timestamp="2024-05-01T14:00:00+02:00"),
        "ev-1",
        "node-a",
        (("ev-1", 25),),
        id="selfplay-timestamp-with-offset",
    ),
    pytest.param(
        SELFPLAY,
        selfplay(games_generated=999, future_field={"x": 1}),
        "ev-1",
        "node-a",
        (("ev-1", 25),),
        id="selfplay-unknown-fields-ignored",
    ),
    pytest.param(
        SYNC,
        sync(),
        "sync-1",
        "node-a",
        (("b1", 10), ("b2", 7)),
        id="sync-batches",
    ),
    pytest.param(
        SYNC,
        sync(batches=DROP, games_synced=40),
        "sync-1",
        "node-a",
        (("sync-1", 40),),
        id="sync-games-synced-is-one-batch-named-by-event-id",
    ),
    pytest.param(
        SYNC,
        sync(batches=None, games_synced=40),
        "sync-1",
        "node-a",
        (("sync-1", 40),),
        id="sync-null-batches-with-games-synced",
    ),
    pytest.param(
        SYNC,
        sync(extra="ignored", batches=[{"batch_id": "b1", "games": 3, "moves": 99}]),
        "sync-1",
        "node-a",
        (("b1", 3),),
        id="sync-unknown-fields-ignored",
    ),
]


@pytest.mark.parametrize(("subject", "data", "event_id", "source", "batches"), COUNTED)
def test_classify_counts(
    subject: str,
    data: bytes,
    event_id: str,
    source: str,
    batches: tuple[tuple[str, int], ...],
) -> None:
    assert classify(subject, data) == Counted(
        config="hex8_2p",
        board_type="hex8",
        num_players=2,
        event_id=event_id,
        source=source,
        batches=batches,
    )


@pytest.mark.parametrize(
    ("board", "players"), [("a", 1), ("go19", 16), ("x" + "9" * 31, 4)], ids=str
)
def test_classify_accepts_every_valid_config_shape(board: str, players: int) -> None:
    subject = f"selfplay.complete.{board}_{players}p"
    decision = classify(subject, selfplay(board_type=board, num_players=players))
    assert isinstance(decision, Counted)
    assert decision.config == f"{board}_{players}p"


# ---- the gate ----------------------------------------------------------------------------

NOW = 1_000_000.0
POLICY = GatePolicy(threshold=100, cooldown_s=300.0, max_concurrent=2)


def state(**fields: Any) -> ConfigState:
    return ConfigState(**{"config": "hex8_2p", "games_pending": 150, **fields})


def test_gate_policy_from_settings() -> None:
    settings = Settings(
        min_games_threshold=7, export_cooldown_seconds=12.5, max_concurrent_exports=3
    )
    assert GatePolicy.from_settings(settings) == GatePolicy(
        threshold=7, cooldown_s=12.5, max_concurrent=3
    )


HOLDS = [
    # (state, live, running_total, reason fragment, until)
    pytest.param(state(), True, 1, "running", None, id="live-export-of-this-config"),
    pytest.param(state(force_requested=True), True, 1, "running", None, id="forced-but-live"),
    pytest.param(
        state(running_export_id="x1"),
        True,
        1,
        "running",
        None,
        id="persisted-intent-with-live-job-is-not-resumed",
    ),
    pytest.param(state(paused=True), False, 0, "paused", None, id="paused"),
    pytest.param(state(games_pending=99), False, 0, "99/100", None, id="below-threshold"),
    pytest.param(state(games_pending=0), False, 0, "0/100", None, id="nothing-pending"),
    pytest.param(
        state(consecutive_failures=3, backoff_until=NOW + 60),
        False,
        0,
        "3 failed",
        NOW + 60,
        id="backing-off",
    ),
    pytest.param(state(last_export_time=NOW - 100), False, 0, "cooldown", NOW + 200, id="cooldown"),
    pytest.param(state(), False, 2, "slots", None, id="all-slots-busy"),
    pytest.param(state(), False, 5, "slots", None, id="more-running-than-slots"),
    pytest.param(
        state(force_requested=True), False, 2, "slots", None, id="forced-still-needs-a-slot"
    ),
    pytest.param(
        state(running_export_id="x1"), False, 2, "slots", None, id="resume-still-needs-a-slot"
    ),
    pytest.param(
        state(paused=True, games_pending=0),
        False,
        0,
        "paused",
        None,
        id="paused-reported-before-threshold",
    ),
    pytest.param(
        state(backoff_until=NOW + 60, last_export_time=NOW - 10),
        False,
        0,
        "failed",
        NOW + 60,
        id="backoff-reported-before-cooldown",
    ),
]


@pytest.mark.parametrize(("st", "live", "running_total", "reason", "until"), HOLDS)
def test_gate_holds(
    st: ConfigState, live: bool, running_total: int, reason: str, until: float | None
) -> None:
    decision = gate(st, live=live, running_total=running_total, policy=POLICY, now=NOW)
    assert isinstance(decision, Hold), decision
    assert decision.config == st.config
    assert reason in decision.reason
    assert decision.until == until


STARTS = [
    # (state, running_total, forced, resume id)
    pytest.param(state(games_pending=100), 0, False, None, id="exactly-at-threshold"),
    pytest.param(state(), 1, False, None, id="one-slot-left"),
    pytest.param(state(last_export_time=0.0), 0, False, None, id="never-exported-no-cooldown"),
    pytest.param(state(last_export_time=NOW - 300), 0, False, None, id="cooldown-just-elapsed"),
    pytest.param(
        state(backoff_until=NOW, consecutive_failures=2),
        0,
        False,
        None,
        id="backoff-just-elapsed",
    ),
    pytest.param(
        state(backoff_until=NOW - 1, consecutive_failures=2),
        0,
        False,
        None,
        id="backoff-in-the-past",
    ),
    pytest.param(
        state(force_requested=True, games_pending=0),
        0,
        True,
        None,
        id="forced-bypasses-threshold",
    ),
    pytest.param(
        state(force_requested=True, last_export_time=NOW - 1),
        0,
        True,
        None,
        id="forced-bypasses-cooldown",
    ),
    pytest.param(
        state(force_requested=True, backoff_until=NOW + 600, consecutive_failures=4),
        0,
        True,
        None,
        id="forced-bypasses-backoff",
    ),
    pytest.param(
        state(force_requested=True, paused=True), 0, True, None, id="forced-bypasses-pause"
    ),
    pytest.param(
        state(running_export_id="x1", games_pending=3),
        0,
        False,
        "x1",
        id="interrupted-export-resumed-below-threshold",
    ),
    pytest.param(
        state(running_export_id="x1", last_export_time=NOW - 1),
        0,
        False,
        "x1",
        id="interrupted-export-resumed-in-cooldown",
    ),
    pytest.param(
        state(running_export_id="x1", backoff_until=NOW + 60),
        0,
        False,
        "x1",
        id="interrupted-export-resumed-in-backoff",
    ),
    pytest.param(
        state(running_export_id="x1", paused=True),
        0,
        False,
        "x1",
        id="interrupted-export-resumed-while-paused",
    ),
    pytest.param(
        state(running_export_id="x1", force_requested=True),
        1,
        True,
        "x1",
        id="interrupted-and-forced",
    ),
]


@pytest.mark.parametrize(("st", "running_total", "forced", "resume"), STARTS)
def test_gate_starts(st: ConfigState, running_total: int, forced: bool, resume: str | None) -> None:
    decision = gate(st, live=False, running_total=running_total, policy=POLICY, now=NOW)
    assert decision == StartExport(
        config=st.config, games_pending=st.games_pending, forced=forced, resume_export_id=resume
    )


def test_gate_cooldown_applies_only_after_a_first_export() -> None:
    never = state(last_export_time=0.0)
    policy = GatePolicy(threshold=1, cooldown_s=10 * NOW, max_concurrent=1)
    assert isinstance(gate(never, live=False, running_total=0, policy=policy, now=NOW), StartExport)
    once = state(last_export_time=1.0)
    decision = gate(once, live=False, running_total=0, policy=policy, now=NOW)
    assert decision == Hold(
        config="hex8_2p",
        kind="cooldown",
        reason="in cooldown since the last export",
        until=1.0 + 10 * NOW,
    )


def test_gate_with_zero_cooldown_starts_right_after_an_export() -> None:
    policy = GatePolicy(threshold=100, cooldown_s=0.0, max_concurrent=2)
    just_exported = state(last_export_time=NOW)
    decision = gate(just_exported, live=False, running_total=0, policy=policy, now=NOW)
    assert isinstance(decision, StartExport)


# ---- plan_exports ------------------------------------------------------------------------


def test_plan_orders_resumes_then_forced_then_longest_waiting() -> None:
    states = [
        ConfigState(config="recent_2p", games_pending=500, last_export_time=NOW - 1000),
        ConfigState(config="forced_2p", games_pending=0, force_requested=True),
        ConfigState(config="oldest_2p", games_pending=500, last_export_time=NOW - 9000),
        ConfigState(config="resumed_2p", games_pending=0, running_export_id="r1"),
        ConfigState(config="never_2p", games_pending=500),
    ]
    policy = GatePolicy(threshold=100, cooldown_s=300.0, max_concurrent=10)
    plan = plan_exports(states, live=frozenset(), policy=policy, now=NOW)
    assert [s.config for s in plan.starts] == [
        "resumed_2p",
        "forced_2p",
        "never_2p",
        "oldest_2p",
        "recent_2p",
    ]
    assert plan.starts[0].resume_export_id == "r1"
    assert plan.starts[1].forced is True
    assert plan.holds == ()
    assert plan.wake_at is None


def test_plan_breaks_ties_by_config_name() -> None:
    states = [ConfigState(config=name, games_pending=100) for name in ("c_2p", "a_2p", "b_2p")]
    plan = plan_exports(states, live=frozenset(), policy=POLICY, now=NOW)
    assert [s.config for s in plan.starts] == ["a_2p", "b_2p"]
    assert [h.config for h in plan.holds] == ["c_2p"]


def test_plan_never_starts_more_than_the_free_slots() -> None:
    states = [ConfigState(config=f"b{i}_2p", games_pending=1000) for i in range(6)]
    policy = GatePolicy(threshold=100, cooldown_s=0.0, max_concurrent=3)
    plan = plan_exports(states, live=frozenset(), policy=policy, now=NOW)
    assert len(plan.starts) == 3
    assert len(plan.holds) == 3
    assert all("slots" in h.reason for h in plan.holds)


def test_plan_counts_live_exports_against_the_slots() -> None:
    states = [
        ConfigState(config="live_2p", games_pending=1000, running_export_id="L1"),
        ConfigState(config="a_2p", games_pending=1000),
        ConfigState(config="b_2p", games_pending=1000),
    ]
    plan = plan_exports(states, live=frozenset({"live_2p"}), policy=POLICY, now=NOW)
    assert [s.config for s in plan.starts] == ["a_2p"]
    holds = {h.config: h.reason for h in plan.holds}
    assert "running" in holds["live_2p"]
    assert "slots" in holds["b_2p"]


def test_plan_with_every_slot_live_starts_nothing_not_even_forced() -> None:
    states = [
        ConfigState(config="x_2p", running_export_id="X"),
        ConfigState(config="y_2p", running_export_id="Y"),
        ConfigState(config="forced_2p", force_requested=True),
        ConfigState(config="resumed_2p", running_export_id="R"),
    ]
    plan = plan_exports(states, live=frozenset({"x_2p", "y_2p"}), policy=POLICY, now=NOW)
    assert plan.starts == ()
    assert len(plan.holds) == 4


def test_plan_resumes_take_slots_before_forced_exports() -> None:
    states = [
        ConfigState(config="forced_2p", force_requested=True),
        ConfigState(config="r1_2p", running_export_id="R1"),
        ConfigState(config="r2_2p", running_export_id="R2"),
    ]
    plan = plan_exports(states, live=frozenset(), policy=POLICY, now=NOW)
    assert [s.resume_export_id for s in plan.starts] == ["R1", "R2"]
    assert [h.config for h in plan.holds] == ["forced_2p"]


def test_plan_wake_at_is_the_earliest_timed_hold() -> None:
    states = [
        ConfigState(config="cool_2p", games_pending=500, last_export_time=NOW - 200),  # +100
        ConfigState(config="back_2p", games_pending=500, backoff_until=NOW + 50),
        ConfigState(config="few_2p", games_pending=5),
        ConfigState(config="pause_2p", games_pending=500, paused=True),
    ]
    plan = plan_exports(states, live=frozenset(), policy=POLICY, now=NOW)
    assert plan.starts == ()
    assert plan.wake_at == NOW + 50
    untils = {h.config: h.until for h in plan.holds}
    assert untils == {
        "cool_2p": NOW + 100,
        "back_2p": NOW + 50,
        "few_2p": None,
        "pause_2p": None,
    }


def test_plan_wake_at_is_none_when_no_hold_lifts_by_time() -> None:
    states = [ConfigState(config="few_2p", games_pending=5)]
    plan = plan_exports(states, live=frozenset(), policy=POLICY, now=NOW)
    assert plan.wake_at is None


def test_plan_of_no_configs_is_empty() -> None:
    assert plan_exports([], live=frozenset(), policy=POLICY, now=NOW).starts == ()


def test_plan_accepts_any_iterable_of_states() -> None:
    states = (ConfigState(config=f"g{i}_2p", games_pending=100) for i in range(2))
    plan = plan_exports(states, live=frozenset(), policy=POLICY, now=NOW)
    assert len(plan.starts) == 2


# ---- backoff and pending -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        pytest.param(0, 0.0, id="no-failures"),
        pytest.param(-1, 0.0, id="negative-failures"),
        pytest.param(1, 30.0, id="first-failure-waits-base"),
        pytest.param(2, 60.0, id="second-doubles"),
        pytest.param(3, 120.0, id="third-doubles-again"),
        pytest.param(7, 1920.0, id="seventh"),
        pytest.param(8, 3600.0, id="eighth-capped"),
        pytest.param(10_000, 3600.0, id="huge-count-capped-without-overflow"),
    ],
)
def test_backoff_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff_s(failures, base_s=30.0, max_s=3600.0) == expected


@pytest.mark.parametrize(
    ("pending_now", "taken", "left"),
    [
        pytest.param(150, 100, 50, id="games-counted-during-export-stay"),
        pytest.param(100, 100, 0, id="nothing-new"),
        pytest.param(80, 100, 0, id="never-negative"),
        pytest.param(0, 0, 0, id="empty"),
    ],
)
def test_games_left_pending_subtracts_what_the_export_took(
    pending_now: int, taken: int, left: int
) -> None:
    assert games_left_pending(pending_now, taken) == left
