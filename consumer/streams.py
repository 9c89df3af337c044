"""JetStream streams this service reads and writes, created or updated idempotently.

Publishers (nodes, the CLI) and the daemon both call ``ensure_streams`` so whichever starts
first creates them, and a changed setting here is applied to an existing stream.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from schemas import subjects

log = logging.getLogger(__name__)

DAY_S = 86_400.0
# Publishers retry with the same Nats-Msg-Id; the stream drops repeats within this window.
DUPLICATE_WINDOW_S = 2 * 3600.0

STREAMS = (
    StreamConfig(
        name=subjects.EVENTS_STREAM,
        description="selfplay.complete and data.sync.completed events for autoexport",
        subjects=list(subjects.EVENTS_SUBJECTS),
        storage=StorageType.FILE,
        max_age=7 * DAY_S,
        max_msg_size=1024 * 1024,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    StreamConfig(
        name=subjects.EXPORTS_STREAM,
        description="npz.export.started/complete/failed announcements for trainers",
        subjects=list(subjects.EXPORTS_SUBJECTS),
        storage=StorageType.FILE,
        max_age=30 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    StreamConfig(
        name=subjects.DEAD_LETTER_STREAM,
        description="inbound messages autoexport rejected, with the reason",
        subjects=list(subjects.DEAD_LETTER_SUBJECTS),
        storage=StorageType.FILE,
        max_age=30 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    StreamConfig(
        name=subjects.UNDELIVERED_STREAM,
        description="events JetStream stopped delivering to autoexport (max_deliver reached)",
        subjects=[f"{subjects.UNDELIVERED_PREFIX}.>"],
        storage=StorageType.FILE,
        max_age=30 * DAY_S,
    ),
)


async def ensure_streams(js: JetStreamContext) -> None:
    """Create each stream, or update it in place when its config differs."""
    for config in STREAMS:
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                log.info("created stream %s", config.name)
                continue
            except BadRequestError:  # created concurrently by another process
                pass
        await js.update_stream(config)
