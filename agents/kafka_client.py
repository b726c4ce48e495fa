"""What an agent does about topics before it runs, plaintext or secured; where a reader of
topics starts; and how loud the Kafka client's own log is.

On a plaintext broker (`--insecure`) an agent creates the inbox topics it lacks, as before. On a
secured one it may not (no CREATE): the admin step (`zerosum broker acl`) created them, and the
agent only checks that they are there and that it may see them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from agents.security import KafkaAccess

if TYPE_CHECKING:  # aiokafka itself is imported where a client is made: --help stays fast
    from aiokafka import AIOKafkaConsumer, TopicPartition

AIOKAFKA_LOG = logging.getLogger("aiokafka")


def quiet_aiokafka(level: int = logging.WARNING) -> None:
    """Let aiokafka log only from `level` up: its retries and reconnects are its own business,
    and a fresh broker makes it log errors it then recovers from."""
    AIOKAFKA_LOG.setLevel(level)


@contextlib.contextmanager
def aiokafka_silenced() -> Iterator[None]:
    """aiokafka logs nothing below CRITICAL inside the block (a probe that may fail); its level
    is restored after."""
    level = AIOKAFKA_LOG.level
    AIOKAFKA_LOG.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        AIOKAFKA_LOG.setLevel(level)


class TopicsMissing(Exception):
    """A secured party cannot see topics it needs: the admin step has not run for it."""


async def check_topics(access: KafkaAccess, topics: list[str]) -> None:
    """TopicsMissing unless every topic exists and this principal may describe it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**access.aiokafka_kwargs())
    await admin.start()
    try:
        visible = set(await admin.list_topics())
    finally:
        await admin.close()
    missing = [t for t in topics if t not in visible]
    if missing:
        raise TopicsMissing(
            f"{access.username} cannot see {', '.join(missing)} on {access.bootstrap}: the "
            "consortium's admin creates the topics, users and ACLs "
            "(`zerosum broker acl --config consortium.toml`)")


async def prepare_topics(access: KafkaAccess, topics: list[str]) -> None:
    """Plaintext: create the missing topics. Secured: check that the admin did."""
    if access.secure:
        await check_topics(access, topics)
        return
    from agents.kafka_bus import ensure_topics  # that module imports this one

    await ensure_topics(access, topics)


async def seek_to_read(consumer: AIOKafkaConsumer, tps: list[TopicPartition], *,
                       last: int | None = None,
                       since_ms: int | None = None) -> dict[TopicPartition, int]:
    """Assign `tps` to `consumer` and place it on each: at its first record; or, with `last`,
    that many records before its end (0: at the end); or, with `since_ms` (ms since the
    epoch), at its first record written then or later (at the end if none was).

    Returns each partition's end offset at the time of the call: a reader that stops there
    has read "to the end" without waiting for what comes later."""
    consumer.assign(tps)
    ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
    if since_ms is not None:
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            o = found.get(tp)
            consumer.seek(tp, o.offset if o is not None else ends[tp])
        return ends
    # explicit offsets: a pending seek_to_beginning is lost to the reset policy
    starts = await consumer.beginning_offsets(tps)
    for tp in tps:
        consumer.seek(tp, starts[tp] if last is None else max(ends[tp] - last, starts[tp]))
    return ends
