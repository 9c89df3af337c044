"""``python -m bench``: run all benchmarks (or some), print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.report import Figure, Results, machine, markdown_table, now_iso, text_table, write_json

Bench = Callable[[str, Path], list[Figure] | Awaitable[list[Figure]]]

# name -> "module:function"; imported only when selected
BENCHMARKS = {
    "ingest": "bench.ingest:run",
    "dedupe": "bench.dedupe:run",
    "latency": "bench.latency:run",
    "export": "bench.export:run_throughput",
    "incremental": "bench.export:run_incremental",
    "memory": "bench.export:run_memory",
    "e2e": "bench.e2e:run",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})",
    )
    p.add_argument("--size", choices=("small", "default", "large"), default="default")
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    p.add_argument(
        "--workdir", type=Path, help="keep work files here (default: a temporary directory)"
    )
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})")
    args.names = names
    return args


def run_one(name: str, size: str, workdir: Path) -> list[Figure]:
    module, function = BENCHMARKS[name].split(":")
    bench: Bench = getattr(importlib.import_module(module), function)
    result = bench(size, workdir)
    if inspect.isawaitable(result):
        return asyncio.run(result)  # type: ignore[arg-type]
    return result  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    figures: list[Figure] = []
    durations: dict[str, float] = {}
    errors: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        root = args.workdir
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        for name in args.names:
            workdir = root / name
            workdir.mkdir(parents=True)
            print(f"[bench] {name} ({args.size}) ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                got = run_one(name, args.size, workdir)
            except Exception as exc:
                traceback.print_exc()
                errors[name] = f"{type(exc).__name__}: {exc}"
                got = []
            durations[name] = round(time.monotonic() - started, 1)
            figures += got
            print(f"[bench] {name} done in {durations[name]:.1f}s", file=sys.stderr, flush=True)
            print(text_table(got), file=sys.stderr, flush=True)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = Results(
        created_at=now_iso(),
        command=command.strip(),
        size=args.size,
        machine=machine(),
        duration_s=durations,
        figures=figures,
        errors=errors,
    )
    write_json(args.json, results)
    print()
    print(text_table(figures))
    if args.markdown:
        print()
        print(markdown_table(figures))
    total = sum(durations.values())
    failed = [f for f in figures if f.passed is False]
    print(
        f"\n{len(figures)} figures, {len(failed)} below target, {len(errors)} errors,"
        f" {total:.0f}s; results in {args.json}"
    )
    for name, error in errors.items():
        print(f"error in {name}: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
