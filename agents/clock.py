"""The agents' time: read it (`now()`, seconds since the epoch) and wait for it
(`sleep_until(t)`). Round deadlines are epoch times carried in the messages, so every party must
read the same kind of clock; tests give the agents a `FakeClock` that moves only when told, so a
30-second deadline passes in no real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""

    async def sleep_until(self, t: float) -> None:
        """Return once `now() >= t` (at once when it already is)."""


class SystemClock:
    """The machine's wall clock."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, t: float) -> None:
        # a wall clock set back while this sleeps makes it return early: callers read `now()`
        # again when it returns
        await asyncio.sleep(max(t - time.time(), 0.0))


class FakeClock:
    """Time that moves only when a test calls `advance` or `jump_to`; sleepers whose time has
    come are woken then. Nothing waits in real time."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()  # ties: first come, first woken

    def now(self) -> float:
        return self._now

    async def sleep_until(self, t: float) -> None:
        if t <= self._now:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (t, next(self._order), fut))
        await fut

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.jump_to(self._now + seconds)

    def jump_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError("a clock does not go back")
        self._now = t
        while self._sleepers and self._sleepers[0][0] <= t:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():  # a cancelled sleeper is simply dropped
                fut.set_result(None)

    @property
    def sleepers(self) -> int:
        """How many waits are pending (cancelled ones included until their time comes)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())
