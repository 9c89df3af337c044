"""schemas.events: outbound events round-trip with their `event` tag; errors name the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from schemas.events import (
    DataSyncCompleted,
    DeadLetter,
    ExportCompleted,
    ExportEvent,
    ExportFailed,
    ExportStarted,
    SelfplayCompleted,
    encoder,
    export_event_decoder,
    selfplay_decoder,
    sync_decoder,
    utc_now,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

STARTED = ExportStarted(
    export_id="exp-1",
    config="hex8_2p",
    board_type="hex8",
    num_players=2,
    games_pending=150,
    timestamp=T0,
)
COMPLETED = ExportCompleted(
    export_id="exp-1",
    config="hex8_2p",
    board_type="hex8",
    num_players=2,
    output_path="/data/training/hex8_2p.npz",
    samples=12_345,
    games_exported=150,
    duration_seconds=4.25,
    size_bytes=987_654,
    sha256="ab" * 32,
    timestamp=T0 + timedelta(seconds=5),
)
FAILED = ExportFailed(
    export_id="exp-2",
    config="hex8_2p",
    board_type="hex8",
    num_players=2,
    error="exit 3: no games found",
    exit_code=3,
    consecutive_failures=2,
    retry_at=T0 + timedelta(seconds=60),
    timestamp=T0,
)
FAILED_BY_TIMEOUT = ExportFailed(
    export_id="exp-3",
    config="go9_4p",
    board_type="go9",
    num_players=4,
    error="timed out after 3600 s",
    exit_code=None,
    consecutive_failures=1,
    retry_at=T0 + timedelta(seconds=30),
    timestamp=T0,
)


@pytest.mark.parametrize(
    ("event", "tag"),
    [
        pytest.param(STARTED, "npz_export_started", id="started"),
        pytest.param(COMPLETED, "npz_export_complete", id="complete"),
        pytest.param(FAILED, "npz_export_failed", id="failed"),
        pytest.param(FAILED_BY_TIMEOUT, "npz_export_failed", id="failed-without-exit-code"),
    ],
)
def test_outbound_event_round_trips_with_its_tag(event: ExportEvent, tag: str) -> None:
    data = encoder.encode(event)
    assert json.loads(data)["event"] == tag
    decoded = export_event_decoder.decode(data)
    assert type(decoded) is type(event)
    assert decoded == event


def test_started_event_carries_the_brief_fields() -> None:
    assert set(json.loads(encoder.encode(STARTED))) == {
        "event", "export_id", "config", "board_type", "num_players", "games_pending",
        "timestamp",
    }  # fmt: skip


def test_complete_event_carries_what_a_trainer_needs() -> None:
    fields = json.loads(encoder.encode(COMPLETED))
    assert {
        "event", "export_id", "config", "board_type", "num_players", "output_path",
        "samples", "games_exported", "duration_seconds", "timestamp", "size_bytes", "sha256",
    } <= set(fields)  # fmt: skip
    assert fields["output_path"].startswith("/")


def test_failed_event_carries_the_brief_fields_and_a_null_exit_code() -> None:
    fields = json.loads(encoder.encode(FAILED_BY_TIMEOUT))
    assert {
        "event", "export_id", "config", "error", "exit_code", "consecutive_failures",
        "retry_at", "timestamp",
    } <= set(fields)  # fmt: skip
    assert fields["exit_code"] is None


def test_timestamps_travel_as_iso_8601_with_a_timezone() -> None:
    fields = json.loads(encoder.encode(FAILED))
    assert fields["timestamp"] == "2024-05-01T12:00:00Z"
    assert fields["retry_at"] == "2024-05-01T12:01:00Z"


def test_decoded_timestamps_are_timezone_aware() -> None:
    decoded = export_event_decoder.decode(encoder.encode(STARTED))
    assert decoded.timestamp.tzinfo is not None
    assert decoded.timestamp == T0


def test_a_trainer_written_in_another_language_can_publish_a_decodable_event() -> None:
    raw = json.dumps(
        {
            "event": "npz_export_started",
            "export_id": "x",
            "config": "hex8_2p",
            "board_type": "hex8",
            "num_players": 2,
            "games_pending": 1,
            "timestamp": "2024-05-01T14:00:00+02:00",
            "added_later": True,
        }
    ).encode()
    decoded = export_event_decoder.decode(raw)
    assert isinstance(decoded, ExportStarted)
    assert decoded.timestamp == T0
    assert decoded.timestamp.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        pytest.param(b'{"event": "npz_export_bogus"}', "$.event", id="unknown-tag"),
        pytest.param(b'{"export_id": "x"}', "event", id="missing-tag"),
        pytest.param(
            encoder.encode(
                DeadLetter(
                    reason="oversized",
                    subject="s",
                    stream_seq=1,
                    deliveries=1,
                    payload="",
                    timestamp=T0,
                )
            ),
            "$.event",
            id="dead-letter-is-not-an-export-event",
        ),
        pytest.param(
            json.dumps({**json.loads(encoder.encode(STARTED)), "games_pending": "many"}).encode(),
            "$.games_pending",
            id="wrong-type-names-the-field",
        ),
        pytest.param(
            json.dumps(
                {k: v for k, v in json.loads(encoder.encode(COMPLETED)).items() if k != "sha256"}
            ).encode(),
            "sha256",
            id="missing-field-named",
        ),
    ],
)
def test_export_event_decoder_errors_name_the_field(data: bytes, fragment: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        export_event_decoder.decode(data)
    assert fragment in str(info.value)


SELFPLAY = {
    "event_id": "e1",
    "board_type": "hex8",
    "num_players": 2,
    "games": 5,
    "node_id": "n1",
    "timestamp": "2024-05-01T12:00:00Z",
}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param({"games": "5"}, "Expected `int`, got `str` - at `$.games`", id="games-str"),
        pytest.param({"games": -1}, "Expected `int` >= 0 - at `$.games`", id="games-negative"),
        pytest.param({"num_players": 0}, "- at `$.num_players`", id="players-zero"),
        pytest.param({"timestamp": "2024-05-01T12:00:00"}, "- at `$.timestamp`", id="naive-time"),
    ],
)
def test_inbound_errors_name_the_field(override: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        selfplay_decoder.decode(json.dumps({**SELFPLAY, **override}))
    assert message in str(info.value)


def test_inbound_missing_field_is_named() -> None:
    fields = {k: v for k, v in SELFPLAY.items() if k != "games"}
    with pytest.raises(msgspec.ValidationError, match="missing required field `games`"):
        selfplay_decoder.decode(json.dumps(fields))


def test_sync_batch_errors_name_the_nested_field() -> None:
    raw = json.dumps(
        {
            "event_id": "s1",
            "board_type": "hex8",
            "num_players": 2,
            "source_node": "n1",
            "batches": [{"batch_id": "b1", "games": 1}, {"batch_id": "b2", "games": "2"}],
            "timestamp": "2024-05-01T12:00:00Z",
        }
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.batches\[1\]\.games"):
        sync_decoder.decode(raw)


def test_selfplay_round_trip_keeps_the_defaulted_batch_id() -> None:
    event = selfplay_decoder.decode(json.dumps(SELFPLAY))
    assert isinstance(event, SelfplayCompleted)
    assert event.batch_id == "e1"
    assert event.config == "hex8_2p"
    assert selfplay_decoder.decode(encoder.encode(event)) == event


def test_sync_with_games_synced_counts_as_one_batch_named_by_the_event() -> None:
    event = DataSyncCompleted(
        event_id="s9", board_type="go9", num_players=4, source_node="n", games_synced=12,
        timestamp=T0,
    )  # fmt: skip
    assert [(b.batch_id, b.games) for b in event.counted_batches()] == [("s9", 12)]
    assert event.config == "go9_4p"
    assert sync_decoder.decode(encoder.encode(event)) == event


def test_utc_now_is_timezone_aware() -> None:
    assert utc_now().utcoffset() == timedelta(0)
