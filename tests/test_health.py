"""The Kafka watch: available while a majority of the bootstrap addresses accept connections."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agents.broker import free_port
from agents.health import KafkaWatch, addresses


def test_bootstrap_lists_are_parsed() -> None:
    assert addresses("127.0.0.1:1,kafka-2:9094, h") == [("127.0.0.1", 1), ("kafka-2", 9094),
                                                         ("h", 9092)]


async def test_unavailable_below_a_majority_and_back(caplog: pytest.LogCaptureFixture) -> None:
    ports = [free_port() for _ in range(3)]
    servers = [await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", p)
               for p in ports]
    watch = KafkaWatch(",".join(f"127.0.0.1:{p}" for p in ports), interval_s=0.05)
    task = asyncio.create_task(watch.run())
    caplog.set_level(logging.INFO, "zerosum.health")
    try:
        assert await watch.check()
        servers[0].close()  # one of three away: still a majority
        await servers[0].wait_closed()
        assert await watch.check()
        servers[1].close()
        await servers[1].wait_closed()
        await watch.wait_until(False, 10)
        assert watch.answering == 1
        assert "Kafka unavailable: 1 of 3 nodes" in caplog.text
        servers[1] = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", ports[1])
        await watch.wait_until(True, 10)
        assert "Kafka available again: 2 of 3 nodes" in caplog.text
        assert watch.outages == 1
    finally:
        watch.stop()
        await task
        for s in servers:
            s.close()
