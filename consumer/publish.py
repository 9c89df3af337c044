"""Publish inbound events the way nodes should: validated, deduplicated by event id, traced."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import PubAck

from consumer.telemetry import publish_span
from schemas import subjects
from schemas.events import DataSyncCompleted, SelfplayCompleted, encoder


async def publish_selfplay(js: JetStreamContext, event: SelfplayCompleted) -> PubAck:
    subject = subjects.subject_for(subjects.SELFPLAY_COMPLETE, event.config)
    return await _publish(js, subject, encoder.encode(event), event.event_id)


async def publish_sync(js: JetStreamContext, event: DataSyncCompleted) -> PubAck:
    subject = subjects.subject_for(subjects.DATA_SYNC_COMPLETED, event.config)
    return await _publish(js, subject, encoder.encode(event), event.event_id)


async def _publish(js: JetStreamContext, subject: str, payload: bytes, msg_id: str) -> PubAck:
    """Publish in a ``publish <subject>`` span whose context travels in the headers, so the
    daemon's processing (and the export it triggers) joins this trace."""
    headers = {"Nats-Msg-Id": msg_id}
    with publish_span(subject, headers, len(payload)):
        return await js.publish(subject, payload, headers=headers)
