"""`zerosum broker`: start, refuse a busy port, stop only its own broker, keep data across restarts.

These start a second broker of their own (on free ports, in a temporary data dir) so that the
session broker is never disturbed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.broker import BrokerError, LocalBroker, free_port, read_properties
from agents.cli import main
from tests.kafka_util import new_topic, produce

pytestmark = pytest.mark.kafka


async def _write(bootstrap: str, topic: str, values: list[bytes]) -> None:
    await produce(bootstrap, await new_topic(bootstrap, topic), values)


async def _read_all(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning(TopicPartition(topic, 0))
        out: list[bytes] = []
        while len(out) < n:
            batch = await consumer.getmany(timeout_ms=20_000)
            if not batch:
                break
            out += [r.value for rs in batch.values() for r in rs]
        return out
    finally:
        await consumer.stop()


def test_restart_keeps_topics_and_messages(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "b", port=free_port(), controller_port=free_port())
    topic = f"keep-{uuid.uuid4().hex[:8]}"
    values = [b"alpha", b"beta", b"gamma"]
    first = broker.start()
    try:
        assert not first.already_running
        asyncio.run(_write(first.bootstrap, topic, values))
    finally:
        assert broker.stop()
    assert broker.running() is None
    second = broker.start()
    try:
        assert asyncio.run(_read_all(second.bootstrap, topic, 3)) == values
    finally:
        broker.stop()


def test_busy_port_is_refused_with_its_number(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        broker = LocalBroker(tmp_path / "b", port=busy, controller_port=free_port())
        with pytest.raises(BrokerError, match=f"port {busy} .*in use"):
            broker.start()
    assert broker.running() is None


def test_stop_leaves_a_process_it_did_not_start_alone(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "b", port=free_port(), controller_port=free_port())
    broker.data_dir.mkdir(parents=True)
    # broker.json naming a live process that is not this data dir's broker (this test process)
    broker.info_path.write_text(
        f'{{"pid": {os.getpid()}, "port": 1, "controller_port": 2, "started_at": 0}}')
    assert broker.running() is None
    assert broker.stop() is False


def test_cli_status_of_a_stopped_broker_exits_3(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "status", "--data-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().out


def test_missing_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    broker = LocalBroker(tmp_path / "b", port=free_port(), controller_port=free_port())
    with pytest.raises(BrokerError, match="Java 17"):
        broker.start()


def test_old_java_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    java = fake / "java"
    java.write_text('#!/bin/sh\necho \'openjdk version "11.0.2" 2019-01-15\' >&2\n')
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(fake))
    broker = LocalBroker(tmp_path / "b", port=free_port(), controller_port=free_port())
    with pytest.raises(BrokerError, match="needs Java 17 or newer; `java` is Java 11"):
        broker.start()


def test_effective_properties_override_only_addresses_and_dirs(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "b", port=12345, controller_port=12346)
    props = broker.effective_properties()
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:12345,CONTROLLER://127.0.0.1:12346"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:12345"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:12346"
    assert props["log.dirs"] == str(broker.kraft_dir)
    assert props["process.roles"] == "broker,controller"


def test_bad_properties_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "x.properties"
    p.write_text("a=1\nnot a property\n")
    with pytest.raises(BrokerError, match=r"x\.properties:2"):
        read_properties(p)


def test_cluster_ids_never_look_like_options() -> None:
    from agents.broker import kafka_cluster_id

    ids = [kafka_cluster_id() for _ in range(20_000)]  # ~1 in 64 would start with '-'
    assert all(len(i) == 22 for i in ids)
    assert not [i for i in ids if i.startswith("-")]
