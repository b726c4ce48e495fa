"""What an agent needs from the message bus, and the in-process bus the scenario tests share.

An agent produces batches of (topic, envelope) and waits for every acknowledgement; it reads its
own inbox, one topic, from an offset, in batches; after a crash it asks for the last records of
the topics it wrote to (did its journaled envelopes land?). How far it has handled its inbox is
its own `InboxPosition` file, never the bus's: no consumer group exists.

`agents.kafka_bus.KafkaBus` is the real one (aiokafka). `MemoryBus` keeps topics as lists in this
process, shared by every agent given it, with hooks a test uses to drop, duplicate or reorder
what is produced and to fail a produce; by default it delivers every record once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Stopping(Exception):
    """The agent's `stop()` came while the bus waited for Kafka: leave the work in hand undone
    (it is journaled, or its input is not yet past the saved position)."""


@dataclass(frozen=True)
class Record:
    offset: int
    value: bytes


@dataclass(frozen=True)
class Fetched:
    """A batch of an inbox's records (maybe none) and the inbox's end offset as last seen
    (None when unknown): end minus the next offset to read is the lag."""

    records: list[Record]
    end: int | None


class Reader(Protocol):
    """One topic's records, in offset order, from where `seek` put it."""

    async def fetch(self, *, max_records: int, timeout_s: float) -> Fetched:
        """The next records, waiting at most about `timeout_s` when there are none (Stopping
        when the agent stops while the bus is away)."""

    def seek(self, offset: int) -> None:
        """The next fetch starts at `offset`."""

    async def position(self) -> int:
        """The offset the next fetch starts at."""


class Bus(Protocol):
    """What an agent needs from Kafka. One `start()`, then any number of calls, one `stop()`."""

    error: str | None  # the last failure to reach the bus, until it answers again
    reads_other_topics: bool  # may this party read the topics it writes to (`last_records`)?

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Close the clients, bounded in time (with Kafka away too)."""

    def interrupt(self) -> None:
        """The agent stops: waits for an absent bus end in Stopping."""

    async def produce(self, items: Sequence[tuple[str, bytes]], *, resend: bool = False) -> None:
        """Append every (topic, value) and return once each is acknowledged (Stopping on
        `interrupt()`). `resend`: these were produced before, by an agent that crashed."""

    async def open(self, topic: str) -> Reader:
        """A reader of `topic` (partition 0), at its first record."""

    async def end_offsets(self, topics: Sequence[str]) -> dict[str, int]:
        """Each topic's end: the offset its next record will get."""

    def last_records(self, topics: Sequence[str], last: int) -> AsyncIterator[bytes]:
        """The values of the last `last` records of each topic (up to their ends at the call)."""

    async def group_offset(self, group: str, topic: str) -> int:
        """The offset an earlier version of the agent committed for `topic` in the consumer
        group `group` (0 when none): taken once, where the state directory has no position."""


# test hooks: `deliver` decides what lands of a produced batch (and may raise: nothing lands,
# the producer gets the error); `acked` runs once it landed (and may raise: the producer gets
# the error though its records are on the bus, as in a crash between produce and ack)
Deliver = Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]
Acked = Callable[[list[tuple[str, bytes]]], None]


class MemoryBus:
    """Topics as append-only lists in this process; every agent given the same one shares them.
    Create it inside the event loop that runs the agents."""

    error: str | None = None
    reads_other_topics = True

    def __init__(self) -> None:
        self.topics: dict[str, list[bytes]] = {}
        self.changed = asyncio.Condition()  # notified after every append
        self.deliver: Deliver | None = None
        self.acked: Acked | None = None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def interrupt(self) -> None:
        pass  # nothing here waits for an absent broker

    async def produce(self, items: Sequence[tuple[str, bytes]], *, resend: bool = False) -> None:
        batch = list(items)
        landing = self.deliver(batch) if self.deliver is not None else batch
        for topic, value in landing:
            self.topics.setdefault(topic, []).append(value)
        async with self.changed:
            self.changed.notify_all()
        if self.acked is not None:
            self.acked(batch)

    async def open(self, topic: str) -> MemoryReader:
        return MemoryReader(self, topic)

    async def end_offsets(self, topics: Sequence[str]) -> dict[str, int]:
        return {t: len(self.topics.get(t, [])) for t in topics}

    async def last_records(self, topics: Sequence[str], last: int) -> AsyncIterator[bytes]:
        for t in topics:
            for value in self.topics.get(t, [])[-last:] if last else []:
                yield value

    async def group_offset(self, group: str, topic: str) -> int:
        return 0  # no version of the agent ever committed to a group here

    def records(self, topic: str) -> list[Record]:
        """Every record of `topic` so far."""
        return [Record(o, v) for o, v in enumerate(self.topics.get(topic, []))]


class MemoryReader:
    def __init__(self, bus: MemoryBus, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self.next = 0

    async def fetch(self, *, max_records: int, timeout_s: float) -> Fetched:
        log = self.bus.topics.setdefault(self.topic, [])
        if self.next >= len(log):
            async with self.bus.changed:
                try:
                    async with asyncio.timeout(timeout_s):
                        await self.bus.changed.wait_for(lambda: self.next < len(log))
                except TimeoutError:
                    pass
        records = [Record(o, log[o]) for o in range(self.next,
                                                    min(len(log), self.next + max_records))]
        self.next += len(records)
        return Fetched(records, len(log))

    def seek(self, offset: int) -> None:
        self.next = offset

    async def position(self) -> int:
        return self.next
