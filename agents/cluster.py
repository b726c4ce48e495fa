"""A local three-node KRaft cluster from the same Maven jars: `zerosum broker start --nodes 3`.

Every node is a combined broker + controller with its own data dir (`<data-dir>/node-<id>`),
its own client and controller ports, and the same secure listeners as the single node (SASL_SSL
with SCRAM-SHA-512 for clients and between brokers, SASL PLAIN on the controller listener). The
nodes share what a cluster shares: one cluster id, one static `controller.quorum.voters` list
(every node formatted with it), one CA and broker certificate, one admin credential, one
controller password. `broker_config/cluster.properties` holds what differs from the single
node: three replicas, `min.insync.replicas=2`, fast failure detection.

`<data-dir>/cluster.json` records the cluster id and every node's ports once the storage is
formatted: the quorum's addresses never change afterwards. Each node is found again, and only
ever stopped, through its own `broker.json`, as a single broker is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agents.broker import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_PORT,
    START_TIMEOUT_S,
    BrokerError,
    BrokerInfo,
    LocalBroker,
    StartResult,
    admin_access,
    broker_config_dir,
    data_dir_lock,
    default_data_dir,
    kafka_cluster_id,
    port_in_use,
    probe,
    read_properties,
)
from agents.security import KafkaAccess

# three JVMs on a small machine: about 512 MB of heap each
CLUSTER_JVM_OPTS = ("-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                    "-Djava.awt.headless=true")


def listen_port(rng: random.Random | None = None) -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range (for tests and the bench).

    A port the kernel hands out (`free_port`) can be taken by any outgoing connection as its
    local port while the node that listened on it is down, and the node could not restart."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = rng or random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low // 2), low)
        if not port_in_use(port):
            return port
    raise BrokerError(f"no free port found below {low}")


def default_cluster_dir() -> Path:
    """Beside the single broker's data dir, never inside it."""
    return default_data_dir().with_name("cluster")


def cluster_properties() -> dict[str, str]:
    """broker_config/cluster.properties: the cluster's settings over server.properties."""
    return read_properties(broker_config_dir() / "cluster.properties")


@dataclass(frozen=True)
class NodeAddress:
    node_id: int
    port: int
    controller_port: int


def default_addresses(nodes: int, port: int = DEFAULT_PORT,
                      controller_port: int = DEFAULT_CONTROLLER_PORT) -> list[NodeAddress]:
    """Node i (from 1) on port + 2(i-1) and controller_port + 2(i-1): 9092/9093, 9094/9095..."""
    return [NodeAddress(i, port + 2 * (i - 1), controller_port + 2 * (i - 1))
            for i in range(1, nodes + 1)]


def local_addresses(nodes: int = 3) -> list[NodeAddress]:
    """`nodes` addresses on distinct free ports below the ephemeral range (`listen_port`)."""
    ports: list[int] = []
    while len(ports) < 2 * nodes:
        port = listen_port()
        if port not in ports:
            ports.append(port)
    return [NodeAddress(i + 1, ports[2 * i], ports[2 * i + 1]) for i in range(nodes)]


class ClusterNode(LocalBroker):
    """One node of a `LocalCluster`: a LocalBroker whose shared files live in the cluster dir."""

    def __init__(self, cluster: LocalCluster, address: NodeAddress) -> None:
        super().__init__(cluster.data_dir / f"node-{address.node_id}", port=address.port,
                         controller_port=address.controller_port, cache_dir=cluster.cache_dir,
                         log=cluster.log, insecure=cluster.insecure, tls_dir=cluster.tls_dir)
        self.cluster = cluster
        self.node_id = address.node_id
        self.jvm_opts = CLUSTER_JVM_OPTS

    @property
    def admin_credentials(self) -> Path:
        return self.cluster.admin_credentials

    @property
    def secrets_path(self) -> Path:
        return self.cluster.data_dir / "broker-secrets.toml"

    def cluster_id(self) -> str:
        return self.cluster.cluster_id

    def effective_properties(self) -> dict[str, str]:
        props = super().effective_properties()
        props.update(cluster_properties())
        props["node.id"] = str(self.node_id)
        props["controller.quorum.voters"] = self.cluster.voters
        return props


class LocalCluster:
    """`nodes` combined KRaft nodes on 127.0.0.1 under `data_dir` (see the module docstring)."""

    def __init__(self, data_dir: Path | None = None, *, nodes: int = 3,
                 port: int = DEFAULT_PORT, controller_port: int = DEFAULT_CONTROLLER_PORT,
                 addresses: list[NodeAddress] | None = None, cache_dir: Path | None = None,
                 log: logging.Logger | None = None, insecure: bool = False,
                 tls_dir: Path | None = None) -> None:
        self.data_dir = (data_dir or default_cluster_dir()).resolve()
        self.cache_dir = cache_dir
        self.log = log or logging.getLogger("zerosum.cluster")
        self.insecure = insecure
        self.tls_dir = (tls_dir or self.data_dir / "tls").resolve()
        recorded = self._recorded()
        if recorded is not None:  # formatted already: the quorum's addresses are fixed
            self.cluster_id, addrs = recorded
        else:
            if nodes < 3:
                raise BrokerError("a cluster needs at least 3 nodes (a quorum that survives the "
                                  "loss of one)")
            self.cluster_id = kafka_cluster_id()
            addrs = addresses or default_addresses(nodes, port, controller_port)
        self.nodes = [ClusterNode(self, a) for a in addrs]

    # -- files -------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.data_dir / "cluster.json"

    @property
    def admin_credentials(self) -> Path:
        return self.data_dir / "admin.kafka"

    @property
    def cafile(self) -> Path:
        return self.tls_dir / "ca.pem"

    def _recorded(self) -> tuple[str, list[NodeAddress]] | None:
        try:
            raw = json.loads(self.info_path.read_text())
            return str(raw["cluster_id"]), [NodeAddress(int(n["node_id"]), int(n["port"]),
                                                        int(n["controller_port"]))
                                            for n in raw["nodes"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _record(self) -> None:
        if self.info_path.is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.info_path.write_text(json.dumps({
            "cluster_id": self.cluster_id,
            "nodes": [{"node_id": n.node_id, "port": n.port,
                       "controller_port": n.controller_port} for n in self.nodes]},
            indent=1) + "\n")

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return data_dir_lock(self.data_dir)

    @property
    def voters(self) -> str:
        """controller.quorum.voters: the same on every node, from the first format on."""
        return ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)

    @property
    def bootstrap(self) -> str:
        """Every node's client address, comma-separated: what the agents are given."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node(self, node_id: int) -> ClusterNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise BrokerError(f"no node {node_id} in {self.data_dir}")

    def access(self) -> KafkaAccess:
        """The admin super-user, through every node's address."""
        if self.insecure:
            return KafkaAccess(self.bootstrap)
        return admin_access(self.bootstrap, self.admin_credentials, self.cafile)

    # -- commands ----------------------------------------------------------------------
    def start(self) -> StartResult:
        """Start every node that is not running; return once all of them are registered.

        All nodes are spawned before waiting for any: no controller can be elected before a
        majority of the voters runs."""
        with self._lock():
            t0 = time.monotonic()
            down = [n for n in self.nodes if n.running() is None]
            if not down:
                return StartResult(self.bootstrap, 0.0, already_running=True,
                                   secure=not self.insecure)
            self._record()
            spawned: list[tuple[ClusterNode, subprocess.Popen[bytes]]] = []
            try:
                for n in down:
                    spawned.append((n, n.launch()[0]))
                self._wait_all(spawned)
            except BrokerError:
                for n, proc in spawned:
                    n._terminate(proc.pid)
                raise
            return StartResult(self.bootstrap, time.monotonic() - t0, already_running=False,
                               secure=not self.insecure)

    def _wait_all(self, spawned: list[tuple[ClusterNode, subprocess.Popen[bytes]]]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        access = self.access()
        want = len(self.nodes)
        while time.monotonic() < deadline:
            for n, proc in spawned:  # (not `running()`: the child may not have exec'd yet)
                if proc.poll() is not None:
                    raise BrokerError(f"node {n.node_id} exited with status {proc.returncode} "
                                      f"while starting; last lines of {n.log_dir}:\n"
                                      f"{n.log_tail()}")
            try:
                seen = asyncio.run(probe(access, timeout_s=2.0))
                if seen >= want:
                    return
                last = f"{seen} of {want} nodes registered"
            except BrokerError as exc:
                last = str(exc)
            time.sleep(0.25)  # polling child processes; not a test
        raise BrokerError(f"the cluster did not come up within {START_TIMEOUT_S:.0f} s ({last}); "
                          f"see {self.data_dir}/node-*/logs/server.log")

    def start_node(self, node_id: int) -> StartResult:
        """Start one node (after `kill` or `stop_node`); return once it answers."""
        return self.node(node_id).start()

    def stop_node(self, node_id: int) -> bool:
        """Stop one node cleanly (SIGTERM: controlled shutdown, leadership moves first)."""
        return self.node(node_id).stop()

    def kill(self, node_id: int) -> int:
        """kill -9 one node's process group and wait until it is gone; return its pid."""
        node = self.node(node_id)
        info = node.running()
        if info is None:
            raise BrokerError(f"node {node_id} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(info.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30

        def gone() -> bool:
            # its command line empties before its threads have closed their sockets: wait
            # for its ports too, or a restart right after would find them taken
            return node.running() is None and not any(
                port_in_use(p) for p in (node.port, node.controller_port))

        while not gone() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.pid, os.WNOHANG)  # reap it when it is our child
            time.sleep(0.05)  # waiting for the kernel to tear the process down
        if not gone():
            raise BrokerError(f"node {node_id} (pid {info.pid}) still holds its ports 30 s "
                              "after kill -9")
        return info.pid

    def stop(self) -> bool:
        """Stop every node at once (one after the other, the last ones would wait for a
        controller quorum that is already gone); False when none was running."""
        with self._lock():
            running = [n for n in self.nodes if n.running() is not None]
            if not running:
                return False
            with ThreadPoolExecutor(len(running)) as pool:
                list(pool.map(lambda n: n.stop(), running))
            return True

    def status(self) -> list[tuple[int, BrokerInfo | None, str]]:
        """(node id, its broker.json if it runs, a line of text) for every node."""
        return [(n.node_id, *n.status()) for n in self.nodes]
