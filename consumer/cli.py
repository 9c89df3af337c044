"""Command line: argument parsing and dispatch only; each command calls one function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a config's games to one .npz dataset")
    p.add_argument("--board-type", required=True)
    p.add_argument("--num-players", type=int, required=True)
    p.add_argument("--games-dir", required=True)
    p.add_argument("--output", required=True, help="the .npz file to write (atomically)")
    p.add_argument("--use-cache", action="store_true", help="encode only games not yet cached")
    p.add_argument("--cache-dir", help="default: <output dir>/.cache")
    p.add_argument("--min-moves", type=int, default=10)
    p.add_argument("--include-incomplete", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(command=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from consumer.export.exporter import export_main

    return export_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoexport", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.command(args))


if __name__ == "__main__":
    sys.exit(main())
