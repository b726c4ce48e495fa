"""The inbox topics' settings, fitted to the cluster they are created on.

`broker_config/topics.properties` asks for 3 replicas. A cluster with fewer brokers (the single
local node) gets one replica per broker: a topic cannot have more replicas than there are
brokers. `min.insync.replicas` is the broker's own (1 on the single node, 2 on the three-node
cluster, see broker_config/cluster.properties): a topic setting of 2 would make a one-replica
topic refuse every acks=all write.
"""

from __future__ import annotations

import contextlib

from agents.broker import broker_config_dir, read_properties
from agents.security import KafkaAccess, as_access


def topic_settings(brokers: int) -> tuple[int, int, dict[str, str]]:
    """(partitions, replication factor, configs) for inbox topics on `brokers` brokers."""
    props = read_properties(broker_config_dir() / "topics.properties")
    partitions = int(props.pop("partitions", "1"))
    wanted = int(props.pop("replication.factor", "1"))
    return partitions, max(1, min(wanted, brokers)), props


async def create_inboxes(bootstrap: str | KafkaAccess, topics: list[str]) -> list[str]:
    """Create the topics that do not exist yet, with the audit settings; return those created.

    As the admin (`agents.kafka_admin.provision`) or, on a plaintext broker, as any agent."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**as_access(bootstrap).aiokafka_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            brokers = len((await admin.describe_cluster())["brokers"])
            partitions, replication, configs = topic_settings(brokers)
            with contextlib.suppress(TopicAlreadyExistsError):  # another agent was first
                await admin.create_topics([NewTopic(t, partitions, replication,
                                                    topic_configs=configs) for t in missing])
        return missing
    finally:
        await admin.close()
