"""Mutual TLS, the alternative to SCRAM passwords: a party presents a client certificate whose
CN is its principal, the broker maps it to the same `User:<consortium>.<party>`, and the same
ACLs apply. A whole round runs with every party on certificates; the denials hold."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from aiokafka.helpers import create_ssl_context

from agents.broker import BrokerError, LocalBroker, free_port
from agents.config import load_consortium, load_party
from agents.security import scram_username, write_client_certificate
from protocol.machine import Outcome
from tests.kafka_util import make_consortium, produce
from tests.test_agents_kafka import check, query_ids, running, submit

pytestmark = pytest.mark.kafka


@pytest.fixture
def mtls_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path / "kafka", port=free_port(), controller_port=free_port(),
                         mtls_port=free_port())
    try:
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"the mutual-TLS broker could not start: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


def _to_mutual_tls(d: Path, broker: LocalBroker) -> None:
    """Every party of the consortium in `d` switches from its SCRAM password to a client
    certificate signed by the broker's CA, and to the broker's mutual-TLS port."""
    c = load_consortium(d / "consortium.toml")
    for party in c.registry:
        write_client_certificate(broker.tls_dir, scram_username(c.id, party),
                                 d / "keys" / f"{party}.crt.pem", d / "keys" / f"{party}.key.pem")
        pf = d / f"{party}.toml"
        pf.write_text(re.sub(r'credentials = "[^"]*"\n',
                             f'certificate = "keys/{party}.crt.pem"\n'
                             f'key = "keys/{party}.key.pem"\n', pf.read_text()))
    cf = d / "consortium.toml"
    text = cf.read_text().replace('security = "SASL_SSL"', 'security = "SSL"')
    cf.write_text(re.sub(r'bootstrap = "127\.0\.0\.1:\d+"',
                         f'bootstrap = "127.0.0.1:{broker.mtls_port}"', text))


async def test_a_round_with_every_party_on_client_certificates(
        mtls_broker: LocalBroker, tmp_path: Path) -> None:
    admin = mtls_broker.access(mtls_broker.running())
    d = make_consortium(tmp_path, admin, 3, customers=80)  # users, ACLs, topics as usual
    _to_mutual_tls(d, mtls_broker)
    b1 = load_party(d / "bank-1.toml").kafka
    assert b1.mutual_tls
    assert b1.username is None
    assert b1.bootstrap.endswith(f":{mtls_broker.mtls_port}")
    ids = query_ids(d, 60)
    async with running(d) as agents:
        out = await submit(agents["bank-1"], ids)
        assert isinstance(out, Outcome)
        assert check(out, ids, d) > 0

    # the same ACLs as with SCRAM: bank-1's certificate cannot read bank-2's inbox
    c = load_consortium(d / "consortium.toml")
    await produce(admin, c.registry["bank-2"].topic, [b"for bank-2 only"])
    consumer = AIOKafkaConsumer(**b1.aiokafka_kwargs(), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(c.registry["bank-2"].topic, 0)
        consumer.assign([tp])
        with pytest.raises(TopicAuthorizationFailedError):
            await consumer.getmany(tp, timeout_ms=10_000)
    finally:
        await consumer.stop()
    # and a client that trusts the broker but has no certificate does not get in at all
    stranger = AIOKafkaConsumer(bootstrap_servers=b1.bootstrap, security_protocol="SSL",
                                ssl_context=create_ssl_context(cafile=b1.cafile),
                                request_timeout_ms=5000)
    with pytest.raises(KafkaConnectionError):
        await stranger.start()
    await stranger.stop()
