"""One scenario suite, two buses: every scenario runs through real `Agent`s (outbox, commit,
replay, timers) on the in-memory bus with a fake clock, and on the real Kafka broker.

On the memory bus the agents share one `MemoryBus` and one `FakeClock`: a deadline passes when
the test advances the clock, so nothing waits in real time. On Kafka each agent has its own
`KafkaBus` (its own credential) and the system clock, with a short real deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.agent import SUBMIT_MARGIN_S, Agent, Failpoint, FailpointCrash, RoundEnd
from agents.bus import Bus, MemoryBus
from agents.clock import Clock, FakeClock, SystemClock
from agents.config import PartyConfig
from agents.init import init_consortium
from agents.kafka_bus import read_to_end
from agents.kafka_client import seek_to_read
from agents.run import party_configs
from agents.security import KafkaAccess
from protocol.coordinator import CoordinatorRound
from protocol.envelope import Header, digest
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.messages import Scope
from protocol.tokens import tokenize
from tests.kafka_util import make_consortium
from tests.soak import COUNTERS, DUPLICATE_ROUNDS
from tests.test_agents_kafka import ATTRS, check, query_ids

BUSES = ["memory", pytest.param("kafka", marks=pytest.mark.kafka)]
WAIT_S = 60  # a bound on every wait for the agents (real seconds; never reached when green)


@dataclass
class World:
    """A consortium of 3 institutions and its agents, on one kind of bus."""

    kind: str
    dir: Path
    clock: Clock
    access: KafkaAccess | None  # the broker's admin (Kafka only)
    deadline_s: float  # a round's deadline: fake seconds in memory, real ones on Kafka
    bus: MemoryBus | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    ends: dict[str, dict[bytes, Outcome | Ended]] = field(default_factory=dict)

    def config(self, name: str) -> PartyConfig:
        [cfg] = [c for c in party_configs(self.dir) if c.party == name]
        return cfg

    @property
    def topics(self) -> list[str]:
        return [p.topic for p in self.config("coordinator").consortium.registry.values()]

    async def start(self, name: str, failpoint: int = 0) -> Agent:
        """A new Agent for `name` on its state dir (a restart when it ran before); returns once
        it is ready. With `failpoint`, it crashes after that many produced batches."""
        bus: Bus | None = self.bus
        agent = Agent(self.config(name), bus=bus, clock=self.clock)
        agent.failpoint = Failpoint(failpoint, in_process=True)
        ends = self.ends.setdefault(name, {})

        async def record(batch: Sequence[RoundEnd]) -> None:
            for e in batch:
                ends[e.result.round_id] = e.result

        agent.listeners.append(record)
        task = asyncio.create_task(agent.run(), name=name)
        self.agents[name], self.tasks[name] = agent, task
        ready = asyncio.create_task(agent.ready.wait())
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # raises what stopped it
        return agent

    async def start_all(self, skip: tuple[str, ...] = ()) -> None:
        for name in ("coordinator", "bank-1", "bank-2", "bank-3"):
            if name not in skip:
                await self.start(name)

    async def stop(self, name: str) -> None:
        self.agents[name].stop()
        async with asyncio.timeout(WAIT_S):
            await self.tasks.pop(name)

    async def stop_all(self) -> None:
        for name in list(self.tasks):
            await self.stop(name)

    def pass_time(self, seconds: float) -> None:
        """`seconds` pass: the fake clock jumps; on Kafka real time passes by itself."""
        if isinstance(self.clock, FakeClock):
            self.clock.advance(seconds)

    async def submit(self, ids: list[str], scope: Scope = Scope.INTERSECTION) -> (
            Outcome | Ended | None):
        b1 = self.agents["bank-1"]
        key = b1.cfg.consortium_key
        assert key is not None
        async with asyncio.timeout(WAIT_S):  # on the memory bus, a fake clock never moves
            return await b1.submit(os.urandom(16), tokenize(ids, key),
                                   participants=b1.cfg.consortium.institutions,
                                   attributes=ATTRS, scope=scope, deadline_s=self.deadline_s)

    async def ended_everywhere(self, round_id: bytes, names: Sequence[str]) -> None:
        for n in names:
            a = self.agents[n]
            await a.wait_until(lambda: round_id in self.ends[n], WAIT_S)  # noqa: B023

    async def all_records(self) -> list[bytes]:
        if self.bus is not None:
            return [v for t in self.topics for v in self.bus.topics.get(t, [])]
        assert self.access is not None
        return [r.value async for r in read_to_end(self.access, self.topics)]

    @contextlib.asynccontextmanager
    async def duplicating(self, rng: random.Random) -> AsyncIterator[Counter[str]]:
        """Every envelope delivered one to three extra times, shuffled (a misbehaving network
        or producer); yields a counter whose "copies" says how many were added."""
        copies: Counter[str] = Counter()
        if self.bus is not None:
            bus = self.bus

            def deliver(batch: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
                out = [it for it in batch for _ in range(1 + rng.randint(1, 3))]
                copies["copies"] += len(out) - len(batch)
                rng.shuffle(out)
                return out

            bus.deliver = deliver
            try:
                yield copies
            finally:
                bus.deliver = None
            return
        assert self.access is not None
        stop = asyncio.Event()
        copier = asyncio.create_task(_copy_records(self.access, self.topics, stop, rng))
        try:
            yield copies
        finally:
            stop.set()
            copies["copies"] += await copier


async def _copy_records(access: KafkaAccess, topics: list[str], stop: asyncio.Event,
                        rng: random.Random) -> int:
    """Produce every record of `topics` again one to three times, shuffled within each batch
    read, until `stop`; returns the number of copies."""
    consumer = AIOKafkaConsumer(**access.aiokafka_kwargs(), enable_auto_commit=False)
    producer = AIOKafkaProducer(**access.aiokafka_kwargs(), acks="all",
                                max_request_size=2 * 1024 * 1024)
    await consumer.start()
    await producer.start()
    copies = 0
    try:
        await seek_to_read(consumer, [TopicPartition(t, 0) for t in topics], last=0)
        seen = set()  # our own copies come back too: copy each record once
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            out = []
            for tp, recs in batch.items():
                for r in recs:
                    if r.value in seen:
                        continue
                    seen.add(r.value)
                    out += [(tp.topic, r.value)] * rng.randint(1, 3)
            rng.shuffle(out)
            for topic, value in out:
                await producer.send_and_wait(topic, value)
            copies += len(out)
    finally:
        await producer.stop()
        await consumer.stop()
    return copies


def _memory_world(tmp_path: Path) -> World:
    d = tmp_path / "consortium"
    init_consortium(d, institutions=3, customers=150, bootstrap="memory:0",
                    consortium=f"m{uuid.uuid4().hex[:10]}", insecure=True)
    return World("memory", d, FakeClock(), None, deadline_s=3600, bus=MemoryBus())


@pytest.fixture(params=BUSES)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    if request.param == "memory":
        return _memory_world(tmp_path)
    access: KafkaAccess = request.getfixturevalue("kafka_bootstrap")
    d = make_consortium(tmp_path, access, 3, customers=150)
    return World("kafka", d, SystemClock(), access, deadline_s=5)


@contextlib.asynccontextmanager
async def running(world: World, skip: tuple[str, ...] = ()) -> AsyncIterator[World]:
    try:
        await world.start_all(skip)
        yield world
    finally:
        await world.stop_all()


def _same_everywhere(world: World, round_id: bytes, names: Sequence[str]) -> Outcome:
    outs = [world.ends[n][round_id] for n in names]
    first = outs[0]
    assert isinstance(first, Outcome), first
    for o in outs[1:]:
        assert isinstance(o, Outcome), o
        assert bytes(o.tokens.tobytes()) == bytes(first.tokens.tobytes())
        assert (o.totals == first.totals).all()
    return first


BANKS = ("bank-1", "bank-2", "bank-3")


async def test_a_round_is_exact_at_every_party(world: World) -> None:
    ids = query_ids(world.dir, 60)
    async with running(world):
        for scope in Scope:
            out = await world.submit(ids, scope)
            assert isinstance(out, Outcome), out
            await world.ended_everywhere(out.round_id, BANKS)
            assert check(_same_everywhere(world, out.round_id, BANKS), ids, world.dir) > 0
        coordinator = world.agents["coordinator"].stats
        assert (coordinator.published, coordinator.aborted) == (2, 0)


async def test_duplicated_and_reordered_deliveries_change_nothing(world: World) -> None:
    ids = query_ids(world.dir, 60)
    async with running(world):
        async with world.duplicating(random.Random(5)) as copies:
            outs = await asyncio.gather(*(world.submit(ids) for _ in range(DUPLICATE_ROUNDS)))
        for o in outs:
            check(o, ids, world.dir)
        assert world.agents["coordinator"].stats.published == DUPLICATE_ROUNDS
        assert sum(a.stats.duplicates for a in world.agents.values()) > 0
        assert all(set(a.stats.rejected_by_reason) <= {"RoundClosed"}
                   for a in world.agents.values())
    assert copies["copies"] > 0
    COUNTERS["duplicates injected"] += copies["copies"]
    COUNTERS["rounds checked"] += len(outs)


async def test_a_restarted_institution_replays_and_ends_the_round_exact(world: World) -> None:
    ids = query_ids(world.dir, 60)
    async with running(world):
        check(await world.submit(ids), ids, world.dir)
        await world.stop("bank-2")
        coord = world.agents["coordinator"]
        seen = coord.stats.received
        asking = asyncio.create_task(world.submit(ids))
        # the coordinator has the request (and bank-2 its assignment, unread) while it is down
        await coord.wait_until(lambda: coord.stats.received > seen, WAIT_S)
        b2 = await world.start("bank-2")
        assert b2.stats.replayed > 0  # the first round, rebuilt quietly
        out = await asking
        assert isinstance(out, Outcome), out
        await world.ended_everywhere(out.round_id, BANKS)
        check(_same_everywhere(world, out.round_id, BANKS), ids, world.dir)
        assert b2.stats.sent > 0


async def test_a_silent_institution_times_out_by_name(world: World) -> None:
    ids = query_ids(world.dir, 60)
    async with running(world, skip=("bank-3",)):
        coord, b2 = world.agents["coordinator"], world.agents["bank-2"]
        asking = asyncio.create_task(world.submit(ids))
        # the deadline passes once the round waits for bank-3 alone: for its contribution, or
        # for its share as the leader (without which nobody else can contribute)

        def waits_for_bank_3() -> bool:
            rounds = list(coord.party.rounds.values())
            if coord.stats.aborted or not rounds:
                return bool(coord.stats.aborted)
            r = rounds[0]
            assert isinstance(r, CoordinatorRound)
            return r.leader == "bank-3" or r.missing() == ("bank-3",)

        await coord.wait_until(waits_for_bank_3, WAIT_S)
        await b2.wait_until(lambda: len(b2.timers) == 1 or b2.stats.aborted > 0, WAIT_S)
        world.pass_time(world.deadline_s + 1)  # past the coordinator's deadline, in the grace
        out = await asking
        assert isinstance(out, Ended), out
        assert out.reason is AbortReason.TIMEOUT
        assert out.culprits == ("bank-3",)
        assert "bank-3" in out.detail
        await world.ended_everywhere(out.round_id, ("bank-1", "bank-2"))
        for name in ("bank-1", "bank-2"):
            ends = list(world.ends[name].values())
            assert [e.reason for e in ends if isinstance(e, Ended)] == [AbortReason.TIMEOUT]
            assert not [e for e in ends if isinstance(e, Outcome)]
        assert (coord.stats.published, coord.stats.aborted) == (0, 1)


async def test_a_crash_between_produce_and_commit_sends_nothing_twice(world: World) -> None:
    ids = query_ids(world.dir, 60)
    async with running(world):
        check(await world.submit(ids), ids, world.dir)
        await world.stop("bank-2")
        crashing = await world.start("bank-2", failpoint=1)
        asking = asyncio.create_task(world.submit(ids))
        with pytest.raises(BaseExceptionGroup) as crashed:  # after its first batch of the round
            async with asyncio.timeout(WAIT_S):
                await world.tasks.pop("bank-2")
        assert crashed.group_contains(FailpointCrash)
        assert crashing.stats.sent > 0
        b2 = await world.start("bank-2")
        out = await asking
        assert isinstance(out, Outcome), out
        await world.ended_everywhere(out.round_id, BANKS)
        check(_same_everywhere(world, out.round_id, BANKS), ids, world.dir)
        assert b2.stats.replayed > 0
    # what bank-2 sent before the crash was never sent again, nor sealed anew
    mine = [(Header.decode(msgpack.unpackb(v)[1]), digest(v)) for v in await world.all_records()]
    mine = [(h, d) for h, d in mine if h.sender == "bank-2"]
    assert len(mine) > 0
    assert len({d for _, d in mine}) == len(mine)
    assert len({(h.recipient, h.round_id, h.kind, h.part) for h, _ in mine}) == len(mine)


async def test_a_request_the_coordinator_never_gets_ends_its_wait_past_the_deadline(
        tmp_path: Path) -> None:
    """Memory only (the wait is the deadline plus SUBMIT_MARGIN_S): a coordinator that drops
    a request without a reply leaves the requester's `submit` no answer to wait for; the
    agent's clock bounds the wait."""
    world = _memory_world(tmp_path)
    assert world.bus is not None
    coordinator = world.config("coordinator").topic
    world.bus.deliver = lambda batch: [(t, v) for t, v in batch if t != coordinator]
    sent = asyncio.Event()  # the request left bank-1 (and went nowhere)
    world.bus.acked = lambda batch: sent.set()
    async with running(world):
        asking = asyncio.create_task(world.submit(query_ids(world.dir, 10)))
        await asyncio.wait_for(sent.wait(), WAIT_S)
        world.pass_time(world.deadline_s + SUBMIT_MARGIN_S - 1)
        assert not asking.done()
        world.pass_time(2)
        out = await asking
    assert isinstance(out, Ended), out
    assert out.reason is AbortReason.TIMEOUT
    assert "no answer from the coordinator" in out.detail
