"""The broker restarts in the middle of a stream of rounds: the agents reconnect by themselves,
and every round ends once, correct or with a typed abort; none is lost or doubled."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agents.broker import LocalBroker, free_port
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.messages import Scope
from protocol.tokens import tokenize
from tests.kafka_util import make_consortium
from tests.soak import BROKER_RESTARTS, COUNTERS
from tests.test_agents_kafka import ATTRS, check, query_ids, running

pytestmark = pytest.mark.kafka


async def test_broker_restart_mid_stream(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "broker", port=free_port(), controller_port=free_port())
    await asyncio.to_thread(broker.start)
    try:
        d = make_consortium(tmp_path, broker.access(), 3, customers=150)
        ids = query_ids(d, 60)
        results: list[Outcome | Ended | None] = []
        async with running(d) as agents:
            b1 = agents["bank-1"]
            key = b1.cfg.consortium_key
            assert key is not None
            tokens = tokenize(ids, key)
            parts = b1.cfg.consortium.institutions

            async def stream(n: int) -> list[Outcome | Ended | None]:
                return list(await asyncio.gather(*(
                    b1.submit(os.urandom(16), tokens, participants=parts, attributes=ATTRS,
                              scope=Scope.INTERSECTION, deadline_s=90) for _ in range(n))))

            for _ in range(BROKER_RESTARTS):
                in_flight = asyncio.create_task(stream(6))
                await agents["coordinator"].wait_until(
                    lambda: agents["coordinator"].stats.received > 0, 30)
                await asyncio.to_thread(broker.stop)  # mid-stream
                await asyncio.to_thread(broker.start)
                COUNTERS["broker restarts"] += 1
                results += await in_flight
                results += await stream(3)  # and rounds after it, on the reconnected agents
            published = agents["coordinator"].stats.published
            aborted = agents["coordinator"].stats.aborted
        ok = [r for r in results if isinstance(r, Outcome)]
        for r in results:
            if isinstance(r, Outcome):
                check(r, ids, d)
            else:
                assert isinstance(r, Ended), r
                assert r.reason is AbortReason.TIMEOUT
        assert len({r.round_id for r in results if r is not None}) == len(results)
        assert published == len(ok)  # none published twice
        assert published + aborted == len(results)
        assert ok, "no round got through the restarts"
        COUNTERS["rounds checked"] += len(results)
        COUNTERS["rounds aborted (typed)"] += len(results) - len(ok)
    finally:
        await asyncio.to_thread(broker.stop)
