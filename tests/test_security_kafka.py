"""Per-party isolation on the secured broker: every denial is the broker's, seen as aiokafka's
error; the auditor reads and never writes; a party is added and revoked while the broker runs.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)

from agents.config import load_consortium
from agents.kafka_admin import group_for, provision, revoke
from agents.kafka_bus import read_to_end
from agents.security import KafkaAccess
from tests.kafka_util import WAIT_MS, make_consortium, party_access, produce
from tests.test_agents_kafka import check, query_ids, running, submit

pytestmark = pytest.mark.kafka


def _topic(d: Path, party: str) -> str:
    return load_consortium(d / "consortium.toml").registry[party].topic


@pytest.fixture
async def consortium(kafka_bootstrap: KafkaAccess, tmp_path: Path) -> Path:
    assert kafka_bootstrap.secure, "these tests need the secured broker"
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=50)
    await produce(kafka_bootstrap, _topic(d, "bank-2"), [b"for bank-2 only"])
    return d


async def _fetch(access: KafkaAccess, topic: str, group: str | None = None) -> list[bytes]:
    """Read `topic` from its start (committing in `group` when given)."""
    c = AIOKafkaConsumer(**access.aiokafka_kwargs(), group_id=group, enable_auto_commit=False,
                         auto_offset_reset="earliest")
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        batch = await c.getmany(tp, timeout_ms=WAIT_MS)
        if group is not None:
            await c.commit({tp: 1})
        return [bytes(r.value) for r in batch.get(tp, [])]
    finally:
        await c.stop()


async def _connect(access: KafkaAccess, **override: Any) -> None:
    """One connection with the SASL handshake, as every aiokafka client makes them."""
    host, port = access.bootstrap.rsplit(":", 1)
    kw = {k: v for k, v in access.aiokafka_kwargs().items() if k != "bootstrap_servers"}
    kw.update(override)
    conn = await create_conn(host, int(port), **kw)
    conn.close()


async def test_a_party_reads_its_own_inbox(consortium: Path,
                                           kafka_bootstrap: KafkaAccess) -> None:
    bank2 = party_access(consortium, kafka_bootstrap, "bank-2")
    group = group_for(load_consortium(consortium / "consortium.toml").id, "bank-2")
    assert await _fetch(bank2, _topic(consortium, "bank-2"), group) == [b"for bank-2 only"]


async def test_a_party_cannot_read_another_partys_inbox(consortium: Path,
                                                        kafka_bootstrap: KafkaAccess) -> None:
    bank1 = party_access(consortium, kafka_bootstrap, "bank-1")
    with pytest.raises(TopicAuthorizationFailedError):
        await _fetch(bank1, _topic(consortium, "bank-2"))
    with pytest.raises(TopicAuthorizationFailedError):  # the coordinator's neither
        await _fetch(bank1, _topic(consortium, "coordinator"))


async def test_a_party_cannot_write_its_own_inbox(consortium: Path,
                                                  kafka_bootstrap: KafkaAccess) -> None:
    bank1 = party_access(consortium, kafka_bootstrap, "bank-1")
    assert await produce(bank1, _topic(consortium, "bank-2"), [b"to bank-2"]) == [1]
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(bank1, _topic(consortium, "bank-1"), [b"forged input to myself"])


async def test_a_party_cannot_use_another_partys_consumer_group(
        consortium: Path, kafka_bootstrap: KafkaAccess) -> None:
    bank1 = party_access(consortium, kafka_bootstrap, "bank-1")
    cid = load_consortium(consortium / "consortium.toml").id
    with pytest.raises(GroupAuthorizationFailedError):
        await _fetch(bank1, _topic(consortium, "bank-1"), group_for(cid, "bank-2"))


async def test_a_wrong_password_is_refused(consortium: Path,
                                           kafka_bootstrap: KafkaAccess) -> None:
    bank1 = party_access(consortium, kafka_bootstrap, "bank-1")
    wrong = bank1.as_user(bank1.username, "not-" + (bank1.password or ""))
    with pytest.raises(SaslAuthenticationFailed):
        await _connect(wrong)
    with pytest.raises(KafkaConnectionError):  # what a producer reports for it
        await produce(wrong, _topic(consortium, "bank-2"), [b"x"])


async def test_a_client_without_credentials_is_refused(consortium: Path,
                                                       kafka_bootstrap: KafkaAccess) -> None:
    anonymous = KafkaAccess(kafka_bootstrap.bootstrap)  # plaintext, no SASL
    with pytest.raises(KafkaConnectionError):
        await produce(anonymous, _topic(consortium, "bank-2"), [b"x"])
    with pytest.raises(KafkaConnectionError):  # TLS that trusts the CA, but no SASL
        await _start_producer({"bootstrap_servers": kafka_bootstrap.bootstrap,
                               "security_protocol": "SSL",
                               "ssl_context": kafka_bootstrap.aiokafka_kwargs()["ssl_context"]})


async def test_a_client_that_does_not_trust_the_ca_is_refused(
        consortium: Path, kafka_bootstrap: KafkaAccess) -> None:
    bank1 = party_access(consortium, kafka_bootstrap, "bank-1")
    with pytest.raises(ssl.SSLCertVerificationError):
        await _connect(bank1, ssl_context=ssl.create_default_context())  # system CAs only
    with pytest.raises(KafkaConnectionError):  # what a producer reports for it
        await _start_producer({**bank1.aiokafka_kwargs(),
                               "ssl_context": ssl.create_default_context()})


async def _start_producer(kw: dict[str, Any]) -> None:
    p = AIOKafkaProducer(**kw)
    try:
        await p.start()
    finally:
        await p.stop()


async def test_a_party_cannot_create_a_topic(consortium: Path,
                                             kafka_bootstrap: KafkaAccess) -> None:
    bank1 = party_access(consortium, kafka_bootstrap, "bank-1")
    cid = load_consortium(consortium / "consortium.toml").id
    admin = AIOKafkaAdminClient(**bank1.aiokafka_kwargs())
    await admin.start()
    try:
        # aiokafka's admin client hands back the broker's per-topic error codes
        resp = await admin.create_topics([NewTopic(f"zerosum.{cid}.rogue", 1, 1)])
    finally:
        await admin.close()
    [(name, code, *_)] = resp.topic_errors
    assert (name, code) == (f"zerosum.{cid}.rogue", TopicAuthorizationFailedError.errno)
    assert f"zerosum.{cid}.rogue" not in await _topics(kafka_bootstrap)


async def _topics(access: KafkaAccess) -> set[str]:
    admin = AIOKafkaAdminClient(**access.aiokafka_kwargs())
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_the_auditor_reads_every_inbox_and_writes_none(
        consortium: Path, kafka_bootstrap: KafkaAccess) -> None:
    auditor = party_access(consortium, kafka_bootstrap, "auditor")
    c = load_consortium(consortium / "consortium.toml")
    topics = [p.topic for p in c.registry.values()]
    got = [bytes(r.value) async for r in read_to_end(auditor, topics)]
    assert got == [b"for bank-2 only"]
    for topic in topics:
        # an idempotent producer needs WRITE on some topic to get a producer id: the auditor
        # is refused before it sends anything; a plain producer is refused by the topic
        with pytest.raises(ClusterAuthorizationFailedError):
            await produce(auditor, topic, [b"the auditor writes nothing"])
        p = AIOKafkaProducer(**auditor.aiokafka_kwargs(), enable_idempotence=False, acks=1)
        try:
            await p.start()
            with pytest.raises(TopicAuthorizationFailedError):
                await p.send_and_wait(topic, b"the auditor writes nothing")
        finally:
            await p.stop()


async def test_secured_round_and_a_party_added_and_revoked_while_the_broker_runs(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    # four institutions on paper; bank-4 not yet provisioned: no user, no ACLs, no topic
    d = make_consortium(tmp_path, kafka_bootstrap, 4, customers=80, admin_step=False)
    full = load_consortium(d / "consortium.toml")
    without = dataclasses.replace(full, registry={k: v for k, v in full.registry.items()
                                                  if k != "bank-4"})
    provision(kafka_bootstrap, without)
    bank4 = party_access(d, kafka_bootstrap, "bank-4")
    with pytest.raises(SaslAuthenticationFailed):
        await _connect(bank4)

    provision(kafka_bootstrap, full)  # adds bank-4's topic, user and ACLs; idempotent for others
    bank1 = party_access(d, kafka_bootstrap, "bank-1")
    await produce(bank1, _topic(d, "bank-4"), [b"welcome"])
    assert await _fetch(bank4, _topic(d, "bank-4"), group_for(full.id, "bank-4")) == [b"welcome"]
    async with running(d) as agents:  # all five parties, secured, on the same broker
        ids = query_ids(d, 40)
        assert check(await submit(agents["bank-1"], ids), ids, d) > 0

    # revoked: a consumer that is already connected is refused on its next fetch ...
    consumer = AIOKafkaConsumer(**bank4.aiokafka_kwargs(), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(_topic(d, "bank-4"), 0)
        consumer.assign([tp])
        assert (await consumer.getmany(tp, timeout_ms=WAIT_MS))[tp]
        assert revoke(kafka_bootstrap, full.id, "bank-4") > 0
        consumer.seek(tp, 0)
        with pytest.raises(TopicAuthorizationFailedError):
            await consumer.getmany(tp, timeout_ms=WAIT_MS)
    finally:
        await consumer.stop()
    # ... and nobody logs in as bank-4 any more; the others carry on
    with pytest.raises(SaslAuthenticationFailed):
        await _connect(bank4)
    assert len(await produce(bank1, _topic(d, "bank-2"), [b"still fine"])) == 1
