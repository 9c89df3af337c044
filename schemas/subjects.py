"""Subject names, stream names and config-key validation.

A config key is ``<board_type>_<num_players>p`` and becomes a NATS subject token, so it is
validated here before anything is published or counted.
"""

from __future__ import annotations

import re

BOARD_TYPE_PATTERN = r"^[a-z][a-z0-9]{0,31}$"
MAX_PLAYERS = 16

_BOARD_TYPE_RE = re.compile(BOARD_TYPE_PATTERN)
_CONFIG_KEY_RE = re.compile(r"^([a-z][a-z0-9]{0,31})_([1-9][0-9]?)p$")

# Inbound
SELFPLAY_COMPLETE = "selfplay.complete"
DATA_SYNC_COMPLETED = "data.sync.completed"
# Outbound
EXPORT_STARTED = "npz.export.started"
EXPORT_COMPLETE = "npz.export.complete"
EXPORT_FAILED = "npz.export.failed"
DEAD_LETTER = "autoexport.deadletter"

EVENTS_STREAM = "SELFPLAY_EVENTS"
EVENTS_SUBJECTS = (f"{SELFPLAY_COMPLETE}.>", f"{DATA_SYNC_COMPLETED}.>")
EXPORTS_STREAM = "NPZ_EXPORTS"
EXPORTS_SUBJECTS = ("npz.export.>",)
DEAD_LETTER_STREAM = "AUTOEXPORT_DEADLETTER"
DEAD_LETTER_SUBJECTS = (f"{DEAD_LETTER}.>",)
# The server's advisory for a message of the events stream it stopped delivering to a
# consumer after max_deliver attempts; kept in a stream so none is missed while the daemon
# is down.
UNDELIVERED_STREAM = "AUTOEXPORT_UNDELIVERED"
UNDELIVERED_PREFIX = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{EVENTS_STREAM}"

# Request/reply endpoints of the running daemon (a NATS micro service).
SERVICE_NAME = "autoexport"
DEFAULT_DURABLE = "autoexport"


def control_subject(verb: str, durable: str = DEFAULT_DURABLE) -> str:
    """Where the daemon consuming ``durable`` answers ``verb``: two daemons on one server
    (each with its own durable) must not answer each other's operator requests."""
    if durable == DEFAULT_DURABLE:
        return f"autoexport.{verb}"
    return f"autoexport.{durable}.{verb}"


STATUS_SUBJECT = control_subject("status")
EXPORT_NOW_SUBJECT = control_subject("export-now")
PAUSE_SUBJECT = control_subject("pause")
RESUME_SUBJECT = control_subject("resume")


class InvalidConfigKey(ValueError):
    """A board type, player count or config key that must not reach a subject."""


def config_key(board_type: str, num_players: int) -> str:
    """Build ``<board_type>_<num_players>p``, rejecting anything that would break routing."""
    if not isinstance(board_type, str) or not _BOARD_TYPE_RE.match(board_type):
        raise InvalidConfigKey(
            f"board type {board_type!r} must be 1-32 of [a-z0-9] starting with a letter"
        )
    if isinstance(num_players, bool) or not isinstance(num_players, int):
        raise InvalidConfigKey(f"num_players {num_players!r} must be an integer")
    if not 1 <= num_players <= MAX_PLAYERS:
        raise InvalidConfigKey(f"num_players {num_players} must be between 1 and {MAX_PLAYERS}")
    return f"{board_type}_{num_players}p"


def parse_config_key(key: str) -> tuple[str, int]:
    """Split a config key into ``(board_type, num_players)``; raise if it is not one."""
    match = _CONFIG_KEY_RE.match(key) if isinstance(key, str) else None
    if match is None:
        raise InvalidConfigKey(
            f"config {key!r} is not <board_type>_<num_players>p "
            "(board type 1-32 of [a-z0-9] starting with a letter, players 1-16)"
        )
    board_type, players = match.group(1), int(match.group(2))
    config_key(board_type, players)  # range check
    return board_type, players


def subject_for(prefix: str, config: str) -> str:
    """``prefix.<config>`` after validating the config token."""
    parse_config_key(config)
    return f"{prefix}.{config}"


def config_from_subject(subject: str, prefix: str) -> str:
    """The config token of ``prefix.<config>``; raise if the subject has another shape."""
    head = prefix + "."
    if not subject.startswith(head):
        raise InvalidConfigKey(f"subject {subject!r} is not under {prefix!r}")
    token = subject[len(head) :]
    parse_config_key(token)
    return token
