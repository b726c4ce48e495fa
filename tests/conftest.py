"""Shared fixtures. The Kafka fixture fails the run when no broker can be had: it never skips."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.broker import BrokerError, LocalBroker, free_port, probe
from agents.cluster import LocalCluster, local_addresses
from agents.security import KafkaAccess, SecurityError, read_credentials


def _given_broker(bootstrap: str) -> KafkaAccess:
    """`KAFKA_BOOTSTRAP`, with `KAFKA_ADMIN_CREDENTIALS` (a super-user's credential file) and
    `KAFKA_CA` for a secured broker; plaintext without them."""
    creds = os.environ.get("KAFKA_ADMIN_CREDENTIALS")
    if not creds:
        return KafkaAccess(bootstrap)
    user, password = read_credentials(Path(creds))
    ca = os.environ.get("KAFKA_CA")
    return KafkaAccess(bootstrap, user, password, Path(ca) if ca else None)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaAccess]:
    """The admin super-user's access to a real Kafka broker: `KAFKA_BOOTSTRAP`, or a local one
    started here, secured (SASL_SSL, SCRAM-SHA-512, ACLs) like `zerosum broker start`."""
    given = os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        try:
            access = _given_broker(given)
            asyncio.run(probe(access, timeout_s=10.0))
        except (BrokerError, SecurityError) as exc:
            pytest.fail(f"KAFKA_BOOTSTRAP={given} is set but unusable: {exc}", pytrace=False)
        yield access
        return
    broker = LocalBroker(Path(tmp_path_factory.mktemp("kafka")), port=free_port(),
                         controller_port=free_port())
    try:
        started = broker.start()
    except BrokerError as exc:
        pytest.fail(f"the local Kafka broker could not start: {exc}", pytrace=False)
    print(f"\nlocal Kafka (SASL_SSL) at {started.bootstrap}, up in {started.seconds:.1f} s")
    try:
        yield broker.access()
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local three-node KRaft cluster (`zerosum broker start --nodes 3`) on free ports, for
    the tests that kill its nodes. A test that stops or kills a node starts it again before
    it ends (`tests.cluster_util.all_nodes_up`)."""
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("cluster")),
                           addresses=local_addresses(3))  # ports no client connection takes
    try:
        started = cluster.start()
    except BrokerError as exc:
        cluster.stop()
        pytest.fail(f"the local Kafka cluster could not start: {exc}", pytrace=False)
    print(f"\nlocal Kafka cluster (3 nodes, SASL_SSL) at {started.bootstrap}, up in "
          f"{started.seconds:.1f} s")
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.soak import COUNTERS, ORDER

    if not COUNTERS:
        return
    terminalreporter.section("fault summary")
    for key in ORDER:
        terminalreporter.write_line(f"{key:<24} {COUNTERS.get(key, 0)}")
