"""Operator requests over NATS, as a ``micro`` service: status, export-now, pause, resume.

``nats micro list/info/stats`` show it; ``autoexport status`` and ``export-now`` call it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from schemas import subjects

if TYPE_CHECKING:
    from consumer.daemon import Scheduler
    from consumer.store import Store

VERSION = "0.1.0"


class ConfigRequest(msgspec.Struct, frozen=True):
    config: str


_config_request = msgspec.json.Decoder(ConfigRequest)


def _parse_config(data: bytes) -> str:
    """The config named in a request, validated; raises ValueError with the reason."""
    try:
        config = _config_request.decode(data).config
    except msgspec.DecodeError as exc:
        raise ValueError(f'expected {{"config": "<board>_<n>p"}}: {exc}') from None
    subjects.parse_config_key(config)
    return config


async def _config_or_refuse(req: Request) -> str | None:
    """The request's config, or None after answering with a 400 saying why."""
    try:
        return _parse_config(req.data)
    except ValueError as exc:
        await req.respond_error("400", str(exc))
        return None


async def start(nc: Client, store: Store, scheduler: Scheduler) -> Service:
    async def status(req: Request) -> None:
        body: dict[str, Any] = await store.status()
        body["running_exports"] = scheduler.running
        for config, hold in scheduler.holds.items():
            if config in body["states"]:
                body["states"][config]["held"] = hold.reason
        await req.respond(msgspec.json.encode(body))

    async def export_now(req: Request) -> None:
        if (config := await _config_or_refuse(req)) is None:
            return
        board_type, num_players = subjects.parse_config_key(config)
        await store.request_export(config, board_type, num_players, time.time())
        scheduler.kick()
        await req.respond(msgspec.json.encode({"ok": True, "config": config, "requested": True}))

    def pauser(paused: bool):
        async def handler(req: Request) -> None:
            if (config := await _config_or_refuse(req)) is None:
                return
            if not await store.set_paused(config, paused, time.time()):
                await req.respond_error("404", f"config {config} is not tracked")
                return
            scheduler.kick()
            await req.respond(msgspec.json.encode({"ok": True, "config": config, "paused": paused}))

        return handler

    service = await add_service(
        nc,
        ServiceConfig(
            name=subjects.SERVICE_NAME,
            version=VERSION,
            description="autoexport: selfplay events to NPZ datasets",
        ),
    )
    for name, subject, handler in (
        ("status", subjects.STATUS_SUBJECT, status),
        ("export-now", subjects.EXPORT_NOW_SUBJECT, export_now),
        ("pause", subjects.PAUSE_SUBJECT, pauser(True)),
        ("resume", subjects.RESUME_SUBJECT, pauser(False)),
    ):
        await service.add_endpoint(EndpointConfig(name=name, subject=subject, handler=handler))
    return service
