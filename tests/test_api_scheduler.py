"""`RoundScheduler`: the bound on rounds in flight, FIFO, and a cancelled waiter loses no slot.
No Kafka, no sleeping: the fake's gate and `entered` queue say when a round runs."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from agents.api import RoundRequest, RoundScheduler
from protocol.messages import Scope
from tests.api_fake import FakeRoundService
from tests.test_api import BANKS, CUSTOMERS, holdings, policy

WAIT_S = 20.0
REQUEST = RoundRequest(tuple(CUSTOMERS[:3]), Scope.QUERY, ("debt",), 1, BANKS)


def rid(i: int) -> bytes:
    return i.to_bytes(16, "big")


async def test_rounds_start_first_come_first_served_within_the_bound() -> None:
    gate = asyncio.Event()
    service = FakeRoundService(policy(), holdings(), gate=gate)
    scheduler = RoundScheduler(service, 3)
    started: list[int] = []
    runs = [asyncio.create_task(scheduler.run(rid(i), REQUEST,
                                              on_start=functools.partial(started.append, i)))
            for i in range(20)]
    async with asyncio.timeout(WAIT_S):
        assert [await service.entered.get() for _ in range(3)] == [rid(0), rid(1), rid(2)]
        assert (scheduler.in_flight, scheduler.waiting) == (3, 17)
        gate.set()
        done = await asyncio.gather(*runs)
    assert [d.round_id for d in done] == [rid(i) for i in range(20)]
    assert started == list(range(20))
    assert service.peak == scheduler.peak_in_flight == 3
    assert (scheduler.in_flight, scheduler.waiting, scheduler.submitted) == (0, 0, 20)


async def test_a_cancelled_waiter_never_starts_and_loses_no_slot() -> None:
    gate = asyncio.Event()
    service = FakeRoundService(policy(), holdings(), gate=gate)
    scheduler = RoundScheduler(service, 1)
    first = asyncio.create_task(scheduler.run(rid(0), REQUEST))
    async with asyncio.timeout(WAIT_S):
        await service.entered.get()
    waiting = [asyncio.create_task(scheduler.run(rid(i), REQUEST)) for i in (1, 2, 3)]
    for _ in range(3):
        await asyncio.sleep(0)  # let each reach its place in the queue
    assert scheduler.waiting == 3
    waiting[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    gate.set()
    async with asyncio.timeout(WAIT_S):
        await first
        await asyncio.gather(waiting[1], waiting[2])
    assert service.submitted == 3
    assert (scheduler.in_flight, scheduler.waiting) == (0, 0)


async def test_a_slot_handed_to_a_waiter_cancelled_before_it_runs_goes_on() -> None:
    gate = asyncio.Event()
    service = FakeRoundService(policy(), holdings(), gate=gate)
    scheduler = RoundScheduler(service, 1)
    handed: asyncio.Task[Any] | None = None

    async def first_then_cancel() -> None:
        await scheduler.run(rid(0), REQUEST)
        # in the same step as the release that handed `handed` the slot: it has not resumed
        assert handed is not None
        assert scheduler.in_flight == 1
        handed.cancel()

    first = asyncio.create_task(first_then_cancel())
    async with asyncio.timeout(WAIT_S):
        await service.entered.get()
    handed = asyncio.create_task(scheduler.run(rid(1), REQUEST))
    last = asyncio.create_task(scheduler.run(rid(2), REQUEST))
    for _ in range(3):
        await asyncio.sleep(0)
    assert scheduler.waiting == 2
    gate.set()
    async with asyncio.timeout(WAIT_S):
        await first
        with pytest.raises(asyncio.CancelledError):
            await handed
        assert (await last).round_id == rid(2)
    assert service.submitted == 2
    assert (scheduler.in_flight, scheduler.waiting) == (0, 0)


def test_the_bound_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RoundScheduler(FakeRoundService(policy(), holdings()), 0)
