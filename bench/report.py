"""Benchmark figures: the record each benchmark returns, the table, the JSON file.

Every figure carries its baseline from the same run, so a ratio survives a noisy machine;
the absolute value is there for context.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct


class Target(Struct, frozen=True):
    """What the ratio must satisfy, e.g. ``Target(">=", 0.8)``; with ``unit``, what the
    value itself must satisfy (an absolute target such as ``Target("<", 100, "ms")``)."""

    op: Literal[">=", "<=", "<"]
    value: float
    unit: str = ""  # "": the target reads the ratio

    def met(self, x: float) -> bool:
        if self.op == ">=":
            return x >= self.value
        return x <= self.value if self.op == "<=" else x < self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}" + (f" {self.unit}" if self.unit else "")


class Figure(Struct, kw_only=True):
    """One measured value, its baseline from the same run, and the ratio the target reads."""

    benchmark: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None  # what ``target`` applies to
    target: Target | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        checked = self.value if self.target.unit else self.ratio
        return None if checked is None else self.target.met(checked)


def figure(
    benchmark: str,
    metric: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_label: str = "",
    ratio: float | None = None,
    target: Target | None = None,
    note: str = "",
) -> Figure:
    """A figure whose ratio defaults to value / baseline."""
    if ratio is None and baseline:
        ratio = value / baseline
    return Figure(
        benchmark=benchmark,
        metric=metric,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_label=baseline_label,
        ratio=ratio,
        target=target,
        note=note,
    )


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-2):
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _verdict(f: Figure) -> str:
    passed = f.passed
    return "" if passed is None else ("pass" if passed else "FAIL")


HEADER = ("benchmark", "metric", "value", "unit", "baseline", "ratio", "target", "result")


def rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    return [
        (
            f.benchmark,
            f.metric,
            _num(f.value),
            f.unit,
            _num(f.baseline) + (f" ({f.baseline_label})" if f.baseline_label else ""),
            "" if f.ratio is None else f"{f.ratio:.3f}",
            "" if f.target is None else str(f.target),
            _verdict(f),
        )
        for f in figures
    ]


def text_table(figures: list[Figure]) -> str:
    table = [HEADER, *rows(figures)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(figures: list[Figure]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(figures)]
    return "\n".join(lines)


def notes(figures: list[Figure]) -> str:
    return "\n".join(f"- {f.benchmark} / {f.metric}: {f.note}" for f in figures if f.note)


def machine() -> dict[str, object]:
    """What the figures ran on: enough to tell two machines apart."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nats_server": _nats_server_version(),
        "disk_free_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1),
    }


def _nats_server_version() -> str:
    from consumer.embedded import nats_server_binary

    try:
        out = subprocess.run(
            [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
    except Exception as exc:  # the version is context, never a reason to fail the run
        return f"unknown ({exc})"


class Results(Struct, kw_only=True):
    created_at: str
    command: str
    size: str
    machine: dict[str, object]
    duration_s: dict[str, float]  # per benchmark
    figures: list[Figure]
    errors: dict[str, str]  # benchmark -> traceback summary


def write_json(path: Path, results: Results) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = msgspec.to_builtins(results)
    for raw, f in zip(data["figures"], results.figures, strict=True):
        raw["passed"] = f.passed
        raw["target"] = None if f.target is None else str(f.target)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(data)) + b"\n")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
