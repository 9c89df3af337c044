"""The trainer side: follow ``npz.export.*`` from JetStream, verify a dataset, describe it.

The reference for training services; ``autoexport watch`` and the demo's trainer use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import numpy as np
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from consumer.logs import printable
from consumer.streams import ensure_streams
from consumer.telemetry import process_span
from schemas import subjects
from schemas.events import (
    ExportCompleted,
    ExportEvent,
    ExportFailed,
    ExportStarted,
    decode,
    encoder,
    export_event_decoder,
    subject_of,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class DatasetMismatch(RuntimeError):
    """The file on disk is not the one the completion event announced."""


async def follow_exports(
    js: JetStreamContext,
    *,
    config: str = "*",
    stage: str = "*",
    durable: str | None = None,
    new_only: bool = False,
) -> AsyncIterator[tuple[ExportEvent, Msg]]:
    """Yield export events in stream order; ack each after the caller is done with it.

    A durable consumer remembers where a trainer stopped, so a trainer that was offline
    still sees every completion. Its config is created or updated, never just bound to.
    """
    if config != "*":
        subjects.parse_config_key(config)
    consumer = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW if new_only else DeliverPolicy.ALL,
        filter_subject=f"npz.export.{stage}.{config}",
        inactive_threshold=None if durable else 300.0,
    )
    info = await js.add_consumer(subjects.EXPORTS_STREAM, consumer)
    sub = await js.pull_subscribe_bind(info.name, subjects.EXPORTS_STREAM)
    fetched: list[Msg] = []
    try:
        while True:
            try:
                fetched = await sub.fetch(16, timeout=5.0)
            except TimeoutError:  # nats' and asyncio's: nothing new yet
                continue
            for msg in fetched:
                try:
                    event = decode(export_event_decoder, msg.data)
                    if msg.subject != (belongs := subject_of(event)):
                        raise ValueError(f"the payload belongs on {belongs!r}")
                except (msgspec.DecodeError, ValueError) as exc:
                    # Not ours (someone published junk under npz.export.>): skip it for good
                    # rather than fail on every redelivery.
                    log.warning("skipping %a (stream seq %d): %s", msg.subject,
                                msg.metadata.sequence.stream, exc)  # fmt: skip
                    await msg.term()
                    continue
                yield event, msg
                if not msg.is_acked:  # the caller may have acked it already
                    # Synchronous: once this returns, the server has recorded the ack, so a
                    # trainer that stops right after never sees this event again.
                    await msg.ack_sync()
    finally:
        # Hand back what was fetched but not handled (the caller stopped or failed), so the
        # next reader of a durable gets it now rather than after ack_wait.
        for msg in fetched:
            if not msg.is_acked:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()
        await sub.unsubscribe()


def verify_dataset(path: str, size_bytes: int, sha256: str) -> None:
    """Check the file is exactly the announced one before training on it."""
    file = Path(path)
    if file.stat().st_size != size_bytes:
        raise DatasetMismatch(f"{path}: {file.stat().st_size} bytes, announced {size_bytes}")
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise DatasetMismatch(f"{path}: sha256 differs from the announced one (replaced?)")


def describe_dataset(path: str) -> dict[str, Any]:
    """Load with ``allow_pickle=False`` (what every trainer should do) and summarise."""
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"]))
        values = data["values"]
        indptr = data["policy_indptr"]
        return {
            "samples": int(values.shape[0]),
            "games": int(data["game_ids"].shape[0]),
            "arrays": {
                name: [list(data[name].shape), str(data[name].dtype)] for name in data.files
            },
            "value_balance": {
                "mean": round(float(values.mean()), 4) if values.size else None,
                "wins": int((values > 0).sum()),
                "draws": int((values == 0).sum()),
                "losses": int((values < 0).sum()),
            },
            "policy_entries_per_sample": round(float(np.diff(indptr).mean()), 2)
            if values.size
            else None,
            "value_perspective": metadata.get("value_perspective"),
            "skipped_games": metadata.get("skipped_games", {}),
            "sources": len(metadata.get("sources", [])),
        }


def describe_event(event: ExportEvent) -> str:
    """One line per export event, for people (``autoexport watch``)."""
    when = event.timestamp.isoformat(timespec="seconds")
    match event:
        case ExportStarted():
            what = f"started   {event.games_pending} games pending"
        case ExportCompleted():
            what = (
                f"complete  {event.games_exported} games, {event.samples} samples,"
                f" {event.size_bytes / 2**20:.1f} MiB in {event.duration_seconds:.1f}s"
                f" -> {event.output_path} (sha256 {event.sha256[:12]})"
                + (", unchanged" if event.unchanged else "")
            )
        case ExportFailed():
            how = "timed out" if event.exit_code is None else f"exit {event.exit_code}"
            error = event.error.strip().splitlines()[-1][:200] if event.error.strip() else "?"
            what = (
                f"FAILED    {how}, {event.consecutive_failures} in a row, retry at"
                f" {event.retry_at.isoformat(timespec='seconds')}: {error}"
            )
    return printable(f"{when}  {event.config:<12} {what}  [{event.export_id}]")


async def watch_exports(
    url: str,
    emit: Callable[[str], None],
    *,
    config: str = "*",
    durable: str | None = None,
    new_only: bool = False,
    as_json: bool = False,
    count: int | None = None,
) -> int:
    """Follow ``npz.export.>`` (one config, or all) and ``emit`` each event as a line (its
    JSON with ``as_json``); stop after ``count`` events. Returns how many were emitted.

    Each event is handled in a ``process`` span continuing the trace its headers carry.
    """
    if config != "*":
        subjects.parse_config_key(config)  # before connecting: a typo fails at once
    nc = await _connect(url)
    emitted = 0
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        events = follow_exports(js, config=config, durable=durable, new_only=new_only)
        async with contextlib.aclosing(events):
            async for event, msg in events:
                with process_span(
                    msg.subject, msg.headers, len(msg.data), durable or "autoexport-watch"
                ):
                    emit(encoder.encode(event).decode() if as_json else describe_event(event))
                emitted += 1
                if count is not None and emitted >= count:
                    await msg.ack_sync()  # closing the generator skips its ack of this one
                    break
    finally:
        await nc.close()
    return emitted


async def _connect(url: str) -> nats.aio.client.Client:
    """Reconnect forever once connected (a watcher runs for days), but bound the first try."""

    async def error(exc: Exception) -> None:
        log.warning("nats: %r", exc)

    try:
        return await asyncio.wait_for(
            nats.connect(url, max_reconnect_attempts=-1, error_cb=error), CONNECT_TIMEOUT_S
        )
    except TimeoutError:
        raise ConnectionError(f"cannot reach NATS at {url} in {CONNECT_TIMEOUT_S:.0f}s") from None
