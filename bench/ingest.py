"""Ingest: messages per second through the daemon's consume, validate, persist, dedupe and
ack path, against a bare nats-py fetch-and-ack loop over the same stream contents.

A second baseline is the bare loop over the daemon's own transport (``PullConsumer``, which
replaced nats-py's ``fetch``): its ratio is what validating, persisting and deduping cost.

Both read the same stream through their own durable consumer with the same batch size,
and both are timed by the server: from the first delivery to the last acknowledgement.
The bare consumer has no subject filter (the stream holds only the daemon's subjects), so
the daemon's consumer settings are part of what is measured. Repetitions alternate which
one goes first; the ratio is the median of per-pair ratios.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from pathlib import Path

import msgspec
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.broker import (
    ERRORS,
    Drain,
    Event,
    client,
    config_keys,
    daemon_log,
    daemon_settings,
    nats_server,
    publish_all,
    selfplay_event,
    state_counts,
    watch_drain,
)
from bench.report import Figure, Target, figure
from consumer.daemon import run_daemon
from consumer.ingest import consumer_config
from consumer.pull import PullConsumer
from schemas import subjects
from schemas.settings import Settings

TARGET = Target(">=", 0.8)
FETCH_TIMEOUT_S = 1.0  # as the daemon's


class Variant(msgspec.Struct, frozen=True):
    label: str
    configs: int
    messages: int
    reps: int
    duplicates: float = 0.0  # share of messages re-announcing an earlier batch id


SIZES = {
    "small": [
        Variant("1 config", 1, 10_000, 1),
        Variant("100 configs", 100, 5_000, 1),
        Variant("10,000 configs", 10_000, 10_000, 1),
        Variant("10% duplicates", 100, 5_000, 1, 0.1),
    ],
    "default": [
        Variant("1 config", 1, 50_000, 3),
        Variant("100 configs", 100, 30_000, 1),
        Variant("10,000 configs", 10_000, 30_000, 1),
        Variant("10% duplicates", 100, 30_000, 1, 0.1),
    ],
    "large": [
        Variant("1 config", 1, 200_000, 5),
        Variant("100 configs", 100, 100_000, 3),
        Variant("10,000 configs", 10_000, 100_000, 3),
        Variant("10% duplicates", 100, 100_000, 3, 0.1),
    ],
}


def events_for(variant: Variant, seed: int = 1) -> tuple[list[Event], int]:
    """The variant's events and the games the daemon must count (one per distinct batch)."""
    rng = random.Random(seed)
    keys = config_keys(variant.configs)
    events: list[Event] = []
    batches: list[tuple[str, str]] = []  # (config, batch id) announced so far
    for i in range(variant.messages):
        if batches and rng.random() < variant.duplicates:
            config, batch_id = rng.choice(batches)
            events.append(selfplay_event(config, batch_id=batch_id))  # new event id
            continue
        event = selfplay_event(keys[i % len(keys)])
        batches.append((keys[i % len(keys)], event.msg_id))
        events.append(event)
    return events, len(batches)


def bare_consumer_config(durable: str, like: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=like.ack_wait_seconds,
        max_deliver=like.max_deliver,
        max_ack_pending=like.max_ack_pending,
    )


async def bare_loop(url: str, durable: str, batch: int, count: int) -> None:
    """The baseline: fetch a batch, ack each message, until ``count`` are acked."""
    async with client(url) as nc:
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(durable, subjects.EVENTS_STREAM)
        done = 0
        while done < count:
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
            done += len(msgs)
        await nc.flush()


async def bare_pull_loop(url: str, durable: str, batch: int, count: int) -> None:
    """The second baseline: the daemon's pull transport, acking each message."""
    async with client(url) as nc:
        pull = PullConsumer(nc, subjects.EVENTS_STREAM, durable)
        done = 0
        while done < count:
            msgs = await pull.fetch(batch) or await pull.wait()
            for msg in msgs:
                await msg.ack()
            done += len(msgs)
        await pull.close()
        await nc.flush()


BARE_LOOPS = {"bare": bare_loop, "pull": bare_pull_loop}


async def measure_bare(
    url: str, settings: Settings, who: str, durable: str, last_seq: int, n: int
) -> Drain:
    async with client(url) as nc:
        js = nc.jetstream()
        await js.add_consumer(subjects.EVENTS_STREAM, bare_consumer_config(durable, settings))
        drain, _ = await asyncio.gather(
            watch_drain(js, durable, last_seq),
            BARE_LOOPS[who](url, durable, settings.fetch_batch_size, n),
        )
    return drain


async def measure_daemon(url: str, settings: Settings, last_seq: int) -> Drain:
    """The real daemon (``run_daemon``, exports out of reach), until it acked everything."""
    async with client(url) as nc:
        js = nc.jetstream()
        # Created up front so the server reports progress from the first delivery on; the
        # daemon's own create-or-update then changes nothing.
        await js.add_consumer(subjects.EVENTS_STREAM, consumer_config(settings))
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(settings, stop))
        try:
            drain = await watch_drain(js, settings.durable_name, last_seq)
        finally:
            stop.set()
            rc = await task
    if rc != 0:
        raise RuntimeError(f"daemon exited with {rc}: " + "\n".join(ERRORS.lines))
    return drain


async def run_variant(variant: Variant, workdir: Path) -> list[Figure]:
    workdir.mkdir(parents=True)
    events, unique = events_for(variant)
    with nats_server(workdir) as server, daemon_log(workdir / "daemon.log"):
        async with client(server.url) as nc:
            last_seq = await publish_all(nc, events)
        rates: dict[str, list[float]] = {"bare": [], "pull": [], "daemon": []}
        ratios: dict[str, list[float]] = {"bare": [], "pull": []}
        for rep in range(variant.reps):
            settings = daemon_settings(
                workdir,
                server.url,
                durable_name=f"daemon{rep}",
                state_db=str(workdir / f"state{rep}.db"),
                min_games_threshold=10**9,
            )
            order = ("bare", "pull", "daemon")[:: 1 if rep % 2 == 0 else -1]
            rate: dict[str, float] = {}
            for who in order:
                if who == "daemon":
                    drain = await measure_daemon(server.url, settings, last_seq)
                    counted = sum(state_counts(settings.state_db or "").values())
                    if counted != unique:
                        raise AssertionError(f"daemon counted {counted} games, expected {unique}")
                else:
                    durable = f"{who}{rep}"
                    drain = await measure_bare(
                        server.url, settings, who, durable, last_seq, len(events)
                    )
                rate[who] = len(events) / drain.seconds
                rates[who].append(rate[who])
            for baseline in ratios:
                ratios[baseline].append(rate["daemon"] / rate[baseline])
    label = f"{variant.label}: daemon msg/s ({variant.messages:,} msgs)"

    def versus(baseline: str, baseline_label: str, target: Target | None) -> Figure:
        reps = ratios[baseline]
        note = "ratios per rep: " + ", ".join(f"{r:.2f}" for r in reps) if len(reps) > 1 else ""
        return figure(
            "ingest", label, statistics.median(rates["daemon"]), "msg/s",
            baseline=statistics.median(rates[baseline]), baseline_label=baseline_label,
            ratio=statistics.median(reps), target=target, note=note,
        )  # fmt: skip

    return [
        versus("bare", "bare fetch+ack", TARGET),
        versus("pull", "bare pull+ack (same transport)", None),
    ]


async def run(size: str, workdir: Path) -> list[Figure]:
    figures = []
    for i, variant in enumerate(SIZES[size]):
        figures += await run_variant(variant, workdir / f"v{i}")
    return figures
