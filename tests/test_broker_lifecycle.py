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
from agents.security import KafkaAccess, read_credentials
from tests.kafka_util import new_topic, produce

pytestmark = pytest.mark.kafka


async def _write(bootstrap: KafkaAccess, topic: str, values: list[bytes]) -> None:
    await produce(bootstrap, await new_topic(bootstrap, topic), values)


async def _read_all(bootstrap: KafkaAccess, topic: str, n: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(**bootstrap.aiokafka_kwargs(), enable_auto_commit=False)
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
        assert first.secure
        asyncio.run(_write(broker.access(), topic, values))
    finally:
        assert broker.stop()
    assert broker.running() is None
    assert broker.start().secure
    try:
        # the admin's SCRAM credential and the certificate outlive the restart
        assert asyncio.run(_read_all(broker.access(), topic, 3)) == values
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


def test_insecure_broker_is_plaintext_and_says_so(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["broker", "start", "--insecure", "--data-dir", str(tmp_path / "b"),
            "--port", str(free_port()), "--controller-port", str(free_port())]
    assert main(args) == 0
    broker = LocalBroker(tmp_path / "b")
    try:
        out = capsys.readouterr()
        assert "WARNING: --insecure" in out.err
        assert "PLAINTEXT (insecure)" in out.out
        info = broker.running()
        assert info is not None
        assert not info.secure
        topic = f"plain-{uuid.uuid4().hex[:8]}"  # anyone may create, write and read
        asyncio.run(_write(KafkaAccess(info.bootstrap), topic, [b"open"]))
        assert asyncio.run(_read_all(KafkaAccess(info.bootstrap), topic, 1)) == [b"open"]
    finally:
        assert broker.stop()


def test_secure_properties_carry_secrets_only_in_the_data_dir(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "b", port=12345, controller_port=12346)
    broker._write_properties()
    props = read_properties(broker.props_path)
    assert props["listeners"] == "SASL_SSL://127.0.0.1:12345,CONTROLLER://127.0.0.1:12346"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    _, admin_password = read_credentials(broker.admin_credentials)
    assert admin_password in props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    for private in (broker.props_path, broker.admin_credentials,
                    broker.tls_dir / "broker.p12", broker.tls_dir / "ca.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert "password" not in repr(broker.access())


def test_effective_properties_override_only_addresses_and_dirs(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "b", port=12345, controller_port=12346, insecure=True)
    props = broker.effective_properties()
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:12345,CONTROLLER://127.0.0.1:12346"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:12345"
    assert "authorizer.class.name" not in props
    assert not [k for k in props if k.startswith(("sasl.", "ssl."))]
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
