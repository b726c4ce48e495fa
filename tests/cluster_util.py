"""Helpers for the tests on the local three-node cluster: who leads a partition, who is in sync,
and waiting (on metadata answers, bounded) until the cluster is whole again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient

from agents.cluster import LocalCluster
from agents.security import KafkaAccess

WAIT_S = 90.0


@dataclass(frozen=True)
class PartitionState:
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


async def partition_state(access: KafkaAccess, topic: str) -> PartitionState:
    """Leader, replicas and in-sync replicas of partition 0 of `topic`, from the cluster."""
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    admin = AIOKafkaAdminClient(**access.aiokafka_kwargs(), request_timeout_ms=5000)
    try:
        await admin.start()
        [desc] = await admin.describe_topics([topic])
        [p] = [p for p in desc["partitions"] if p["partition"] == 0]
        return PartitionState(int(p["leader"]), tuple(sorted(p["replicas"])),
                              tuple(sorted(p["isr"])))
    finally:
        await admin.close()
        quiet.setLevel(level)


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


async def wait_for(access: KafkaAccess, topic: str, pred: str,
                   timeout_s: float = WAIT_S) -> PartitionState:
    """Until partition 0 of `topic` satisfies `pred`: "full-isr" (all replicas in sync) or
    "leader-moved:<id>" (led by another node than <id>). Each look is a metadata request; the
    wait between looks is the request itself, bounded by `timeout_s` overall."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                st = await partition_state(access, topic)
            except Exception:  # a node is away: ask again
                await asyncio.sleep(0.2)  # backoff between metadata requests, not a test wait
                continue
            if pred == "full-isr" and st.isr == st.replicas and st.leader in st.replicas:
                return st
            if pred.startswith("leader-moved:") and st.leader not in (-1, int(pred[13:])):
                return st
            await asyncio.sleep(0.2)  # backoff between metadata requests, not a test wait


async def offsets_in_sync(access: KafkaAccess, timeout_s: float = WAIT_S) -> None:
    """Until every partition of __consumer_offsets has all its replicas in sync: killing two
    nodes before a partition whose ISR shrank to one of them is whole again would leave the
    agents' offsets offline (no unclean election) until that very node returns."""
    async with asyncio.timeout(timeout_s):
        while True:
            admin = AIOKafkaAdminClient(**access.aiokafka_kwargs(), request_timeout_ms=5000)
            try:
                await admin.start()
                [desc] = await admin.describe_topics(["__consumer_offsets"])
                if all(sorted(p["isr"]) == sorted(p["replicas"]) for p in desc["partitions"]):
                    return
            except Exception:  # a node is away: ask again
                pass
            finally:
                await admin.close()
            await asyncio.sleep(0.2)  # backoff between metadata requests, not a test wait


async def all_nodes_up(cluster: LocalCluster, topics: list[str]) -> None:
    """Start every node that is down, then wait until every topic, and the agents' offsets,
    are fully in sync."""
    await asyncio.to_thread(cluster.start)
    for t in topics:
        await wait_for(cluster.access(), t, "full-isr")
    await offsets_in_sync(cluster.access())
