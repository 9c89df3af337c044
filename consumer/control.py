"""Operator requests over NATS, as a ``micro`` service: status, export-now, pause, resume.

``nats micro list/info/stats`` show it; ``autoexport status`` and ``export-now`` call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from schemas import subjects

if TYPE_CHECKING:
    from consumer.scheduler import Scheduler
    from consumer.store import Store

VERSION = "0.1.0"

log = logging.getLogger("autoexport")


class ConfigRequest(msgspec.Struct, frozen=True):
    config: str


_config_request = msgspec.json.Decoder(ConfigRequest)


def _parse_config(data: bytes) -> str:
    """The config named in a request, validated. Raising ServiceError lets the micro
    library answer with the reason and count the error in ``nats micro stats``."""
    try:
        config = _config_request.decode(data).config
        subjects.parse_config_key(config)
    except msgspec.DecodeError as exc:
        raise ServiceError("400", f'expected {{"config": "<board>_<n>p"}}: {exc}') from None
    except subjects.InvalidConfigKey as exc:
        raise ServiceError("400", str(exc)) from None
    return config


PEER_WAIT_S = 0.5


async def daemons_consuming(nc: Client, durable: str) -> list[dict[str, str]]:
    """The metadata of running autoexport daemons that consume ``durable`` on this server:
    two of them would split the events between them, each counting half."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(f"$SRV.INFO.{subjects.SERVICE_NAME}", b"", reply=inbox)
        peers = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PEER_WAIT_S):
                async for msg in sub.messages:
                    if not msg.data:  # the server's "no responders": nobody else runs
                        break
                    with contextlib.suppress(msgspec.DecodeError, AttributeError):
                        metadata = msgspec.json.decode(msg.data).get("metadata") or {}
                        if metadata.get("durable") == durable:
                            peers.append(metadata)
        return peers
    finally:
        await sub.unsubscribe()


def _interest(item: tuple[str, dict[str, Any]]) -> tuple[bool, bool, bool, int, str]:
    config, st = item
    return (
        not st["in_progress"],
        not st["failures"],
        not st["paused"],
        -st["games_pending"],
        config,
    )


def _fit(body: dict[str, Any], max_payload: int) -> bytes:
    """The status as one NATS message: with thousands of configs it would exceed the
    server's max_payload, so the configs that matter most (exporting, failing, paused, most
    pending) are kept and the rest only counted in ``states_omitted``."""
    encoded = msgspec.json.encode(body)
    if len(encoded) <= max_payload:
        return encoded
    states, kept = body["states"], {}
    budget = max_payload - len(msgspec.json.encode({**body, "states": {}})) - 64
    for config, st in sorted(states.items(), key=_interest):
        budget -= len(config) + len(msgspec.json.encode(st)) + 4
        if budget < 0:
            break
        kept[config] = st
    return msgspec.json.encode({**body, "states": kept, "states_omitted": len(states) - len(kept)})


async def start(
    nc: Client, store: Store, scheduler: Scheduler, metadata: dict[str, str]
) -> Service:
    async def status(req: Request) -> None:
        body: dict[str, Any] = await store.status()
        body["running_exports"] = scheduler.running
        body["daemon"] = metadata  # which daemon answered: durable, data dir, host, pid
        for config, hold in scheduler.explain(await store.config_states()).items():
            if config in body["states"]:
                body["states"][config]["held"] = hold.reason
        await req.respond(_fit(body, nc.max_payload))

    async def export_now(req: Request) -> None:
        config = _parse_config(req.data)
        board_type, num_players = subjects.parse_config_key(config)
        await store.request_export(config, board_type, num_players, time.time())
        log.info("%s: export requested by an operator", config)
        scheduler.kick()
        await req.respond(msgspec.json.encode({"ok": True, "config": config, "requested": True}))

    def pauser(paused: bool):
        async def handler(req: Request) -> None:
            config = _parse_config(req.data)
            if not await store.set_paused(config, paused, time.time()):
                raise ServiceError("404", f"config {config} is not tracked")
            log.info("%s: %s by an operator", config, "paused" if paused else "resumed")
            scheduler.kick()
            await req.respond(msgspec.json.encode({"ok": True, "config": config, "paused": paused}))

        return handler

    service = await add_service(
        nc,
        ServiceConfig(
            name=subjects.SERVICE_NAME,
            version=VERSION,
            description="autoexport: selfplay events to NPZ datasets",
            metadata=metadata,
        ),
    )
    durable = metadata["durable"]
    for name, handler in (
        ("status", status),
        ("export-now", export_now),
        ("pause", pauser(True)),
        ("resume", pauser(False)),
    ):
        subject = subjects.control_subject(name, durable)
        await service.add_endpoint(EndpointConfig(name=name, subject=subject, handler=handler))
    return service
