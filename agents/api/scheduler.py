"""One bound on the rounds an institution asks for, shared by every door they come in by.

The local API and the application bus both hand their rounds to one `RoundScheduler`, so at
most `max_in_flight` (the consortium policy's figure) run at once in the agent whichever door
they came by. The others wait in FIFO order, each on a future of its own that the round before
it hands its slot to as it ends: no polling, and no slot lost to a waiter that was cancelled.
How many wait is bounded by each door (the API's `max_pending` per connection, the bus's
`max_pending`), not here: a door that cannot queue more stops reading its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from agents.api.service import Delivery, RoundRequest, RoundService


class RoundScheduler:
    """Run `service.submit` with at most `max_in_flight` rounds at once, first come first
    served. Every method is called from the agent's event loop."""

    def __init__(self, service: RoundService, max_in_flight: int = 32) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight is at least 1")
        self.service = service
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # slots held: rounds in `submit`
        self.peak_in_flight = 0
        self.submitted = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Rounds waiting for a slot."""
        return len(self._waiters)

    async def run(self, round_id: bytes, request: RoundRequest, *,
                  on_start: Callable[[], None] | None = None) -> Delivery:
        """Wait for a slot (FIFO), then run the round to its end and return it: what
        `RoundService.submit` returns or raises. `on_start` is called once the slot is
        held, just before `submit`: from then on the round is the agent's (the bus commits
        its request then). Cancelled while waiting, the round never starts."""
        await self._acquire()
        try:
            self.submitted += 1
            if on_start is not None:
                on_start()
            return await self.service.submit(round_id, request)
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.in_flight < self.max_in_flight and not self.waiting:
            self._take()
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn  # `_release` counts the slot as ours before it wakes us
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot, then cancelled before taking it up
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(turn)
            raise

    def _take(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        self.in_flight -= 1
        while self._waiters:  # a cancelled waiter removes itself; skip one not yet gone
            turn = self._waiters.popleft()
            if not turn.done():
                self._take()
                turn.set_result(None)
                return

    def status(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "waiting": self.waiting,
                "peak_in_flight": self.peak_in_flight, "max_in_flight": self.max_in_flight,
                "submitted": self.submitted}
