"""End-to-end: a fleet of simulated selfplay nodes publishes at a set rate for a while into
a daemon running as its own process (``autoexport run``); do consumption and exports keep up?

Baseline: the offered load itself (events published per second, exports the settings allow).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from bench.broker import (
    QUICK_JOB,
    client,
    config_keys,
    nats_server,
    selfplay_event,
    write_template_npz,
)
from bench.report import Figure, Target, figure
from consumer.operator import request
from schemas import subjects

KEEP_UP = Target(">=", 0.95)
SAMPLE_S = 0.5


class Size(msgspec.Struct, frozen=True):
    nodes: int
    configs: int
    events_per_s: float  # the whole fleet
    duration_s: float
    games_per_event: int = 5
    threshold: int = 100
    cooldown_s: float = 5.0
    job_s: float = 0.4  # what one export takes
    slots: int = 2


SIZES = {
    "small": Size(10, 5, 100, 10),
    "default": Size(40, 20, 200, 30),
    "large": Size(200, 50, 500, 120),
}


def daemon_env(workdir: Path, url: str, size: Size) -> dict[str, str]:
    template = workdir / "template.npz"
    write_template_npz(template)
    job = [sys.executable, "-S", str(QUICK_JOB), "{output_path}", str(template), str(size.job_s)]
    return {
        **os.environ,
        "AUTOEXPORT_NATS_URL": url,
        "AUTOEXPORT_DATA_DIR": str(workdir / "data"),
        "AUTOEXPORT_MIN_GAMES_THRESHOLD": str(size.threshold),
        "AUTOEXPORT_EXPORT_COOLDOWN_SECONDS": str(size.cooldown_s),
        "AUTOEXPORT_MAX_CONCURRENT_EXPORTS": str(size.slots),
        "AUTOEXPORT_EXPORT_COMMAND": shlex.join(job),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await request(url, subjects.STATUS_SUBJECT)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Fleet:
    """Simulated nodes: node i plays config i mod ``configs``; together they publish
    ``events_per_s`` events on a fixed schedule, each awaiting JetStream's ack."""

    def __init__(self, size: Size) -> None:
        self.size = size
        self.keys = config_keys(size.configs)
        self.published = 0
        self.late_s = 0.0  # how far behind schedule the publishers fell, at most

    async def run(self, nc: Client, until: float) -> None:
        await asyncio.gather(*(self._node(nc, i, until) for i in range(self.size.nodes)))

    async def _node(self, nc: Client, i: int, until: float) -> None:
        js = nc.jetstream()
        period = self.size.nodes / self.size.events_per_s
        start = time.perf_counter() + period * i / self.size.nodes
        config = self.keys[i % self.size.configs]
        k = 0
        while (due := start + k * period) < until:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.late_s = max(self.late_s, -delay)
            e = selfplay_event(config, games=self.size.games_per_event, node=f"node-{i}")
            await js.publish(e.subject, e.payload, headers={"Nats-Msg-Id": e.msg_id})
            self.published += 1
            k += 1


class Watch:
    """Samples the consumer's backlog and the configs waiting for an export slot."""

    def __init__(self, size: Size) -> None:
        self.size = size
        self.backlog: list[int] = []
        self.waiting: list[int] = []
        self.exports: Counter[str] = Counter()
        self.durations: list[float] = []
        self.failed = 0

    async def on_export(self, msg: Msg) -> None:
        kind, config = msg.subject.split(".")[2:4]
        if kind == "complete":
            self.exports[config] += 1
            self.durations.append(msgspec.json.decode(msg.data)["duration_seconds"])
        elif kind == "failed":
            self.failed += 1

    async def sample(self, nc: Client, url: str) -> None:
        with contextlib.suppress(NotFoundError):
            info = await nc.jetstream().consumer_info(subjects.EVENTS_STREAM, "autoexport")
            self.backlog.append((info.num_pending or 0) + (info.num_ack_pending or 0))
        status = await request(url, subjects.STATUS_SUBJECT)
        self.waiting.append(sum(self._waits(s) for s in status["states"].values()))

    def _waits(self, s: dict[str, Any]) -> bool:
        """Ready to export by threshold and cooldown, yet not running: waits for a slot
        (or for the scheduler's next pass)."""
        cooled = s["last_export"] is None or s["last_export"] >= self.size.cooldown_s
        return s["games_pending"] >= self.size.threshold and cooled and not s["in_progress"]


async def drain_time(nc: Client, timeout_s: float = 60) -> float:
    began = time.perf_counter()
    while time.perf_counter() - began < timeout_s:
        info = await nc.jetstream().consumer_info(subjects.EVENTS_STREAM, "autoexport")
        if not info.num_pending and not info.num_ack_pending:
            return time.perf_counter() - began
        await asyncio.sleep(0.05)
    return float("inf")


async def run(size_name: str, workdir: Path) -> list[Figure]:
    size = SIZES[size_name]
    with nats_server(workdir) as server, open(workdir / "daemon.log", "wb") as daemon_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"],
            env=daemon_env(workdir, server.url, size),
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_ready(server.url)
            async with client(server.url) as nc:
                fleet, watch = Fleet(size), Watch(size)
                await nc.subscribe("npz.export.>", cb=watch.on_export)
                cpu_before = cpu_seconds(proc.pid)
                began = time.perf_counter()
                until = began + size.duration_s
                publishing = asyncio.create_task(fleet.run(nc, until))
                while not publishing.done():
                    await watch.sample(nc, server.url)
                    await asyncio.sleep(SAMPLE_S)
                await publishing
                elapsed = time.perf_counter() - began
                info = await nc.jetstream().consumer_info(subjects.EVENTS_STREAM, "autoexport")
                behind = (info.num_pending or 0) + (info.num_ack_pending or 0)
                drain_s = await drain_time(nc)
                cpu = cpu_seconds(proc.pid) - cpu_before
                await asyncio.sleep(size.job_s + 1)  # let the last exports announce
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
    if rc != 0:
        raise RuntimeError(f"daemon exited with {rc}; see {workdir / 'daemon.log'}")
    offered = fleet.published / elapsed
    consumed = (fleet.published - behind) / elapsed
    per_config = [watch.exports[k] for k in fleet.keys]
    games_per_config_s = size.events_per_s / size.configs * size.games_per_event
    every_s = max(size.cooldown_s, size.threshold / games_per_config_s)
    allowed = size.duration_s / every_s
    return [
        figure(
            "e2e",
            f"{size.nodes} nodes x {size.duration_s:.0f}s: events consumed/s",
            consumed,
            "events/s",
            baseline=offered,
            baseline_label="published/s",
            target=KEEP_UP,
            note=(
                f"{fleet.published:,} events ({size.games_per_event} games each) over "
                f"{size.configs} configs; {behind} unacknowledged when publishing stopped, "
                f"drained {drain_s:.2f}s later; backlog median "
                f"{statistics.median(watch.backlog):.0f} max {max(watch.backlog)}; "
                f"daemon CPU {cpu / elapsed:.0%} of a core; "
                f"publishers at most {fleet.late_s * 1000:.0f} ms behind schedule"
            ),
        ),
        figure(
            "e2e",
            "exports per config (median)",
            statistics.median(per_config),
            "exports",
            baseline=allowed,
            baseline_label="threshold/cooldown allow",
            note=(
                f"min {min(per_config)} max {max(per_config)}; {watch.failed} failed; "
                f"threshold {size.threshold}, cooldown {size.cooldown_s:g}s, {size.slots} slots, "
                f"jobs of {size.job_s:g}s (median {statistics.median(watch.durations or [0]):.2f}s)"
            ),
        ),
        figure(
            "e2e",
            "configs waiting for a slot (mean)",
            statistics.mean(watch.waiting),
            "configs",
            note=f"max {max(watch.waiting)}, sampled every {SAMPLE_S:g}s",
        ),
    ]
