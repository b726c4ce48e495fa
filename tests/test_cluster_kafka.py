"""The local three-node KRaft cluster: started, inspected and used by the agents like the
single broker, through a comma-separated bootstrap list and nothing else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents.cli import main
from agents.cluster import LocalCluster, cluster_properties
from agents.config import load_consortium
from agents.kafka_bus import topic_settings
from protocol.messages import Scope
from tests.cluster_util import partition_state, topic_config
from tests.kafka_util import make_consortium
from tests.test_agents_kafka import check, query_ids, running, submit

pytestmark = pytest.mark.kafka


def test_every_node_runs_and_sees_the_whole_cluster(kafka_cluster: LocalCluster,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    status = kafka_cluster.status()
    assert [n for n, _, _ in status] == [1, 2, 3]
    for node_id, info, line in status:
        assert info is not None, line
        assert "3 broker(s)" in line, (node_id, line)
    ports = {info.port for _, info, _ in status if info is not None}
    assert len(ports) == 3
    assert kafka_cluster.bootstrap.count(",") == 2
    capsys.readouterr()
    assert main(["broker", "status", "--data-dir", str(kafka_cluster.data_dir)]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == ["node 1", "node 2", "node 3"]


def test_nodes_share_one_quorum_and_the_cluster_settings(kafka_cluster: LocalCluster) -> None:
    wanted = cluster_properties()
    assert wanted["default.replication.factor"] == "3"
    assert wanted["min.insync.replicas"] == "2"
    voters = {n.effective_properties()["controller.quorum.voters"] for n in kafka_cluster.nodes}
    assert voters == {kafka_cluster.voters}
    for n in kafka_cluster.nodes:
        written = n.props_path.read_text().splitlines()
        for key, value in wanted.items():
            assert f"{key}={value}" in written, (n.node_id, key)
        assert f"node.id={n.node_id}" in written
        assert "-Xmx512m" in n.jvm_opts


async def test_agents_run_rounds_on_replicated_topics(kafka_cluster: LocalCluster,
                                                      tmp_path: Path) -> None:
    admin = kafka_cluster.access()
    d = make_consortium(tmp_path, admin, 3, customers=150)
    consortium = load_consortium(d / "consortium.toml")
    assert consortium.bootstrap == kafka_cluster.bootstrap  # the agents get the list only
    for party in consortium.registry.values():
        state = await partition_state(admin, party.topic)
        assert state.replicas == (1, 2, 3), party.topic
        assert state.isr == (1, 2, 3), party.topic
        config = await topic_config(admin, party.topic)
        assert config["min.insync.replicas"] == "2"
        assert config["unclean.leader.election.enable"] == "false"
    ids = query_ids(d, 60)
    async with running(d) as agents:
        outs = await asyncio.gather(*(submit(agents[f"bank-{1 + r % 3}"], ids, scope)
                                      for r in range(6) for scope in Scope))
        for out in outs:
            assert check(out, ids, d) > 0
    for party in consortium.registry.values():  # every inbox still whole after the rounds
        assert (await partition_state(admin, party.topic)).isr == (1, 2, 3), party.topic


def test_the_cli_stops_and_starts_the_whole_cluster(kafka_cluster: LocalCluster,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--data-dir", str(kafka_cluster.data_dir)]
    assert main(["broker", "start", *where]) == 0  # cluster.json there: it is the cluster
    assert "already running" in capsys.readouterr().out
    assert main(["broker", "stop", *where]) == 0
    assert all(info is None for _, info, _ in kafka_cluster.status())
    assert main(["broker", "status", *where]) == 3
    capsys.readouterr()
    assert main(["broker", "start", *where]) == 0
    out = capsys.readouterr().out
    assert "cluster of 3 nodes up after" in out
    assert kafka_cluster.bootstrap in out
    assert main(["broker", "status", *where]) == 0


def test_inbox_settings_ask_for_3_replicas_and_leave_min_isr_to_the_broker() -> None:
    _, replication, configs = topic_settings()  # capped at the brokers there are
    assert replication == 3
    assert "min.insync.replicas" not in configs  # the broker's: 1 alone, 2 on the cluster
    assert configs["unclean.leader.election.enable"] == "false"
