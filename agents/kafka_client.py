"""What an agent does about topics before it runs, plaintext or secured; and how loud the
Kafka client's own log is.

On a plaintext broker (`--insecure`) an agent creates the inbox topics it lacks, as before. On a
secured one it may not (no CREATE): the admin step (`zerosum broker acl`) created them, and the
agent only checks that they are there and that it may see them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from agents.security import KafkaAccess

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
    from agents.agent import ensure_topics  # the agent module imports this one

    await ensure_topics(access, topics)
