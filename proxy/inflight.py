"""A count of requests in flight that a stopping server can wait on."""

from __future__ import annotations

import asyncio


class InFlight:
    """Counts requests being served; `wait_idle` waits for the count to reach 0."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        # Created by wait_idle only, so the request path does no event work
        # until the server stops.
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for no request in flight; return whether none is."""
        if self.count == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
