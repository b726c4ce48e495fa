"""Small aiokafka helpers shared by the broker tests."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

WAIT_MS = 20_000


async def new_topic(bootstrap: str, name: str | None = None) -> str:
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    return name


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> list[int]:
    """Append with an idempotent acks=all producer; return the offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                                max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        return [(await producer.send_and_wait(topic, v)).offset for v in values]
    finally:
        await producer.stop()


async def take(consumer: AIOKafkaConsumer, n: int) -> list[bytes]:
    """Exactly n records, waiting on the fetch itself (bounded), never on a sleep."""
    out: list[bytes] = []
    while len(out) < n:
        batch = await consumer.getmany(timeout_ms=WAIT_MS, max_records=n - len(out))
        if not batch:
            raise AssertionError(f"only {len(out)} of {n} records arrived within {WAIT_MS} ms")
        for records in batch.values():
            out += [r.value for r in records]
    return out
