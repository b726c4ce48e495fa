"""Helpers for the tests on the local three-node cluster: who leads a partition, who is in sync,
and waiting (on metadata answers, bounded) until the cluster is whole again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiokafka.admin import AIOKafkaAdminClient

from agents.cluster import LocalCluster
from agents.kafka_client import aiokafka_silenced
from agents.security import KafkaAccess

WAIT_S = 90.0
POLL_S = 0.2  # between two metadata requests while a cluster changes
T = TypeVar("T")


@dataclass(frozen=True)
class PartitionState:
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


async def partition_state(access: KafkaAccess, topic: str) -> PartitionState:
    """Leader, replicas and in-sync replicas of partition 0 of `topic`, from the cluster."""
    with aiokafka_silenced():
        admin = AIOKafkaAdminClient(**access.aiokafka_kwargs(), request_timeout_ms=5000)
        try:
            await admin.start()
            [desc] = await admin.describe_topics([topic])
            [p] = [p for p in desc["partitions"] if p["partition"] == 0]
            return PartitionState(int(p["leader"]), tuple(sorted(p["replicas"])),
                                  tuple(sorted(p["isr"])))
        finally:
            await admin.close()


async def topic_config(access: KafkaAccess, topic: str) -> dict[str, str]:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(**access.aiokafka_kwargs())
    await admin.start()
    try:
        [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        [(_, _, _, _, entries)] = resp.resources
        return {str(e[0]): str(e[1]) for e in entries}
    finally:
        await admin.close()


async def poll_until(look: Callable[[], Awaitable[T | None]], timeout_s: float) -> T:
    """The first non-None answer of `look`, asked again until `timeout_s` runs out (then
    TimeoutError). Partition and ISR state is only known by asking the brokers: there is no
    event to wait on, so the one pause here is the interval between two metadata requests.
    A request that fails (a node is away) counts as no answer yet."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                got = await look()
            except Exception:  # a node is away: ask again
                got = None
            if got is not None:
                return got
            await asyncio.sleep(POLL_S)  # the interval between metadata requests


async def wait_for(access: KafkaAccess, topic: str, pred: str,
                   timeout_s: float = WAIT_S) -> PartitionState:
    """Until partition 0 of `topic` satisfies `pred`: "full-isr" (all replicas in sync) or
    "leader-moved:<id>" (led by another node than <id>)."""
    async def look() -> PartitionState | None:
        st = await partition_state(access, topic)
        if pred == "full-isr" and st.isr == st.replicas and st.leader in st.replicas:
            return st
        if pred.startswith("leader-moved:") and st.leader not in (-1, int(pred[13:])):
            return st
        return None

    return await poll_until(look, timeout_s)


async def offsets_in_sync(access: KafkaAccess, timeout_s: float = WAIT_S) -> None:
    """Until every partition of __consumer_offsets has all its replicas in sync: killing two
    nodes before a partition whose ISR shrank to one of them is whole again would leave the
    agents' offsets offline (no unclean election) until that very node returns."""
    async def look() -> bool | None:
        admin = AIOKafkaAdminClient(**access.aiokafka_kwargs(), request_timeout_ms=5000)
        try:
            await admin.start()
            [desc] = await admin.describe_topics(["__consumer_offsets"])
            return all(sorted(p["isr"]) == sorted(p["replicas"])
                       for p in desc["partitions"]) or None
        finally:
            await admin.close()

    await poll_until(look, timeout_s)


async def all_nodes_up(cluster: LocalCluster, topics: list[str]) -> None:
    """Start every node that is down, then wait until every topic, and the agents' offsets,
    are fully in sync."""
    await asyncio.to_thread(cluster.start)
    for t in topics:
        await wait_for(cluster.access(), t, "full-isr")
    await offsets_in_sync(cluster.access())
