"""The delivery guarantees zerosum relies on, exercised through the real broker with aiokafka."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.security import KafkaAccess
from tests.kafka_util import new_topic, produce, take

pytestmark = pytest.mark.kafka

async def test_idempotent_producer_with_acks_all_appends_in_order(
        kafka_bootstrap: KafkaAccess) -> None:
    topic = await new_topic(kafka_bootstrap)
    values = [f"v{i}".encode() for i in range(20)]
    offsets = await produce(kafka_bootstrap, topic, values)
    assert offsets == list(range(20))
    consumer = AIOKafkaConsumer(topic, **kafka_bootstrap.aiokafka_kwargs(),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        assert await take(consumer, 20) == values
    finally:
        await consumer.stop()


async def test_group_with_manual_commit_resumes_where_it_committed(
        kafka_bootstrap: KafkaAccess) -> None:
    topic = await new_topic(kafka_bootstrap)
    values = [f"m{i}".encode() for i in range(10)]
    await produce(kafka_bootstrap, topic, values)
    group = f"g-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(topic, 0)

    first = AIOKafkaConsumer(topic, **kafka_bootstrap.aiokafka_kwargs(), group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    await first.start()
    try:
        got = await take(first, 6)
        assert got == values[:6]
        await first.commit({tp: 4})  # only the first four are "done"
    finally:
        await first.stop()

    second = AIOKafkaConsumer(topic, **kafka_bootstrap.aiokafka_kwargs(), group_id=group,
                              auto_offset_reset="earliest", enable_auto_commit=False)
    await second.start()
    try:
        assert await take(second, 6) == values[4:]
        assert await second.committed(tp) == 4
    finally:
        await second.stop()


async def test_replay_from_the_beginning_with_seek_to_beginning(
        kafka_bootstrap: KafkaAccess) -> None:
    topic = await new_topic(kafka_bootstrap)
    values = [f"r{i}".encode() for i in range(5)]
    await produce(kafka_bootstrap, topic, values)
    consumer = AIOKafkaConsumer(**kafka_bootstrap.aiokafka_kwargs(), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        assert await consumer.position(tp) == 5
        await consumer.seek_to_beginning(tp)
        assert await take(consumer, 5) == values
        await consumer.seek_to_beginning(tp)
        assert await take(consumer, 5) == values
    finally:
        await consumer.stop()
