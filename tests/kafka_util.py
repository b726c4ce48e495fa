"""Small aiokafka helpers shared by the broker tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents.config import load_consortium
from agents.init import init_consortium
from agents.kafka_admin import provision
from agents.security import KafkaAccess, as_access, read_credentials

WAIT_MS = 20_000


def make_consortium(tmp: Path, kafka: KafkaAccess, n: int, customers: int = 300, *,
                    admin_step: bool = True, **init: Any) -> Path:
    """`zerosum init` into tmp/consortium, trusting the broker's CA, then (secured broker,
    unless not `admin_step`) the admin step: topics, SCRAM users, ACLs."""
    d = tmp / "consortium"
    init_consortium(d, institutions=n, customers=customers, bootstrap=kafka.bootstrap,
                    consortium=f"t{uuid.uuid4().hex[:10]}", ca=kafka.cafile,
                    insecure=not kafka.secure, **init)
    if kafka.secure and admin_step:
        provision(kafka, load_consortium(d / "consortium.toml"))
    return d


def party_access(d: Path, kafka: KafkaAccess, party: str) -> KafkaAccess:
    """The broker as `party` (or "auditor") of the consortium in `d` sees it."""
    user, password = read_credentials(d / "keys" / f"{party}.kafka")
    return kafka.as_user(user, password)


async def new_topic(bootstrap: str | KafkaAccess, name: str | None = None) -> str:
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(**as_access(bootstrap).aiokafka_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    return name


async def produce(bootstrap: str | KafkaAccess, topic: str, values: list[bytes],
                  keys: Sequence[bytes | None] | None = None) -> list[int]:
    """Append with an idempotent acks=all producer (with `keys`, one a value); return the
    offsets."""
    producer = AIOKafkaProducer(**as_access(bootstrap).aiokafka_kwargs(),
                                enable_idempotence=True, acks="all",
                                max_request_size=2 * 1024 * 1024)
    try:
        await producer.start()
        return [(await producer.send_and_wait(topic, v, key=k)).offset
                for v, k in zip(values, keys or [None] * len(values), strict=True)]
    finally:
        await producer.stop()


async def take(consumer: AIOKafkaConsumer, n: int) -> list[bytes]:
    """Exactly n records' values, waiting on the fetch itself (bounded), never on a sleep."""
    return [r.value for r in await take_records(consumer, n)]


async def take_records(consumer: AIOKafkaConsumer, n: int) -> list[ConsumerRecord[Any, Any]]:
    """Exactly n records, waiting on the fetch itself (bounded), never on a sleep."""
    out: list[ConsumerRecord[Any, Any]] = []
    while len(out) < n:
        batch = await consumer.getmany(timeout_ms=WAIT_MS, max_records=n - len(out))
        if not batch:
            raise AssertionError(f"only {len(out)} of {n} records arrived within {WAIT_MS} ms")
        for records in batch.values():
            out += records
    return out
