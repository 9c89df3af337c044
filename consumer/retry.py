"""Retry: an exponential, bounded pause between attempts at something that failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("autoexport")

RETRY_MAX_S = 30.0


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
