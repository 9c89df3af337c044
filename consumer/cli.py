"""Command line: argument parsing and dispatch only; each command calls one function."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _traced(service: str, run: Callable[[], int]) -> int:
    """Run a command with tracing and metrics as the OTEL_* variables say, flushed before
    the process exits (the export job's spans must reach the collector)."""
    from consumer.telemetry import TelemetryError, setup_telemetry

    try:
        shutdown = setup_telemetry(service)
    except TelemetryError as exc:
        print(f"autoexport: {exc}", file=sys.stderr)
        return 2
    try:
        return run()
    finally:
        shutdown()


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

    return _traced("autoexport-export", lambda: export_main(args))


def _add_selfplay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selfplay", help="play OpenSpiel games with MCTS and announce them")
    p.add_argument("--nats-url", required=True)
    p.add_argument("--games-dir", required=True)
    p.add_argument("--game", required=True, help="OpenSpiel game string, e.g. tic_tac_toe")
    p.add_argument("--board-type", required=True)
    p.add_argument("--num-players", type=int, required=True)
    p.add_argument("--games", type=int, required=True)
    p.add_argument("--simulations", type=int, default=25, help="MCTS simulations per move")
    p.add_argument("--node-id", help="default: the host name")
    p.add_argument("--seed", type=int, help="the same seed replays the same games")
    p.add_argument("--batch-size", type=int, help="games per announced batch (default: all)")
    p.add_argument("--db-name", help="store path in the games dir (default: <node-id>.db)")
    p.set_defaults(command=_cmd_selfplay)


def _cmd_selfplay(args: argparse.Namespace) -> int:
    from consumer.selfplay import selfplay_main

    return _traced("autoexport-selfplay", lambda: selfplay_main(args))


DEFAULT_URL = "nats://127.0.0.1:4222"


def _nats_url(args: argparse.Namespace) -> str:
    return args.nats_url or os.environ.get("AUTOEXPORT_NATS_URL") or DEFAULT_URL


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the export daemon")
    p.add_argument("--nats-url", help="join this server (default: start an embedded one)")
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--data-dir", help="root of state, games, outputs (default ./data)")
    p.add_argument("--games-dir")
    p.add_argument("--output-dir")
    p.add_argument("--state-db")
    p.add_argument("--min-games", type=int, dest="min_games_threshold")
    p.add_argument("--cooldown", type=float, dest="export_cooldown_seconds", metavar="SECONDS")
    p.add_argument("--max-concurrent", type=int, dest="max_concurrent_exports")
    p.add_argument("--export-timeout", type=float, dest="export_timeout_seconds", metavar="SECONDS")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="stop once every event is counted and no export runs or waits",
    )
    p.set_defaults(command=_cmd_run)


RUN_FLAGS = (
    "nats_url", "data_dir", "games_dir", "output_dir", "state_db", "min_games_threshold",
    "export_cooldown_seconds", "max_concurrent_exports", "export_timeout_seconds", "log_format",
)  # fmt: skip


def _cmd_run(args: argparse.Namespace) -> int:
    from consumer.daemon import serve
    from consumer.logs import setup_logging
    from consumer.scheduler import check_job_template
    from schemas.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            os.environ, args.config, {name: getattr(args, name) for name in RUN_FLAGS}
        )
        check_job_template(settings)
    except SettingsError as exc:
        print(f"autoexport: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    return serve(settings, exit_when_idle=args.exit_when_idle)


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish a selfplay or sync event (for scripts)")
    kinds = p.add_subparsers(required=True, metavar="KIND")
    for kind, help_text in (("selfplay", "selfplay.complete"), ("sync", "data.sync.completed")):
        k = kinds.add_parser(kind, help=f"publish {help_text}.<config>")
        k.add_argument("--nats-url")
        k.add_argument("--board-type", required=True)
        k.add_argument("--num-players", type=int, required=True)
        k.add_argument("--event-id", help="default: a new UUID")
        if kind == "selfplay":
            k.add_argument("--games", type=int, required=True)
            k.add_argument("--node-id", default=socket.gethostname())
            k.add_argument("--batch-id", help="default: the event id")
            k.add_argument("--db-path", help="store path relative to the games directory")
        else:
            k.add_argument("--source-node", default=socket.gethostname())
            group = k.add_mutually_exclusive_group(required=True)
            group.add_argument(
                "--batch",
                action="append",
                metavar="BATCH_ID:GAMES",
                help="a synced batch (repeatable)",
            )
            group.add_argument("--games-synced", type=int)
        k.set_defaults(command=_cmd_publish, kind=kind)


def _cmd_publish(args: argparse.Namespace) -> int:
    import msgspec

    from consumer.operator import DaemonUnreachable, build_event, publish_event

    try:
        event = build_event(vars(args))
    except (msgspec.ValidationError, ValueError) as exc:
        print(f"autoexport: invalid event: {exc}", file=sys.stderr)
        return 2

    def publish() -> int:
        try:
            ack = asyncio.run(publish_event(_nats_url(args), event))
        except DaemonUnreachable as exc:
            print(f"autoexport: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"event_id": event.event_id, **ack}))
        return 0

    return _traced("autoexport-publish", publish)


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="follow npz.export.> and print each event")
    p.add_argument("--nats-url")
    p.add_argument("--config", default="*", help="only this config, e.g. hex8_2p")
    p.add_argument("--durable", metavar="NAME", help="a durable consumer: resume where NAME left")
    p.add_argument("--new-only", action="store_true", help="skip events already in the stream")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--count", type=int, metavar="N", help="exit after N events")
    p.set_defaults(command=_cmd_watch)


def _cmd_watch(args: argparse.Namespace) -> int:
    import nats.errors

    from consumer.trainer import watch_exports
    from schemas.subjects import InvalidConfigKey

    def watch() -> int:
        if args.durable is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", args.durable):
            print(f"autoexport watch: --durable {args.durable!r}: use 1-64 of A-Z a-z 0-9 _ -",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.count is not None and args.count < 1:
            print("autoexport watch: --count must be at least 1", file=sys.stderr)
            return 2
        try:
            asyncio.run(
                watch_exports(
                    _nats_url(args),
                    lambda line: print(line, flush=True),
                    config=args.config,
                    durable=args.durable,
                    new_only=args.new_only,
                    as_json=args.json,
                    count=args.count,
                )
            )
        except InvalidConfigKey as exc:
            print(f"autoexport watch: {exc}", file=sys.stderr)
            return 2
        except (ConnectionError, nats.errors.Error) as exc:
            print(f"autoexport watch: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        return 0

    return _traced("autoexport-watch", watch)


DURABLE_HELP = "the daemon's durable_name, when several run on one server (default autoexport)"


def _control_subject(verb: str, args: argparse.Namespace) -> str:
    from schemas.subjects import DEFAULT_DURABLE, control_subject

    durable = args.durable or os.environ.get("AUTOEXPORT_DURABLE_NAME") or DEFAULT_DURABLE
    return control_subject(verb, durable)


def _add_operator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="ask the running daemon (or read a state file)")
    p.add_argument("--nats-url")
    p.add_argument("--state-db", help="read a stopped daemon's state file instead")
    p.add_argument("--json", action="store_true")
    p.add_argument("--durable", help=DURABLE_HELP)
    p.set_defaults(command=_cmd_status)
    for name, help_text in (
        ("export-now", "export CONFIG now, bypassing threshold, cooldown and backoff"),
        ("pause", "stop exporting CONFIG until resumed (games are still counted)"),
        ("resume", "resume exporting CONFIG"),
    ):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("config", metavar="CONFIG", help="e.g. hex8_2p")
        q.add_argument("--nats-url")
        q.add_argument("--durable", help=DURABLE_HELP)
        q.set_defaults(command=_cmd_config_request, request=name)


def _cmd_status(args: argparse.Namespace) -> int:
    from consumer.operator import (
        DaemonUnreachable,
        render_status,
        request,
        status_from_file,
    )

    try:
        if args.state_db:
            status = asyncio.run(status_from_file(args.state_db))
        else:
            status = asyncio.run(request(_nats_url(args), _control_subject("status", args)))
    except DaemonUnreachable as exc:
        print(f"autoexport: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _cmd_config_request(args: argparse.Namespace) -> int:
    from consumer.operator import DaemonUnreachable, RequestRefused, request

    subject = _control_subject(args.request, args)
    try:
        reply = asyncio.run(request(_nats_url(args), subject, {"config": args.config}))
    except (DaemonUnreachable, RequestRefused) as exc:
        print(f"autoexport: {args.request} {args.config}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on this machine: nodes, daemon, trainer")
    p.add_argument("--data-dir", help="default: a new temporary directory")
    p.add_argument("--game", default="connect_four", help="OpenSpiel game string")
    p.add_argument("--board-type", help="default: the game's name in [a-z0-9]")
    p.add_argument("--num-players", type=_at_least(1), default=2)
    p.add_argument("--nodes", type=_at_least(1), default=2)
    p.add_argument("--games-per-node", type=_at_least(1), default=30)
    p.add_argument("--batch-size", type=_at_least(1), default=10)
    p.add_argument("--simulations", type=_at_least(2), default=20)
    p.add_argument("--min-games", type=_at_least(1), default=40, help="export threshold")
    p.add_argument(
        "--min-moves",
        type=_at_least(0),
        default=10,
        help="skip shorter games (tic_tac_toe: at most 9 moves, so use 3)",
    )
    p.add_argument("--exports", type=_at_least(1), default=1, help="stop after this many datasets")
    p.set_defaults(command=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from consumer.demo import DemoOptions, demo_main
    from consumer.logs import setup_logging
    from schemas.subjects import InvalidConfigKey, config_key

    if args.board_type is None:  # chess -> chess, tic_tac_toe -> tictactoe
        args.board_type = re.sub(r"[^a-z0-9]", "", args.game.split("(")[0].lower()) or "game"
    try:
        config_key(args.board_type, args.num_players)
        if args.data_dir is not None:
            Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    except (InvalidConfigKey, OSError) as exc:
        print(f"autoexport demo: {exc}", file=sys.stderr)
        return 2
    setup_logging("INFO")
    fields = {k: v for k, v in vars(args).items() if k in DemoOptions.__struct_fields__}
    return demo_main(DemoOptions(**fields))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoexport", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_run(sub)
    _add_publish(sub)
    _add_operator(sub)
    _add_export(sub)
    _add_selfplay(sub)
    _add_watch(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.command(args))
    except BrokenPipeError:  # the reader went away (autoexport status | head): not an error
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
