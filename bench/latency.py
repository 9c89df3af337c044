"""Trigger latency: from publishing the event that crosses a config's threshold to
receiving ``npz.export.started.<config>``, over many configs, with free export slots.

Baseline: the broker's floor for the same hops, a bare pull consumer that fetches each
message, acks it and publishes an announcement, on a stream of the same kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from bench.broker import (
    client,
    config_keys,
    daemon_log,
    daemon_settings,
    nats_server,
    publish_all,
    selfplay_event,
    watch_drain,
)
from bench.report import Figure, Target, figure
from consumer.daemon import run_daemon
from schemas import subjects

THRESHOLD = 10
WAIT_S = 10.0  # for the last announcement, after the last crossing event
REPROVISION_LINE = "JetStream unavailable"  # the daemon's warning when a fetch fails
SLOTS = 64  # the most the settings allow: no export waits for a slot
TARGET = Target("<", 100.0, "ms")


class Size(msgspec.Struct, frozen=True):
    configs: int
    interval_s: float  # between two crossing events (each starts a short export)


# 10 crossings a second: each starts a job (a Python process), and a 2-core machine that
# also runs the broker and this harness must not be saturated by them.
BURST_INTERVAL_S = 0.02  # the load phase: informational, no target

SIZES = {
    "small": Size(50, 0.1),
    "default": Size(150, 0.1),
    "large": Size(600, 0.1),
}


def lost_note(values_ms: list[float]) -> str:
    lost = sum(v >= WAIT_S * 1000 for v in values_ms)
    return f" ({lost} never announced within {WAIT_S:g}s)" if lost else ""


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def paced(
    nc: Client, items: list[tuple[str, str, bytes, str]], interval_s: float
) -> dict[str, float]:
    """Publish ``(key, subject, payload, msg_id)`` items to JetStream one per
    ``interval_s`` (on a fixed schedule); returns when each publish began, per key."""
    js = nc.jetstream()
    sent: dict[str, float] = {}
    began = time.perf_counter()

    async def one(i: int, key: str, subject: str, payload: bytes, msg_id: str) -> None:
        await asyncio.sleep(max(0.0, began + i * interval_s - time.perf_counter()))
        sent[key] = time.perf_counter()
        await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})

    await asyncio.gather(*(one(i, *item) for i, item in enumerate(items)))
    return sent


class Arrivals:
    """Arrival time of the first message per key (the subject's last token)."""

    def __init__(self, expected: int) -> None:
        self.at: dict[str, float] = {}
        self._expected = expected
        self.all = asyncio.Event()

    async def handler(self, msg: Msg) -> None:
        key = msg.subject.rsplit(".", 1)[1]
        self.at.setdefault(key, time.perf_counter())
        if len(self.at) >= self._expected:
            self.all.set()


def latencies_ms(sent: dict[str, float], arrivals: Arrivals, waited_s: float) -> list[float]:
    """Per key; a key never announced counts as the time waited for it (a lower bound)."""
    return [(arrivals.at.get(k, sent[k] + waited_s) - sent[k]) * 1000 for k in sent]


async def bare_echo(nc: Client, stop: asyncio.Event) -> None:
    """The baseline consumer: fetch one message, ack it, announce it on core NATS."""
    js = nc.jetstream()
    sub = await js.pull_subscribe("bench.in.>", durable="echo", stream="BENCH_BASELINE")
    while not stop.is_set():
        try:
            msgs = await sub.fetch(1, timeout=0.5)
        except TimeoutError:
            continue
        except nats.errors.Error:
            if stop.is_set():
                return
            raise
        for msg in msgs:
            await msg.ack()
            await nc.publish("bench.out." + msg.subject.rsplit(".", 1)[1], b"{}")


async def baseline(url: str, keys: list[str], interval_s: float) -> list[float]:
    async with client(url) as nc:
        await nc.jetstream().add_stream(
            StreamConfig(name="BENCH_BASELINE", subjects=["bench.in.>"], storage=StorageType.FILE)
        )
        arrivals = Arrivals(len(keys))
        await nc.subscribe("bench.out.>", cb=arrivals.handler)
        await nc.flush()
        stop = asyncio.Event()
        echo = asyncio.create_task(bare_echo(nc, stop))
        items = [(k, f"bench.in.{k}", b"{}", f"echo-{k}") for k in keys]
        sent = await paced(nc, items, interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrivals.all.wait(), WAIT_S)
        stop.set()
        await echo
    return latencies_ms(sent, arrivals, WAIT_S)


async def daemon_latencies(
    workdir: Path, url: str, phases: list[tuple[list[str], float]]
) -> list[list[float]]:
    """One daemon; per phase, its configs' crossing events paced ``interval_s`` apart."""
    settings = daemon_settings(
        workdir, url, min_games_threshold=THRESHOLD, max_concurrent_exports=SLOTS
    )
    everyone = [k for keys, _ in phases for k in keys]
    stop = asyncio.Event()
    results = []
    async with client(url) as nc:
        # Every config one game short of its threshold, counted before the clock starts.
        primed = [selfplay_event(k, games=THRESHOLD - 1) for k in everyone]
        last_seq = await publish_all(nc, primed)
        daemon = asyncio.create_task(run_daemon(settings, stop))
        try:
            await watch_drain(nc.jetstream(), settings.durable_name, last_seq)
            for keys, interval_s in phases:
                await asyncio.sleep(2.0)  # the daemon settles into its idle fetch loop
                arrivals = Arrivals(len(keys))
                sub = await nc.subscribe(f"{subjects.EXPORT_STARTED}.>", cb=arrivals.handler)
                await nc.flush()
                crossing = [selfplay_event(k, games=1) for k in keys]
                items = [
                    (k, e.subject, e.payload, e.msg_id) for k, e in zip(keys, crossing, strict=True)
                ]
                sent = await paced(nc, items, interval_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrivals.all.wait(), WAIT_S)
                await sub.unsubscribe()
                results.append(latencies_ms(sent, arrivals, WAIT_S))
        finally:
            stop.set()
            await daemon
    return results


async def run(size_name: str, workdir: Path) -> list[Figure]:
    size = SIZES[size_name]
    keys = config_keys(2 * size.configs)
    steady, burst = keys[: size.configs], keys[size.configs :]
    with nats_server(workdir) as server, daemon_log(workdir / "daemon.log"):
        floor = await baseline(server.url, steady, size.interval_s)
        got, busy = await daemon_latencies(
            workdir, server.url, [(steady, size.interval_s), (burst, BURST_INTERVAL_S)]
        )
    reprovisioned = (workdir / "daemon.log").read_text().count(REPROVISION_LINE)
    label = f"{size.configs} configs, 1 per {size.interval_s * 1000:.0f} ms"
    common = {"unit": "ms", "baseline_label": "bare fetch+ack+publish"}
    return [
        figure(
            "latency",
            f"trigger -> export.started p99 ({label})",
            p99(got),
            baseline=p99(floor),
            target=TARGET,
            note=f"max {max(got):.0f} ms{lost_note(got)}; {SLOTS} export slots, cooldown 0;"
            f" over both phases the daemon re-provisioned its consumer {reprovisioned} times",
            **common,  # type: ignore[arg-type]
        ),
        figure(
            "latency",
            f"trigger -> export.started median ({label})",
            statistics.median(got),
            baseline=statistics.median(floor),
            target=TARGET,
            **common,  # type: ignore[arg-type]
        ),
        figure(
            "latency",
            f"p99 under load: 1 crossing per {BURST_INTERVAL_S * 1000:.0f} ms",
            p99(busy),
            baseline=p99(floor),
            note=f"median {statistics.median(busy):.0f} ms, max {max(busy):.0f} ms"
            f"{lost_note(busy)}: each crossing starts a job process, which saturates 2 cores",
            **common,  # type: ignore[arg-type]
        ),
    ]
