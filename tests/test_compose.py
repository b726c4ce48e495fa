"""docker-compose.yml cannot run here (no Docker engine), so it is kept correct by test."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from agents.broker import KAFKA_VERSION, SET_BY_START, broker_config_dir, read_properties
from agents.cli import build_parser
from agents.cluster import CLUSTER_JVM_OPTS, cluster_properties

ROOT = Path(__file__).resolve().parent.parent
# Addresses and paths differ by design between the compose network and 127.0.0.1.
ADDRESS_KEYS = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs"}


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _kafka_env(service: str = "kafka") -> dict[str, str]:
    env = _compose()["services"][service]["environment"]
    return {str(k): str(v) for k, v in env.items()}


CLUSTER = ("kafka-1", "kafka-2", "kafka-3")


def _env_name(prop: str) -> str:
    """The apache/kafka image's naming: '_' -> '__', '-' -> '___', then '.' -> '_'."""
    return "KAFKA_" + prop.upper().replace("_", "__").replace("-", "___").replace(".", "_")


def test_broker_image_is_the_official_one_at_our_kafka_version() -> None:
    assert _compose()["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_pom_fetches_the_same_kafka_version() -> None:
    pom = (broker_config_dir() / "pom.xml").read_text()
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in pom


def test_every_broker_setting_agrees_with_server_properties() -> None:
    props = read_properties(broker_config_dir() / "server.properties")
    env = _kafka_env()
    for key, value in props.items():
        if key in ADDRESS_KEYS:
            continue
        name = _env_name(key)
        assert name in env, f"docker-compose.yml lacks {name} (server.properties has {key})"
        assert env[name] == value, f"{name}={env[name]!r} but server.properties has {value!r}"
    known = {_env_name(k) for k in [*props, *SET_BY_START]}
    extra = sorted(n for n in set(env) - known if n.startswith("KAFKA_"))
    assert extra == [], f"compose sets broker options server.properties does not: {extra}"


def test_addresses_are_consistent_inside_the_compose_network() -> None:
    env = _kafka_env()
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "SASL_SSL://kafka:9092"
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"


def test_agent_commands_are_valid_zerosum_commands() -> None:
    parser = build_parser()
    services = _compose()["services"]
    agent_names = [n for n in services if n != "kafka" and n not in CLUSTER]
    assert {"coordinator", "init", "acl"} <= set(agent_names)
    assert sum(1 for n in agent_names if n.startswith("bank-")) == 3
    for name in agent_names:
        command = services[name]["command"]
        args = parser.parse_args(command)  # exits (fails the test) on an unknown command
        assert args.command == command[0], name


def test_compose_sets_every_secret_that_broker_start_sets() -> None:
    env = _kafka_env()
    command = " ".join(_compose()["services"]["kafka"]["command"])  # reads files of /zerosum
    for key in SET_BY_START:
        assert _env_name(key) in env or f"export {_env_name(key)}=" in command, \
            f"docker-compose.yml lacks {_env_name(key)} ({key})"
    text = (ROOT / "docker-compose.yml").read_text()
    literal = re.findall(r'password="?([^"$\s\]]+)', text)
    assert literal == [], "a literal password in docker-compose.yml"


def test_the_cluster_profile_has_three_nodes_of_the_same_image_and_command() -> None:
    services = _compose()["services"]
    for name in CLUSTER:
        node = services[name]
        assert node["profiles"] == ["cluster"], name
        for key in ("image", "command", "depends_on", "healthcheck"):
            assert node[key] == services["kafka"][key], (name, key)
    assert "$$HOSTNAME:9092" in " ".join(services["kafka"]["healthcheck"]["test"])


def test_every_cluster_node_agrees_with_server_and_cluster_properties() -> None:
    props = read_properties(broker_config_dir() / "server.properties")
    props.update(cluster_properties())
    voters = ",".join(f"{i}@kafka-{i}:9093" for i in (1, 2, 3))
    for i, name in enumerate(CLUSTER, start=1):
        env = _kafka_env(name)
        for key, value in props.items():
            if key in ADDRESS_KEYS or key == "node.id":
                continue
            assert env.get(_env_name(key)) == value, (name, key, env.get(_env_name(key)), value)
        assert env["KAFKA_NODE_ID"] == str(i)
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"SASL_SSL://{name}:9092"
        assert env["CLUSTER_ID"] == _kafka_env()["CLUSTER_ID"]
        heap = env["KAFKA_HEAP_OPTS"].split()
        assert [o for o in CLUSTER_JVM_OPTS if o.startswith(("-Xms", "-Xmx"))] == heap
        known = {_env_name(k) for k in [*props, *SET_BY_START]} | {"KAFKA_HEAP_OPTS"}
        extra = sorted(n for n in set(env) - known if n.startswith("KAFKA_"))
        assert extra == [], f"{name} sets broker options the properties files do not: {extra}"


def test_the_agents_and_the_admin_step_follow_one_bootstrap_list() -> None:
    services = _compose()["services"]
    switch = "${ZEROSUM_BOOTSTRAP:-kafka:9092}"
    assert services["acl"]["command"][-2:] == ["--bootstrap", switch]
    assert {n for n, v in services["acl"]["depends_on"].items()
            if v.get("required") is False} == set(CLUSTER)
    for name in ("coordinator", "bank-1", "bank-2", "bank-3"):
        assert services[name]["environment"]["KAFKA_BOOTSTRAP"] == switch
