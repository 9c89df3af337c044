"""Inbound and outbound event types, with JSON decoders and an encoder built once.

Inbound types ignore unknown fields (forward compatible) but enforce every field they
declare; outbound types carry an ``event`` tag so one decoder reads any export event.
"""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta, Struct

from schemas import subjects
from schemas.subjects import BOARD_TYPE_PATTERN, MAX_PLAYERS, config_key

MAX_GAMES_PER_EVENT = 1_000_000
MAX_BATCHES_PER_SYNC = 10_000
MAX_EVENT_BYTES = 256 * 1024

# Printable ASCII without spaces: ids travel in NATS headers (Nats-Msg-Id).
Identifier = Annotated[str, Meta(pattern=r"^[!-~]{1,128}$")]
BoardType = Annotated[str, Meta(pattern=BOARD_TYPE_PATTERN)]
NumPlayers = Annotated[int, Meta(ge=1, le=MAX_PLAYERS)]
GameCount = Annotated[int, Meta(ge=0, le=MAX_GAMES_PER_EVENT)]
UtcTimestamp = Annotated[datetime, Meta(tz=True)]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _check_relative_path(path: str) -> None:
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"db_path {path!r} must be a non-empty relative POSIX path")
    if ".." in posixpath.normpath(path).split("/"):
        raise ValueError(f"db_path {path!r} must stay inside the games directory")


class SelfplayCompleted(Struct, kw_only=True):
    """A node finished a batch of games (``selfplay.complete.<config>``)."""

    event_id: Identifier
    board_type: BoardType
    num_players: NumPlayers
    games: GameCount
    node_id: Identifier
    batch_id: Identifier | None = None  # defaults to event_id
    db_path: str | None = None  # relative to the games directory
    timestamp: UtcTimestamp

    def __post_init__(self) -> None:
        if self.batch_id is None:
            self.batch_id = self.event_id
        if self.db_path is not None:
            _check_relative_path(self.db_path)

    @property
    def config(self) -> str:
        return config_key(self.board_type, self.num_players)


class SyncedBatch(Struct, kw_only=True):
    batch_id: Identifier
    games: GameCount


class DataSyncCompleted(Struct, kw_only=True):
    """Games arrived on the export host (``data.sync.completed.<config>``).

    Either ``batches`` (counted per batch id, so batches already announced by
    ``selfplay.complete`` add nothing) or ``games_synced`` (counted once, as a batch whose
    id is this event's id).
    """

    event_id: Identifier
    board_type: BoardType
    num_players: NumPlayers
    source_node: Identifier
    batches: Annotated[list[SyncedBatch], Meta(max_length=MAX_BATCHES_PER_SYNC)] | None = None
    games_synced: GameCount | None = None
    timestamp: UtcTimestamp

    def __post_init__(self) -> None:
        if (self.batches is None) == (self.games_synced is None):
            raise ValueError("exactly one of `batches` or `games_synced` is required")
        if self.batches is not None:
            total = sum(b.games for b in self.batches)
            if total > MAX_GAMES_PER_EVENT:
                raise ValueError(
                    f"batches add up to {total} games, more than {MAX_GAMES_PER_EVENT} per event"
                )

    @property
    def config(self) -> str:
        return config_key(self.board_type, self.num_players)

    def counted_batches(self) -> list[SyncedBatch]:
        if self.batches is not None:
            return self.batches
        return [SyncedBatch(batch_id=self.event_id, games=self.games_synced or 0)]


class ExportStarted(Struct, kw_only=True, tag_field="event", tag="npz_export_started"):
    export_id: str
    config: str
    board_type: str
    num_players: int
    games_pending: int
    timestamp: datetime


class ExportCompleted(Struct, kw_only=True, tag_field="event", tag="npz_export_complete"):
    export_id: str
    config: str
    board_type: str
    num_players: int
    output_path: str  # absolute
    samples: int
    games_exported: int
    duration_seconds: float
    size_bytes: int
    sha256: str
    timestamp: datetime
    # True when the dataset is byte-identical to the config's previous one: nothing new to
    # train on (games counted during the last export were already in it).
    unchanged: bool = False


class ExportFailed(Struct, kw_only=True, tag_field="event", tag="npz_export_failed"):
    export_id: str
    config: str
    board_type: str
    num_players: int
    error: str
    exit_code: int | None
    consecutive_failures: int
    retry_at: datetime
    timestamp: datetime


ExportEvent = ExportStarted | ExportCompleted | ExportFailed

_EXPORT_SUBJECTS = {
    ExportStarted: subjects.EXPORT_STARTED,
    ExportCompleted: subjects.EXPORT_COMPLETE,
    ExportFailed: subjects.EXPORT_FAILED,
}


def subject_of(event: ExportEvent) -> str:
    """Where ``event`` is announced: ``npz.export.<started|complete|failed>.<config>``."""
    return subjects.subject_for(_EXPORT_SUBJECTS[type(event)], event.config)


class DeadLetter(Struct, kw_only=True, tag_field="event", tag="dead_letter"):
    """A rejected inbound message, republished with the reason."""

    reason: str
    subject: str
    stream_seq: int
    deliveries: int
    payload: str  # the raw payload, decoded leniently and truncated
    timestamp: datetime


selfplay_decoder = msgspec.json.Decoder(SelfplayCompleted)
sync_decoder = msgspec.json.Decoder(DataSyncCompleted)
export_event_decoder = msgspec.json.Decoder(ExportEvent)
encoder = msgspec.json.Encoder()

T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], data: bytes) -> T:
    """``decoder.decode(data)``, where JSON nested too deeply for msgspec (which then raises
    ``RecursionError``) is a ``msgspec.DecodeError`` like any other malformed JSON."""
    try:
        return decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None


def utc_from_unix(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
