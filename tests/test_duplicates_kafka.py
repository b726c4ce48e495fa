"""Every envelope on the bus delivered one to three extra times, the copies shuffled within each
batch (a misbehaving network or producer): totals unchanged, each round published once."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents.kafka_client import seek_to_read
from agents.security import KafkaAccess
from protocol.machine import Outcome
from protocol.messages import Scope
from protocol.tokens import tokenize
from tests.kafka_util import make_consortium
from tests.soak import COUNTERS, DUPLICATE_ROUNDS
from tests.test_agents_kafka import ATTRS, check, query_ids, running

pytestmark = pytest.mark.kafka


async def _duplicate(bootstrap: KafkaAccess, topics: list[str], stop: asyncio.Event,
                     rng: random.Random) -> int:
    consumer = AIOKafkaConsumer(**bootstrap.aiokafka_kwargs(), enable_auto_commit=False)
    producer = AIOKafkaProducer(**bootstrap.aiokafka_kwargs(), acks="all",
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


async def test_duplicated_and_shuffled_deliveries_change_nothing(kafka_bootstrap: KafkaAccess,
                                                                 tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=150)
    ids = query_ids(d, 60)
    async with running(d) as agents:
        b1 = agents["bank-1"]
        key = b1.cfg.consortium_key
        assert key is not None
        topics = [p.topic for p in b1.cfg.consortium.registry.values()]
        stop = asyncio.Event()
        dup = asyncio.create_task(_duplicate(kafka_bootstrap, topics, stop, random.Random(5)))
        outs = await asyncio.gather(*(
            b1.submit(os.urandom(16), tokenize(ids, key), participants=b1.cfg.consortium
                      .institutions, attributes=ATTRS, scope=Scope.INTERSECTION, deadline_s=60)
            for _ in range(DUPLICATE_ROUNDS)))
        stop.set()
        copies = await dup
        for o in outs:
            assert isinstance(o, Outcome), o
            check(o, ids, d)
        coord = agents["coordinator"].stats
        assert coord.published == DUPLICATE_ROUNDS
        dropped = sum(a.stats.duplicates for a in agents.values())
        assert dropped > 0
        assert all(set(a.stats.rejected_by_reason) <= {"RoundClosed"} for a in agents.values())
    COUNTERS["duplicates injected"] += copies
    COUNTERS["rounds checked"] += len(outs)
