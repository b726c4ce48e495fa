"""Shared fixtures. The Kafka fixture fails the run when no broker can be had: it never skips."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.broker import BrokerError, LocalBroker, free_port, probe


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real Kafka broker: `KAFKA_BOOTSTRAP`, or a local one started here."""
    given = os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        try:
            asyncio.run(probe(given, timeout_s=10.0))
        except BrokerError as exc:
            pytest.fail(f"KAFKA_BOOTSTRAP={given} is set but unusable: {exc}", pytrace=False)
        yield given
        return
    broker = LocalBroker(Path(tmp_path_factory.mktemp("kafka")), port=free_port(),
                         controller_port=free_port())
    try:
        started = broker.start()
    except BrokerError as exc:
        pytest.fail(f"the local Kafka broker could not start: {exc}", pytrace=False)
    print(f"\nlocal Kafka at {started.bootstrap}, up in {started.seconds:.1f} s")
    try:
        yield started.bootstrap
    finally:
        broker.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.soak import COUNTERS, ORDER

    if not COUNTERS:
        return
    terminalreporter.section("fault summary")
    for key in ORDER:
        terminalreporter.write_line(f"{key:<24} {COUNTERS.get(key, 0)}")
