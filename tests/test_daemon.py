"""End to end through a real nats-server: counting, the gate, announcements, rejections."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
from nats.aio.client import Client

from consumer.embedded import EmbeddedServer
from consumer.ingest import consumer_config
from consumer.streams import ensure_streams
from schemas import subjects
from schemas.events import ExportCompleted, ExportFailed, ExportStarted
from tests.daemon_helpers import (
    collect_dead_letters,
    collect_exports,
    daemon_settings,
    pending,
    publish_selfplay,
    running_daemon,
    selfplay_payload,
    status,
    wait_for_status,
)


async def test_exports_once_threshold_is_crossed_and_announces_a_loadable_file(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url)
    exports = await collect_exports(nc)
    async with running_daemon(settings):
        for _ in range(2):
            await publish_selfplay(nc, 40)
        await wait_for_status(nats_server.url, lambda s: pending(s) == 80)
        await publish_selfplay(nc, 40)

        started = await exports.next()
        complete = await exports.next()
        assert isinstance(started, ExportStarted)
        # Had the gate fired below the threshold, the first export would have seen <= 80.
        assert started.games_pending == 120
        assert isinstance(complete, ExportCompleted)
        assert complete.export_id == started.export_id
        assert complete.output_path == str(tmp_path / "data" / "training" / "hex8_2p.npz")
        assert complete.samples == 7
        assert complete.size_bytes == Path(complete.output_path).stat().st_size
        with np.load(complete.output_path, allow_pickle=False) as data:
            assert data["values"].shape == (7,)

        st = await wait_for_status(nats_server.url, lambda s: pending(s) == 0)
        hex8 = st["states"]["hex8_2p"]
        assert hex8["total_samples"] == 7
        assert hex8["in_progress"] is False
        assert hex8["failures"] == 0
        assert st["configs_tracked"] == 1


async def test_cooldown_holds_the_next_export_and_lifts_by_itself(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    cooldown_s = 1.5
    settings = daemon_settings(
        tmp_path, nats_server.url, min_games_threshold=10, export_cooldown_seconds=cooldown_s
    )
    exports = await collect_exports(nc)
    async with running_daemon(settings):
        await publish_selfplay(nc, 10)
        await exports.next()
        first = await exports.next()
        assert isinstance(first, ExportCompleted)

        await publish_selfplay(nc, 10)
        st = await wait_for_status(nats_server.url, lambda s: pending(s) == 10)
        assert st["states"]["hex8_2p"]["held"] == "in cooldown since the last export"

        # No further event arrives: the daemon re-checks on its own when the cooldown ends.
        second = await exports.next()
        assert isinstance(second, ExportStarted)
        assert second.games_pending == 10
        assert (second.timestamp - first.timestamp).total_seconds() >= cooldown_s - 0.05


async def test_duplicate_deliveries_and_sync_of_counted_batches_change_nothing(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url)
    js = nc.jetstream()
    async with running_daemon(settings):
        payload = selfplay_payload(30, batch_id="batch-a")
        # The same event published twice under different message ids passes the stream's
        # duplicate window: only the daemon's batch dedupe can catch it.
        await js.publish("selfplay.complete.hex8_2p", payload, headers={"Nats-Msg-Id": "m1"})
        await js.publish("selfplay.complete.hex8_2p", payload, headers={"Nats-Msg-Id": "m2"})
        sync = (
            b'{"event_id": "sync-1", "board_type": "hex8", "num_players": 2,'
            b' "source_node": "rsync", "timestamp": "2026-01-01T00:00:00Z",'
            b' "batches": [{"batch_id": "batch-a", "games": 30},'
            b' {"batch_id": "batch-b", "games": 5}]}'
        )
        await js.publish("data.sync.completed.hex8_2p", sync)
        await js.publish("data.sync.completed.hex8_2p", sync, headers={"Nats-Msg-Id": "m3"})
        await publish_selfplay(nc, 1)  # a marker: once it is counted, everything before is
        st = await wait_for_status(nats_server.url, lambda s: (pending(s) or 0) >= 36)
        assert pending(st) == 36
        assert st["states"]["hex8_2p"]["total_games"] == 36
        assert st["rejected_messages"] == 0


BAD_INPUTS = {
    "malformed_json": ("selfplay.complete.hex8_2p", b"{not json"),
    "wrong_type": (
        "selfplay.complete.hex8_2p",
        selfplay_payload(1).replace(b'"games":1', b'"games":"1"'),
    ),
    "missing_field": ("selfplay.complete.hex8_2p", b'{"event_id": "x", "board_type": "hex8"}'),
    "negative_games": ("selfplay.complete.hex8_2p", selfplay_payload(-5)),
    "absurd_games": ("selfplay.complete.hex8_2p", selfplay_payload(10**9)),
    "wildcard_board": ("selfplay.complete.hex8_2p", selfplay_payload(1, board="hex*")),
    "subject_mismatch": ("selfplay.complete.go9_2p", selfplay_payload(1)),
    "bad_subject_token": ("selfplay.complete.HEX", selfplay_payload(1)),
    "oversized": ("selfplay.complete.hex8_2p", selfplay_payload(1, padding="x" * 300_000)),
}
EXPECTED_REASON = {
    "malformed_json": "malformed_json",
    "wrong_type": "invalid_event",
    "missing_field": "invalid_event",
    "negative_games": "invalid_event",
    "absurd_games": "invalid_event",
    "wildcard_board": "invalid_event",
    "subject_mismatch": "subject_mismatch",
    "bad_subject_token": "subject_mismatch",
    "oversized": "oversized",
}


async def test_each_bad_input_is_dead_lettered_and_good_events_after_it_count(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url)
    dead = await collect_dead_letters(nc)
    js = nc.jetstream()
    async with running_daemon(settings):
        for name, (subject, payload) in BAD_INPUTS.items():
            await js.publish(subject, payload)
            await publish_selfplay(nc, 1)
            letter = await dead.next()
            assert letter["subject"] == subject, name
            assert letter["reason"].startswith(EXPECTED_REASON[name] + ":"), (name, letter)
        st = await wait_for_status(nats_server.url, lambda s: pending(s) == len(BAD_INPUTS))
        assert st["rejected_messages"] == len(BAD_INPUTS)
        assert sum(st["rejected_by_reason"].values()) == len(BAD_INPUTS)

    # Nothing was left unacknowledged: the stream is fully consumed.
    info = await js.consumer_info("SELFPLAY_EVENTS", settings.durable_name)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0


async def test_a_failing_job_announces_failure_and_backs_off_exponentially(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(
        tmp_path, nats_server.url, mode="fail", min_games_threshold=5,
        backoff_base_seconds=0.3, backoff_max_seconds=10,
    )  # fmt: skip
    exports = await collect_exports(nc)
    async with running_daemon(settings):
        await publish_selfplay(nc, 5)
        failures: list[ExportFailed] = []
        while len(failures) < 3:
            event = await exports.next()
            if isinstance(event, ExportFailed):
                failures.append(event)
        assert [f.consecutive_failures for f in failures] == [1, 2, 3]
        assert failures[0].exit_code == 3
        assert "no usable games" in failures[0].error
        gaps = [(b.timestamp - a.timestamp).total_seconds() for a, b in pairwise(failures)]
        # retry_at doubles: 0.3 s, then 0.6 s (plus the job's own run time).
        assert gaps[0] >= 0.3 - 0.05
        assert gaps[1] >= 0.6 - 0.05
        assert (failures[2].retry_at - failures[2].timestamp).total_seconds() >= 1.2 - 0.01

        st = await status(nats_server.url)
        assert st["states"]["hex8_2p"]["games_pending"] == 5  # nothing pending lost
        assert st["states"]["hex8_2p"]["failures"] >= 3


async def test_export_now_bypasses_threshold_and_pause_holds(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    from consumer.operator import RequestRefused, request

    settings = daemon_settings(tmp_path, nats_server.url)
    url = nats_server.url
    exports = await collect_exports(nc)
    async with running_daemon(settings):
        await publish_selfplay(nc, 3)
        await wait_for_status(url, lambda s: pending(s) == 3)
        await request(url, "autoexport.pause", {"config": "hex8_2p"})
        await publish_selfplay(nc, 200)
        st = await wait_for_status(url, lambda s: pending(s) == 203)
        assert st["states"]["hex8_2p"]["held"] == "paused by an operator"
        assert exports.queue.empty()

        await request(url, "autoexport.export-now", {"config": "hex8_2p"})
        started = await exports.next()
        assert isinstance(started, ExportStarted) and started.games_pending == 203
        assert isinstance(await exports.next(), ExportCompleted)

        await request(url, "autoexport.resume", {"config": "hex8_2p"})
        try:
            await request(url, "autoexport.export-now", {"config": "hex*_2p"})
        except RequestRefused as exc:
            assert "hex*_2p" in str(exc)
        else:
            raise AssertionError("an invalid config was accepted")


async def test_an_export_identical_to_the_last_one_says_so(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url, min_games_threshold=5)
    exports = await collect_exports(nc)
    async with running_daemon(settings):
        completes: list[ExportCompleted] = []
        for _ in range(2):
            await publish_selfplay(nc, 5)
            while not isinstance(event := await exports.next(), ExportCompleted):
                pass
            completes.append(event)
    first, second = completes
    # The fake job writes the same bytes each time: the second dataset brings nothing new.
    assert first.sha256 == second.sha256
    assert (first.unchanged, second.unchanged) == (False, True)


async def test_an_announcement_stream_deleted_while_running_is_put_back(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url, min_games_threshold=10)
    js = nc.jetstream()
    async with running_daemon(settings):
        await wait_for_status(nats_server.url, lambda s: s["configs_tracked"] == 0)
        await js.delete_stream(subjects.EXPORTS_STREAM)
        await publish_selfplay(nc, 10)
        await wait_for_status(
            nats_server.url,
            lambda s: s["unpublished_events"] == 0 and s["states"]["hex8_2p"]["total_samples"] > 0,
        )
    info = await js.stream_info(subjects.EXPORTS_STREAM)
    assert info.state.messages == 2  # started and complete, published once the stream was back


async def test_an_event_jetstream_gave_up_delivering_is_still_counted(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    # One delivery allowed, acked within 1 s: an event fetched by someone else and never
    # acked is dropped by the server, which says so only in an advisory.
    settings = daemon_settings(
        tmp_path, nats_server.url, min_games_threshold=1000, max_deliver=1, ack_wait_seconds=1.0
    )
    js = nc.jetstream()
    await ensure_streams(js)
    await js.add_consumer(subjects.EVENTS_STREAM, consumer_config(settings))
    await publish_selfplay(nc, 7)
    thief = await js.pull_subscribe_bind(settings.durable_name, subjects.EVENTS_STREAM)
    (stolen,) = await thief.fetch(1, timeout=5)  # never acked
    await publish_selfplay(nc, 5)
    async with running_daemon(settings):
        st = await wait_for_status(nats_server.url, lambda s: pending(s) == 12)
    assert st["states"]["hex8_2p"]["total_games"] == 12
    assert stolen.metadata.num_delivered == 1


async def test_an_invalid_event_jetstream_gave_up_delivering_is_dead_lettered(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    settings = daemon_settings(tmp_path, nats_server.url, max_deliver=1, ack_wait_seconds=1.0)
    js = nc.jetstream()
    await ensure_streams(js)
    await js.add_consumer(subjects.EVENTS_STREAM, consumer_config(settings))
    await js.publish("selfplay.complete.hex8_2p", b"{not json")
    thief = await js.pull_subscribe_bind(settings.durable_name, subjects.EVENTS_STREAM)
    await thief.fetch(1, timeout=5)  # never acked
    dead = await collect_dead_letters(nc)
    async with running_daemon(settings):
        letter = await dead.next()
        st = await wait_for_status(nats_server.url, lambda s: s["rejected_messages"] == 1)
    assert letter["reason"].startswith("malformed_json")
    assert letter["subject"] == "selfplay.complete.hex8_2p" and letter["deliveries"] == 1
    assert st["configs_tracked"] == 0


async def test_rejections_in_a_recreated_events_stream_are_each_recorded(
    tmp_path: Path, nats_server: EmbeddedServer, nc: Client
) -> None:
    # A deleted and re-created stream numbers its messages from 1 again.
    settings = daemon_settings(tmp_path, nats_server.url)
    js = nc.jetstream()
    async with running_daemon(settings):
        await js.publish("selfplay.complete.hex8_2p", b"{first")
        await wait_for_status(nats_server.url, lambda s: s["rejected_messages"] == 1)
        await js.delete_stream(subjects.EVENTS_STREAM)
        await ensure_streams(js)  # as the next publisher does
        ack = await js.publish("selfplay.complete.hex8_2p", b"{second")
        assert ack.seq == 1
        await wait_for_status(nats_server.url, lambda s: s["rejected_messages"] == 2)
        await wait_for_status(nats_server.url, lambda s: s["unpublished_events"] == 0)
    info = await js.stream_info(subjects.DEAD_LETTER_STREAM)
    assert info.state.messages == 2
