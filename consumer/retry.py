"""Waiting that a stop cuts short: the pause between attempts at something that failed
(exponential, bounded), and any work that must not outlive a stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

log = logging.getLogger("autoexport")

RETRY_MAX_S = 30.0
T = TypeVar("T")


class Retry:
    """Exponential pause between attempts at something that failed (bounded, resettable)."""

    def __init__(self, first_s: float = 0.5, max_s: float = RETRY_MAX_S) -> None:
        self.first_s, self.max_s, self.next_s = first_s, max_s, first_s

    def reset(self) -> None:
        self.next_s = self.first_s

    async def pause(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.next_s)
        self.next_s = min(self.max_s, self.next_s * 2)


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """The result of ``work``; None, with ``work`` cancelled, if ``stop`` is set first."""
    working, stopping = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((working, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        stopped = not working.done()
        if stopped:
            working.cancel()
    return None if stopped else working.result()
