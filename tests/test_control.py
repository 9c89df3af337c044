"""The operator service through a real server: the micro protocol (`nats micro ...` uses it),
status, export-now, pause and resume, by request and through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from consumer.cli import main
from consumer.embedded import EmbeddedServer
from schemas import subjects
from schemas.events import ExportCompleted, ExportStarted
from tests.daemon_helpers import (
    collect_exports,
    daemon_settings,
    pending,
    publish_selfplay,
    running_daemon,
    wait_for_status,
)

ENDPOINTS = {
    "status": subjects.STATUS_SUBJECT,
    "export-now": subjects.EXPORT_NOW_SUBJECT,
    "pause": subjects.PAUSE_SUBJECT,
    "resume": subjects.RESUME_SUBJECT,
}
ROOT = Path(__file__).parent.parent


async def ask(nc: Client, subject: str, body: bytes = b"") -> tuple[dict[str, str], Any]:
    reply = await nc.request(subject, body, timeout=5)
    return reply.headers or {}, msgspec.json.decode(reply.data) if reply.data else None


async def cli(*argv: str) -> int:
    """The CLI in a thread (it runs its own event loop), output to capsys."""
    return await asyncio.to_thread(main, list(argv))


# ---- the micro protocol ---------------------------------------------------------------


async def test_ping_info_and_stats_follow_the_micro_spec(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    async with running_daemon(daemon_settings(tmp_path, nats_server.url)):
        _, ping = await ask(nc, "$SRV.PING")
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        assert ping["name"] == "autoexport"
        assert ping["version"] and ping["id"]

        _, info = await ask(nc, "$SRV.INFO.autoexport")
        assert info["type"] == "io.nats.micro.v1.info_response"
        assert (info["name"], info["id"]) == ("autoexport", ping["id"])
        assert info["description"]
        assert {e["name"]: e["subject"] for e in info["endpoints"]} == ENDPOINTS

        await ask(nc, subjects.STATUS_SUBJECT)
        await ask(nc, subjects.EXPORT_NOW_SUBJECT, b'{"config": "no good"}')
        _, stats = await ask(nc, f"$SRV.STATS.autoexport.{ping['id']}")
        assert stats["type"] == "io.nats.micro.v1.stats_response"
        by_name = {e["name"]: e for e in stats["endpoints"]}
        assert set(by_name) == set(ENDPOINTS)
        # wait_for_status asked too, while the daemon started
        assert by_name["status"]["num_requests"] >= 2
        assert by_name["status"]["num_errors"] == 0
        # A refused request counts as the endpoint's error, with the reason.
        assert by_name["export-now"]["num_requests"] == 1
        assert by_name["export-now"]["num_errors"] == 1
        assert "no good" in by_name["export-now"]["last_error"]
        assert stats["started"]


# ---- requests -------------------------------------------------------------------------


async def test_status_says_what_each_config_is_doing(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    url = nats_server.url
    async with running_daemon(daemon_settings(tmp_path, url, min_games_threshold=10)):
        await nc.jetstream().publish("selfplay.complete.hex8_2p", b"{not json")
        await publish_selfplay(nc, 4)
        await publish_selfplay(nc, 10, board="go9")
        st = await wait_for_status(
            url, lambda s: pending(s) == 4 and s["states"].get("go9_2p", {}).get("total_samples")
        )

    assert st["configs_tracked"] == 2
    assert st["rejected_messages"] == 1
    assert st["rejected_by_reason"] == {"malformed_json": 1}
    assert st["running_exports"] == []
    hex8, go9 = st["states"]["hex8_2p"], st["states"]["go9_2p"]
    assert hex8["held"] == "4/10 games pending"
    assert {
        "games_pending": hex8["games_pending"], "last_export": hex8["last_export"],
        "in_progress": hex8["in_progress"], "failures": hex8["failures"],
        "paused": hex8["paused"], "total_samples": hex8["total_samples"],
    } == {
        "games_pending": 4, "last_export": None, "in_progress": False, "failures": 0,
        "paused": False, "total_samples": 0,
    }  # fmt: skip
    assert go9["games_pending"] == 0 and go9["total_samples"] == 7
    assert go9["last_export"] >= 0 and go9["last_output_path"].endswith("go9_2p.npz")


async def test_export_now_of_a_config_never_seen_exports_it(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    exports = await collect_exports(nc, "chess_2p")
    async with running_daemon(daemon_settings(tmp_path, nats_server.url)):
        headers, reply = await ask(nc, subjects.EXPORT_NOW_SUBJECT, b'{"config": "chess_2p"}')
        assert "Nats-Service-Error" not in headers
        assert reply == {"ok": True, "config": "chess_2p", "requested": True}
        started = await exports.next()
        assert isinstance(started, ExportStarted) and started.games_pending == 0
        assert isinstance(await exports.next(), ExportCompleted)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"config": "hex*_2p"}', "config 'hex*_2p' is not <board_type>_<num_players>p"),
        (b'{"config": "hex8_99p"}', "num_players 99 must be between 1 and 16"),
        (b"hex8_2p", 'expected {"config": "<board>_<n>p"}'),
        (b"{}", 'expected {"config": "<board>_<n>p"}'),
    ],
)
async def test_export_now_of_an_invalid_config_is_refused_with_the_reason(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, body: bytes, reason: str
) -> None:
    async with running_daemon(daemon_settings(tmp_path, nats_server.url)):
        headers, _ = await ask(nc, subjects.EXPORT_NOW_SUBJECT, body)
        st = await wait_for_status(nats_server.url, lambda s: True)
    assert headers["Nats-Service-Error-Code"] == "400"
    assert reason in headers["Nats-Service-Error"]
    assert st["configs_tracked"] == 0


@pytest.mark.parametrize("request_subject", [subjects.PAUSE_SUBJECT, subjects.RESUME_SUBJECT])
async def test_pause_or_resume_of_an_unknown_config_is_404(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, request_subject: str
) -> None:
    async with running_daemon(daemon_settings(tmp_path, nats_server.url)):
        headers, _ = await ask(nc, request_subject, b'{"config": "go9_2p"}')
    assert headers["Nats-Service-Error-Code"] == "404"
    assert headers["Nats-Service-Error"] == "config go9_2p is not tracked"


# ---- the CLI --------------------------------------------------------------------------


async def test_cli_status_pause_export_now_and_resume(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    exports = await collect_exports(nc)
    async with running_daemon(daemon_settings(tmp_path, url, min_games_threshold=10)):
        await publish_selfplay(nc, 3)
        await wait_for_status(url, lambda s: pending(s) == 3)
        capsys.readouterr()

        assert await cli("pause", "hex8_2p", "--nats-url", url) == 0
        assert json.loads(capsys.readouterr().out) == {
            "ok": True, "config": "hex8_2p", "paused": True,
        }  # fmt: skip
        await publish_selfplay(nc, 20)
        await wait_for_status(url, lambda s: pending(s) == 23)

        assert await cli("status", "--nats-url", url) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].startswith("configs tracked: 1   rejected messages: 0")
        assert table[1].split() == [
            "config",
            "pending",
            "last",
            "export",
            "samples",
            "fail",
            "state",
        ]
        assert table[2].split() == ["hex8_2p", "23", "never", "0", "0", "paused"]

        assert await cli("status", "--json", "--nats-url", url) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["states"]["hex8_2p"]["paused"] is True
        assert st["states"]["hex8_2p"]["held"] == "paused by an operator"
        assert exports.queue.empty()

        assert await cli("export-now", "hex8_2p", "--nats-url", url) == 0
        assert json.loads(capsys.readouterr().out)["requested"] is True
        started = await exports.next()
        assert isinstance(started, ExportStarted) and started.games_pending == 23
        assert isinstance(await exports.next(), ExportCompleted)

        assert await cli("resume", "hex8_2p", "--nats-url", url) == 0
        assert json.loads(capsys.readouterr().out)["paused"] is False
        await publish_selfplay(nc, 10)  # the threshold now exports by itself
        assert isinstance(await exports.next(), ExportStarted)
        assert isinstance(await exports.next(), ExportCompleted)

        assert await cli("pause", "go9_2p", "--nats-url", url) == 1
        assert capsys.readouterr().err.strip() == (
            "autoexport: pause go9_2p: config go9_2p is not tracked"
        )
        assert await cli("export-now", "hex*_2p", "--nats-url", url) == 1
        assert "hex*_2p" in capsys.readouterr().err


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTOEXPORT_NATS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_status_without_a_daemon_exits_1_with_one_clear_line(
    nats_server: EmbeddedServer,
) -> None:
    no_daemon = await asyncio.to_thread(run_cli, "status", "--nats-url", nats_server.url)
    assert no_daemon.returncode == 1
    assert no_daemon.stdout == ""
    assert no_daemon.stderr == f"autoexport: no autoexport daemon answers on {nats_server.url}\n"

    no_server = await asyncio.to_thread(run_cli, "status", "--nats-url", "nats://127.0.0.1:1")
    assert no_server.returncode == 1
    assert no_server.stderr.startswith("autoexport: cannot connect to NATS at nats://127.0.0.1:1")
    assert len(no_server.stderr.splitlines()) == 1


def test_a_status_too_large_for_one_message_keeps_the_configs_that_matter() -> None:
    from consumer.control import _fit
    from consumer.operator import render_status

    def state(pending: int, **flags: Any) -> dict[str, Any]:
        base = {"games_pending": pending, "in_progress": False, "failures": 0, "paused": False,
                "last_export": None, "total_samples": 0}  # fmt: skip
        return base | flags

    states = {f"cfg{i}_2p": state(i) for i in range(3000)}
    states["zfail_2p"] = state(0, failures=2)
    states["zrun_2p"] = state(0, in_progress=True)
    body = {"configs_tracked": len(states), "rejected_messages": 0, "states": states}

    encoded = _fit(body, 64 * 1024)
    fitted = msgspec.json.decode(encoded)
    assert len(encoded) <= 64 * 1024
    kept = fitted["states"]
    assert fitted["states_omitted"] == len(states) - len(kept) > 0
    # Exporting and failing configs first, then those with the most games pending.
    assert list(kept)[:3] == ["zrun_2p", "zfail_2p", "cfg2999_2p"]
    assert "cfg0_2p" not in kept
    assert f"and {fitted['states_omitted']} more configs" in render_status(fitted)
    assert _fit(body, 10**9) == msgspec.json.encode(body)  # small enough: unchanged


async def test_status_piped_into_a_reader_that_stops_early_is_not_an_error(tmp_path: Path) -> None:
    from consumer.decide import Counted
    from consumer.store import Store

    db = tmp_path / "state.db"
    async with await Store.open(db) as store:

        def one(i: int) -> Counted:
            return Counted(config=f"b{i}_2p", board_type=f"b{i}", num_players=2,
                           event_id=f"e{i}", source="n", batches=((f"x{i}", 1),))  # fmt: skip

        counted = [one(i) for i in range(20_000)]
        await store.record_messages(counted, [], [], now=1.0)
    pipeline = f"{sys.executable} -m consumer.cli status --state-db {db} | head -n 1"
    result = subprocess.run(pipeline, shell=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("configs tracked: 20000")
    assert result.stderr == ""
