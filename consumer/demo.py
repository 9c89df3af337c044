"""``autoexport demo``: the whole loop on one machine, with real processes.

An embedded nats-server, the daemon, selfplay nodes playing OpenSpiel games as separate
processes, and a trainer that waits for ``npz.export.complete``, verifies and loads the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats

from consumer.daemon import run_daemon
from consumer.embedded import EmbeddedServer
from consumer.streams import ensure_streams
from consumer.trainer import describe_dataset, follow_exports, verify_dataset
from schemas.events import ExportCompleted, ExportFailed, ExportStarted
from schemas.settings import load_settings
from schemas.subjects import config_key

EXPORT_GRACE_S = 30.0


class DemoOptions(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: str | None = None  # default: a new temporary directory
    game: str = "connect_four"
    board_type: str = "connectfour"  # the CLI derives it from ``game`` unless given
    num_players: int = 2
    nodes: int = 2
    games_per_node: int = 30
    batch_size: int = 10
    simulations: int = 20
    min_games: int = 40
    min_moves: int = 10  # tic_tac_toe games are at most 9 moves: lower it for them
    exports: int = 1  # stop after this many completed exports
    timeout_s: float = 600.0


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


async def run_demo(options: DemoOptions) -> int:
    data_dir = Path(options.data_dir or tempfile.mkdtemp(prefix="autoexport-demo-")).absolute()
    config = config_key(options.board_type, options.num_players)
    server = EmbeddedServer(data_dir / "nats")
    # In this thread, which lives as long as the demo: the server dies with its starter.
    url = server.start()
    say(f"data directory {data_dir}")
    say(f"embedded nats-server at {url}  (try: nats --server {url} stream ls)")
    settings = load_settings(
        {},
        flags={
            "nats_url": url,
            "data_dir": str(data_dir),
            "min_games_threshold": options.min_games,
            "min_moves": options.min_moves,
            "export_cooldown_seconds": 5.0,
        },
    )
    stop = asyncio.Event()
    daemon = asyncio.create_task(run_daemon(settings, stop))
    nodes: list[asyncio.subprocess.Process] = []
    try:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await ensure_streams(js)
        trainer = asyncio.create_task(_trainer(js, config, options.exports))
        say(
            f"starting {options.nodes} selfplay nodes: {options.games_per_node} games of "
            f"{options.game} each, batches of {options.batch_size}, export at "
            f"{options.min_games} games"
        )
        for n in range(options.nodes):
            nodes.append(await _start_node(options, url, settings.games_dir or "", n))
        selfplay = asyncio.ensure_future(asyncio.gather(*(node.wait() for node in nodes)))
        # Ctrl-C cancels the waits it gathers: take note, or asyncio logs a traceback.
        selfplay.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.wait([trainer, selfplay, daemon], timeout=options.timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        stopped = daemon.done()  # it refused to start (its error is above) or failed
        failed = [(n + 1, node.returncode) for n, node in enumerate(nodes) if node.returncode]
        if not trainer.done() and selfplay.done() and not failed and not stopped:
            # Every game is played: what they allow is exported within a short grace.
            await asyncio.wait([trainer], timeout=EXPORT_GRACE_S)
        gave_up = not trainer.done()
        # Closing the connection ends the trainer's fetch: nats-py's fetch can swallow a
        # cancellation that arrives while it waits.
        await nc.close()
        trainer.cancel()
        with contextlib.suppress(asyncio.CancelledError, nats.errors.Error):
            await trainer
        if stopped:
            say("the daemon stopped; nothing more can be exported")
            return 1
        if failed:
            for n, code in failed:
                say(f"selfplay node {n} failed with exit code {code} (its error is above)")
            return 1
        if gave_up:
            say(
                f"selfplay finished but fewer than {options.exports} datasets were announced: "
                "play more games (--games-per-node) or lower --min-games / --exports"
            )
            return 1
        return 0 if trainer.result() else 1
    finally:
        for node in nodes:
            if node.returncode is None:
                node.terminate()
            await node.wait()
        stop.set()
        await daemon
        server.stop()


async def _start_node(
    options: DemoOptions, url: str, games_dir: str, n: int
) -> asyncio.subprocess.Process:
    argv = [
        sys.executable, "-m", "consumer.cli", "selfplay", "--nats-url", url,
        "--games-dir", games_dir, "--game", options.game,
        "--board-type", options.board_type, "--num-players", str(options.num_players),
        "--games", str(options.games_per_node), "--batch-size", str(options.batch_size),
        "--simulations", str(options.simulations), "--node-id", f"demo-node-{n + 1}",
        "--seed", str(1000 + n),
    ]  # fmt: skip
    return await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


async def _trainer(js: nats.js.JetStreamContext, config: str, wanted: int) -> bool:
    """What a training service does: wait for a dataset of its config, check it, load it."""
    completed = 0
    started_at = time.monotonic()
    async for event, _msg in follow_exports(js, config=config, durable="demo-trainer"):
        elapsed = time.monotonic() - started_at
        match event:
            case ExportStarted():
                say(f"{elapsed:6.1f}s  npz.export.started   {event.games_pending} games pending")
            case ExportFailed():
                say(f"{elapsed:6.1f}s  npz.export.failed    {event.error}")
                return False  # the demo stops here rather than wait through the backoff
            case ExportCompleted():
                say(
                    f"{elapsed:6.1f}s  npz.export.complete  {event.samples} samples from "
                    f"{event.games_exported} games in {event.duration_seconds:.1f}s"
                )
                await asyncio.to_thread(
                    verify_dataset, event.output_path, event.size_bytes, event.sha256
                )
                summary = await asyncio.to_thread(describe_dataset, event.output_path)
                say(f"trainer loaded {event.output_path} (sha256 verified)")
                for name, (shape, dtype) in summary.pop("arrays").items():
                    say(f"    {name:<16} {dtype:<8} {tuple(shape)}")
                say(f"    {json.dumps(summary)}")
                completed += 1
                if completed >= wanted:
                    return True
    return False


def demo_main(options: DemoOptions) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_demo(options))
    return 130
