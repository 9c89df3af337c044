"""The pull consumer against a real nats-server: batches, the wait for new messages,
heartbeats, a stalled server, and a deleted consumer."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from consumer.embedded import EmbeddedServer
from consumer.pull import PullConsumer, PullError, PullStalled

STREAM, DURABLE = "PULLTEST", "reader"


@pytest.fixture
async def stream(nc: Client) -> AsyncIterator[None]:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["pt.>"]))
    await js.add_consumer(
        STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT)
    )
    yield


async def publish(nc: Client, count: int, start: int = 0) -> None:
    js = nc.jetstream()
    for i in range(start, start + count):
        await js.publish(f"pt.{i}", str(i).encode())


def payloads(msgs: list) -> list[int]:
    return [int(m.data) for m in msgs]


async def test_fetch_takes_what_is_pending_in_batches_and_nothing_when_empty(
    nc: Client, stream: None
) -> None:
    await publish(nc, 25)
    pull = PullConsumer(nc, STREAM, DURABLE)
    first, second, third = await pull.fetch(10), await pull.fetch(10), await pull.fetch(10)
    assert (payloads(first), payloads(second)) == (list(range(10)), list(range(10, 20)))
    assert payloads(third) == list(range(20, 25))
    for msg in first + second + third:
        await msg.ack()
    assert await pull.fetch(10) == []
    await pull.close()


async def test_wait_returns_at_the_first_new_message_and_leaves_no_request_open(
    nc: Client, stream: None
) -> None:
    js = nc.jetstream()
    pull = PullConsumer(nc, STREAM, DURABLE, expires_s=30.0, heartbeat_s=5.0)
    waiting = asyncio.create_task(pull.wait())
    while (await js.consumer_info(STREAM, DURABLE)).num_waiting == 0:
        await asyncio.sleep(0.01)  # the request is open on the server before anything exists
    assert not waiting.done()
    await publish(nc, 1)
    assert payloads(await asyncio.wait_for(waiting, 5)) == [0]
    # The request ended with its message: a trickle of messages never piles up requests.
    assert (await js.consumer_info(STREAM, DURABLE)).num_waiting == 0
    await publish(nc, 9, start=1)
    assert payloads(await pull.fetch(100)) == list(range(1, 10))
    await pull.close()


async def test_heartbeats_keep_an_idle_wait_alive_until_it_expires(
    nc: Client, stream: None
) -> None:
    # Without heartbeats, 1 s of silence is more than the 0.4 s stall limit.
    pull = PullConsumer(nc, STREAM, DURABLE, expires_s=1.0, heartbeat_s=0.2)
    assert await pull.wait() == []
    await pull.close()


async def test_a_silent_server_is_reported_as_stalled(
    nats_server: EmbeddedServer, nc: Client, stream: None
) -> None:
    pull = PullConsumer(nc, STREAM, DURABLE, expires_s=10.0, heartbeat_s=0.2)
    await pull.start()
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(PullStalled, match="no reply to a pull request"):
            await pull.wait()
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    await pull.close()


async def test_a_deleted_consumer_is_an_error_not_an_empty_batch(nc: Client, stream: None) -> None:
    await nc.jetstream().delete_consumer(STREAM, DURABLE)
    pull = PullConsumer(nc, STREAM, DURABLE)
    with pytest.raises(PullError) as info:
        await pull.fetch(10)
    assert info.value.code == 503  # no responders: nothing serves that consumer's requests
    assert str(info.value) == "pull answered 503 No Responders"
    await pull.close()


async def test_a_stream_message_with_a_status_header_is_a_message(nc: Client, stream: None) -> None:
    await nc.jetstream().publish("pt.x", b"7", headers={"Status": "408"})
    pull = PullConsumer(nc, STREAM, DURABLE)
    assert payloads(await pull.fetch(10)) == [7]
    await pull.close()


async def test_a_consumer_at_max_ack_pending_is_not_taken_for_a_dead_server(
    nc: Client, stream: None
) -> None:
    js = nc.jetstream()
    config = ConsumerConfig(durable_name="tight", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=2)
    await js.add_consumer(STREAM, config)
    await publish(nc, 5)
    pull = PullConsumer(nc, STREAM, "tight", expires_s=1.0, heartbeat_s=0.2)
    first = await pull.fetch(10)  # the server sends 2, then says nothing
    assert payloads(first) == [0, 1]
    assert await pull.fetch(10) == []
    assert await pull.wait() == []  # heartbeats while blocked, then it expires
    for msg in first:
        await msg.ack()
    got: list = []
    while len(got) < 3:
        batch = await pull.fetch(10) or await pull.wait()
        for msg in batch:
            await msg.ack()
        got += batch
    assert payloads(got) == [2, 3, 4]
    await pull.close()
