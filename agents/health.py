"""Is Kafka there? A watch that tells the operator when the agents cannot reach it.

The agents never give up on Kafka: a produce that is not acknowledged is sent again, a commit
that fails is tried again, rounds wait (their deadlines still hold). That is right, but silent
for as long as the producer's own timeout (40 s). The watch says at once, and says when it is
over: every second it opens a TCP connection to each bootstrap address, and Kafka counts as
available while a majority of them accept (with combined KRaft nodes, what a controller quorum
needs; a single broker must simply answer). Opening a connection costs no TLS handshake, no
SASL login, and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

CHECK_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 1.0


def addresses(bootstrap: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...` as (host, port) pairs (the Kafka default port when absent)."""
    out = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        out.append((host or item.strip(), int(port) if host else 9092))
    return out


async def answers(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """True when something accepts a TCP connection on host:port within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class KafkaWatch:
    """Logs `Kafka unavailable ...` (WARNING) when fewer than a majority of the bootstrap
    addresses answer, and `Kafka available again ...` (INFO) when enough answer again."""

    def __init__(self, bootstrap: str, *, log: logging.Logger | None = None,
                 interval_s: float = CHECK_INTERVAL_S) -> None:
        self.bootstrap = bootstrap
        self.nodes = addresses(bootstrap)
        self.log = log or logging.getLogger("zerosum.health")
        self.interval_s = interval_s
        self.available = True
        self.answering = len(self.nodes)
        self.outages = 0
        self._since = time.monotonic()
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()

    @property
    def quorum(self) -> int:
        return len(self.nodes) // 2 + 1

    async def check(self) -> bool:
        """One look at every address; logs and wakes waiters on a change; returns available."""
        up = await asyncio.gather(*(answers(h, p) for h, p in self.nodes))
        self.answering = sum(up)
        available = self.answering >= self.quorum
        if available != self.available:
            now = time.monotonic()
            if available:
                self.log.info("Kafka available again: %d of %d nodes at %s answer (after %.1f s "
                              "unavailable); the agents carry on", self.answering,
                              len(self.nodes), self.bootstrap, now - self._since)
            else:
                self.outages += 1
                down = [f"{h}:{p}" for (h, p), ok in zip(self.nodes, up, strict=True) if not ok]
                self.log.warning("Kafka unavailable: %d of %d nodes at %s answer (%d needed; "
                                 "down: %s); the agents wait, rounds keep their deadlines",
                                 self.answering, len(self.nodes), self.bootstrap, self.quorum,
                                 ", ".join(down))
            self.available = available
            self._since = now
            async with self._changed:
                self._changed.notify_all()
        return available

    async def run(self) -> None:
        """Check every `interval_s` until `stop()`."""
        while not self._stop.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def wait_until(self, available: bool, timeout_s: float) -> None:
        """Return once the watch has seen Kafka `available` (or not); TimeoutError after
        `timeout_s`."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.available is available)
