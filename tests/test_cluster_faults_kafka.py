"""Faults of the three-node cluster while rounds are in flight: kill -9 of the node that leads
a party's inbox, a rolling restart (kill -9 and restart of every node in turn), and two of
three nodes down. Every round ends once, exact or in a typed abort; none is lost or published
twice; the audit of the topics read back finds every acknowledged envelope in its place."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import msgpack
import pytest

from agents.agent import Agent
from agents.audit import read_and_audit
from agents.bench import AgentProcess
from agents.cluster import LocalCluster
from agents.config import load_consortium, load_party
from agents.demo import plaintext
from agents.kafka_bus import read_to_end
from agents.outbox import Outbox
from agents.security import KafkaAccess
from protocol.envelope import Header
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.messages import Scope
from protocol.tokens import tokenize
from tests.api_rounds import ApiRounds, wrong_rows
from tests.cluster_util import all_nodes_up, partition_state, wait_for
from tests.kafka_util import make_consortium, party_access
from tests.soak import COUNTERS, LEADER_KILLS, QUORUM_LOSSES, ROLLING_RESTARTS
from tests.test_agents_kafka import ATTRS, check, query_ids, running

pytestmark = pytest.mark.kafka
Result = Outcome | Ended | None
NAMES = ("coordinator", "bank-1", "bank-2", "bank-3")


async def stream(agents: dict[str, Agent], ids: list[str], n: int,
                 timeout_s: float = 120) -> list[Result]:
    """n concurrent rounds, requested by the banks in turn."""
    banks = [agents[f"bank-{i}"] for i in (1, 2, 3)]
    key = banks[0].cfg.consortium_key
    assert key is not None
    tokens = tokenize(ids, key)
    parts = banks[0].cfg.consortium.institutions
    return list(await asyncio.gather(*(
        banks[r % 3].submit(os.urandom(16), tokens, participants=parts, attributes=ATTRS,
                            scope=Scope.INTERSECTION, deadline_s=timeout_s) for r in range(n))))


async def mid_round(agent: Agent) -> None:
    """Return once `agent` has taken in new input: rounds are in flight through its inbox."""
    seen = agent.stats.received
    await agent.wait_until(lambda: agent.stats.received > seen, 30)


def judge(results: list[Result], agents: dict[str, Agent], d: Path, ids: list[str]) -> int:
    """Every round ended once, exact or with a typed abort; returns how many aborted."""
    ok = [r for r in results if isinstance(r, Outcome)]
    for r in results:
        if isinstance(r, Outcome):
            check(r, ids, d)
        else:
            assert isinstance(r, Ended), r  # None would be a round lost
            assert r.reason is AbortReason.TIMEOUT, r
    assert len({r.round_id for r in results if r is not None}) == len(results)
    coordinator = agents["coordinator"].stats
    assert coordinator.published == len(ok)  # none published twice
    assert coordinator.published + coordinator.aborted == len(results)
    assert ok, "no round got through"
    aborted = len(results) - len(ok)
    COUNTERS["rounds checked"] += len(results)
    COUNTERS["rounds aborted (typed)"] += aborted
    return aborted


async def every_envelope_on_the_bus(d: Path, admin: KafkaAccess) -> int:
    """Each party's journal says how far its hash chain got (every envelope below that was
    acknowledged before its input was committed); every one of those sequence numbers must be
    on the bus when the topics are read back. Returns the records read."""
    consortium = load_consortium(d / "consortium.toml")
    seqs: dict[str, set[int]] = {}
    records = 0
    async for r in read_to_end(admin, [p.topic for p in consortium.registry.values()]):
        h = Header.decode(msgpack.unpackb(r.value)[1])
        seqs.setdefault(h.sender, set()).add(h.seq)
        records += 1
    for party in consortium.registry:
        sent = Outbox(load_party(d / f"{party}.toml").state_dir).load_chain().next_seq
        missing = sorted(set(range(sent)) - seqs.get(party, set()))
        assert not missing, f"{party}: acknowledged envelopes {missing[:5]} not on the bus"
        assert max(seqs.get(party, {-1})) == sent - 1, party
    return records


async def audited(d: Path, admin: KafkaAccess, results: list[Result]) -> None:
    """Read every inbox back: every acknowledged envelope is there; as the auditor, each
    sender's sequence numbers and hash chain have no gap or fork, every round has exactly one
    outcome, and the outcomes are the ones the requesters saw."""
    records = await every_envelope_on_the_bus(d, admin)
    run = await read_and_audit(load_consortium(d / "consortium.toml"),
                               party_access(d, admin, "auditor"))
    assert [str(f) for f in run.report.all_findings()] == []
    outcomes = {r.round_id: r.outcome for r in run.report.rounds}
    for r in results:
        assert r is not None
        assert outcomes[r.round_id] == ("published" if isinstance(r, Outcome) else "aborted")
    print(f"audit: {run.records} of {records} records, {len(run.report.rounds)} rounds, "
          "no finding, no acknowledged envelope missing")


# each kill waits for a node to come back (a JVM start, then the ISR whole again): about a
# minute on the 2-core machine, so the time limit grows with the count (`make soak`: 20)
@pytest.mark.timeout(180 + 90 * LEADER_KILLS)
async def test_kill_9_of_the_node_leading_an_inbox_mid_round(kafka_cluster: LocalCluster,
                                                              tmp_path: Path) -> None:
    admin = kafka_cluster.access()
    d = make_consortium(tmp_path, admin, 3, customers=150)
    ids = query_ids(d, 60)
    topics = {n: p.topic for n, p in load_consortium(d / "consortium.toml").registry.items()}
    rng = random.Random(13)
    results: list[Result] = []
    try:
        async with running(d) as agents:
            for _ in range(LEADER_KILLS):
                party = rng.choice(NAMES)
                leader = (await partition_state(admin, topics[party])).leader
                in_flight = asyncio.create_task(stream(agents, ids, 6))
                await mid_round(agents[party])
                await asyncio.to_thread(kafka_cluster.kill, leader)
                COUNTERS["cluster node kills"] += 1
                moved = await wait_for(admin, topics[party], f"leader-moved:{leader}")
                print(f"killed node {leader}, leader of {party}'s inbox; now node {moved.leader}")
                results += await in_flight
                results += await stream(agents, ids, 3)  # on the cluster missing a node
                await all_nodes_up(kafka_cluster, list(topics.values()))
            judge(results, agents, d, ids)
    finally:
        await all_nodes_up(kafka_cluster, list(topics.values()))
    await audited(d, admin, results)


@pytest.mark.timeout(180 + 300 * ROLLING_RESTARTS)
async def test_rolling_restart_during_a_stream_of_rounds(kafka_cluster: LocalCluster,
                                                         tmp_path: Path) -> None:
    admin = kafka_cluster.access()
    d = make_consortium(tmp_path, admin, 3, customers=150)
    ids = query_ids(d, 60)
    topics = [p.topic for p in load_consortium(d / "consortium.toml").registry.values()]
    results: list[Result] = []
    try:
        async with running(d) as agents:
            for _ in range(ROLLING_RESTARTS):
                for node in kafka_cluster.nodes:
                    in_flight = asyncio.create_task(stream(agents, ids, 6))
                    await mid_round(agents["coordinator"])
                    await asyncio.to_thread(kafka_cluster.kill, node.node_id)
                    COUNTERS["cluster node kills"] += 1
                    await asyncio.to_thread(kafka_cluster.start_node, node.node_id)
                    # the next node goes only once this one is back in every ISR
                    for t in topics:
                        await wait_for(admin, t, "full-isr")
                    results += await in_flight
            results += await stream(agents, ids, 3)
            judge(results, agents, d, ids)
    finally:
        await all_nodes_up(kafka_cluster, topics)
    await audited(d, admin, results)


async def _line(p: AgentProcess, needle: str, after: int, timeout_s: float = 30) -> None:
    """Until the agent's log has a line with `needle` beyond its first `after` lines."""
    async with asyncio.timeout(timeout_s):
        while True:
            p.new_line.clear()
            if any(needle in line for _, line in p.lines[after:]):
                return
            await p.new_line.wait()


def _alive(procs: dict[str, AgentProcess]) -> None:
    """Fail with its last lines if an agent has exited: none may crash while Kafka is away."""
    for p in procs.values():
        if p.proc.returncode is not None:
            tail = "\n".join(line for _, line in p.lines[-30:])
            raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{tail}")


async def _results(procs: dict[str, AgentProcess], api: ApiRounds, rounds: list[str],
                   timeout_s: float) -> None:
    """Until every round has ended at bank-1's API; fails at once if any agent exits
    meanwhile."""
    exits = {asyncio.ensure_future(q.proc.wait()) for q in procs.values()}
    ended = asyncio.ensure_future(api.wait_for(rounds, timeout_s))
    try:
        await asyncio.wait({ended, *exits}, return_when=asyncio.FIRST_COMPLETED)
        _alive(procs)
        await ended
    finally:
        ended.cancel()
        for e in exits:
            e.cancel()


@pytest.mark.timeout(300 + 240 * QUORUM_LOSSES)
async def test_two_of_three_nodes_down_the_agents_wait_then_resume(
        kafka_cluster: LocalCluster, tmp_path: Path) -> None:
    admin = kafka_cluster.access()
    d = make_consortium(tmp_path, admin, 3, customers=150)
    ids = query_ids(d, 60)
    cfg = load_party(d / "bank-1.toml")
    assert cfg.consortium_key is not None
    tokens = tokenize(ids, cfg.consortium_key)
    topics = {n: p.topic for n, p in cfg.consortium.registry.items()}
    want = plaintext(d / "data")
    by_token = {bytes(t).hex(): c for t, c in zip(tokens, ids, strict=True)}
    api = ApiRounds(cfg.api_socket)

    async def ask(n: int) -> list[str]:
        return [await api.submit(ids, scope="intersection", deadline_s=180) for _ in range(n)]

    submitted: list[str] = []
    finished = False
    procs = {n: await AgentProcess.start(n, d / f"{n}.toml", admin) for n in NAMES}

    def keep_logs() -> None:  # every agent's whole log, pass or fail
        for p in procs.values():
            (tmp_path / f"{p.name}.log").write_text("\n".join(line for _, line in p.lines))

    try:
        await api.connect()
        for outage in range(QUORUM_LOSSES):
            before = await ask(4)
            await _line(procs["coordinator"], "", len(procs["coordinator"].lines))  # mid-round
            leader = (await partition_state(admin, topics["coordinator"])).leader
            other = next(n.node_id for n in kafka_cluster.nodes if n.node_id != leader)
            marks = {n: len(p.lines) for n, p in procs.items()}
            await asyncio.to_thread(kafka_cluster.kill, leader)
            await asyncio.to_thread(kafka_cluster.kill, other)
            COUNTERS["quorum losses"] += 1
            COUNTERS["cluster node kills"] += 2
            for n, p in procs.items():  # every agent says so, and waits
                await _line(p, "Kafka unavailable", marks[n])
            during = await ask(2)
            _alive(procs)
            stopped = None
            if outage == 0:  # an operator stops an agent while Kafka is away: it leaves
                stopped = "bank-3"
                async with asyncio.timeout(60):
                    assert await procs[stopped].stop(signal.SIGTERM) == 0
                COUNTERS["agents stopped while Kafka away"] += 1
            marks = {n: len(p.lines) for n, p in procs.items()}
            # no result can be made while two of three nodes are away
            assert not set(during) & api.ends.keys()
            await asyncio.to_thread(kafka_cluster.start_node, other)  # a majority again
            for n, p in procs.items():
                if n != stopped:
                    await _line(p, "Kafka available again", marks[n], 60)
            if stopped is not None:  # and starts again, from its journal and position
                procs[stopped] = await AgentProcess.start(stopped, d / f"{stopped}.toml", admin)
            await _results(procs, api, [*before, *during], 240)
            submitted += before + during
            await all_nodes_up(kafka_cluster, list(topics.values()))
        after = await ask(2)
        await _results(procs, api, after, 120)
        submitted += after
        finished = True
    except BaseException:  # what each agent said last, to tell why
        for p in procs.values():
            tail = "\n".join(line for _, line in p.lines[-20:])
            print(f"\n--- {p.name} (exit {p.proc.returncode}), last lines (all in "
                  f"{tmp_path / p.name}.log):\n{tail}")
        raise
    finally:  # the nodes first: an agent finishes the batch in hand before it stops
        keep_logs()  # before anything here can fail
        await api.close()
        await all_nodes_up(kafka_cluster, list(topics.values()))
        for p in procs.values():
            await p.stop(signal.SIGTERM if finished else signal.SIGKILL)  # stuck on a fault
        keep_logs()
    # how often the agents had to bootstrap a client again (the outages' hard part)
    for what in ("consumer replaced", "producer replaced"):
        print(f"{what}: " + ", ".join(
            f"{n} {sum(what in line for _, line in p.lines)}" for n, p in procs.items()))
    published = aborted = 0
    outcomes: dict[str, str] = {}
    for rid in submitted:
        body = api.ends[rid]
        if body["status"] == "aborted":
            assert body["reason"] == "TIMEOUT", body
            aborted += 1
            outcomes[rid] = "aborted"
            continue
        published += 1
        outcomes[rid] = "published"
        assert wrong_rows(body, want, by_token) == 0
    assert published > 0
    COUNTERS["rounds checked"] += len(submitted)
    COUNTERS["rounds aborted (typed)"] += aborted
    await every_envelope_on_the_bus(d, admin)
    run = await read_and_audit(cfg.consortium, party_access(d, admin, "auditor"))
    assert [str(f) for f in run.report.all_findings()] == []
    seen = {r.round_id.hex(): r.outcome for r in run.report.rounds}
    assert {rid: seen[rid] for rid in submitted} == outcomes  # each once, as the agent saw it
    print(f"\n{QUORUM_LOSSES} quorum losses: {published} rounds published, {aborted} aborted; "
          f"audit: {run.records} records, no finding")
