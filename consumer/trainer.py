"""The trainer side: follow ``npz.export.*`` from JetStream, verify a dataset, describe it.

The reference for training services; ``autoexport watch`` and the demo's trainer use it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import subjects
from schemas.events import ExportEvent, export_event_decoder


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
    try:
        while True:
            try:
                msgs = await sub.fetch(16, timeout=5.0)
            except NatsTimeoutError:
                continue
            for msg in msgs:
                yield export_event_decoder.decode(msg.data), msg
                await msg.ack()
    finally:
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
