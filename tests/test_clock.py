"""The fake clock: time moves only when the test says, and wakes the sleepers whose time came."""

from __future__ import annotations

import asyncio

import pytest

from agents.clock import FakeClock, SystemClock


async def test_sleepers_wake_in_time_order_only_when_the_clock_reaches_them() -> None:
    clock = FakeClock(start=100.0)
    woke: list[str] = []
    asleep = asyncio.Semaphore(0)

    async def sleeper(name: str, t: float) -> None:
        asleep.release()  # sleep_until registers before its first await: in this same step
        await clock.sleep_until(t)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(n, t)) for n, t in (("c", 130), ("a", 110),
                                                             ("b", 120))]
    for _ in tasks:
        await asyncio.wait_for(asleep.acquire(), 1)
    assert clock.sleepers == 3
    assert woke == []  # the clock has not moved: nobody wakes
    clock.advance(15)
    await asyncio.wait_for(tasks[1], 1)
    assert woke == ["a"]
    clock.jump_to(130)
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert woke == ["a", "b", "c"]
    assert clock.now() == 130
    with pytest.raises(ValueError, match="back"):
        clock.jump_to(129)


async def test_a_past_time_returns_at_once_and_a_cancelled_sleeper_is_dropped() -> None:
    clock = FakeClock(start=5.0)
    await asyncio.wait_for(clock.sleep_until(5.0), 1)
    asleep = asyncio.Event()

    async def sleeper() -> None:
        asleep.set()
        await clock.sleep_until(10.0)

    waiting = asyncio.create_task(sleeper())
    await asyncio.wait_for(asleep.wait(), 1)
    assert clock.sleepers == 1
    waiting.cancel()
    clock.advance(10)  # no error for the cancelled one
    assert clock.sleepers == 0
    await asyncio.wait_for(SystemClock().sleep_until(0.0), 1)
