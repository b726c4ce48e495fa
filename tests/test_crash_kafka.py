"""kill -9 of the coordinator, the leader or an institution at random points of a stream of
rounds (half of them exactly between a produce and its offset commit): every round ends in
exactly one of a correct total or a typed abort, and restarts resume from the topics."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from agents.bench import AgentProcess
from agents.config import load_party
from agents.demo import plaintext
from agents.kafka_bus import read_to_end
from agents.security import KafkaAccess
from protocol.envelope import Header, digest
from protocol.messages import MessageKind
from protocol.tokens import tokenize
from tests.api_rounds import ApiRounds, NotAccepted, wrong_rows
from tests.kafka_util import make_consortium
from tests.soak import COUNTERS, KILLS
from tests.test_agents_kafka import query_ids

pytestmark = pytest.mark.kafka
NAMES = ("coordinator", "bank-1", "bank-2", "bank-3")


async def _next_line(p: AgentProcess, timeout_s: float = 30) -> None:
    p.new_line.clear()
    async with asyncio.timeout(timeout_s):
        await p.new_line.wait()


async def test_kill_9_at_random_points_of_a_stream(kafka_bootstrap: KafkaAccess,
                                                   tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=150)
    ids = query_ids(d, 60)
    cfg = load_party(d / "bank-1.toml")
    assert cfg.consortium_key is not None
    tokens = tokenize(ids, cfg.consortium_key)
    by_token = {bytes(t).hex(): c for t, c in zip(tokens, ids, strict=True)}
    want = plaintext(d / "data")
    rng = random.Random(20261124)
    procs = {n: await AgentProcess.start(n, d / f"{n}.toml", kafka_bootstrap) for n in NAMES}
    api = ApiRounds(cfg.api_socket)  # the requester's API, again after each of its restarts
    await api.connect()
    accepted: list[str] = []
    not_accepted = 0
    try:
        for k in range(KILLS):
            victim = rng.choice(NAMES)
            between_produce_and_commit = k % 2 == 0
            if between_produce_and_commit:  # restart it armed: it dies after its n-th batch
                await procs[victim].stop()
                procs[victim] = await AgentProcess.start(
                    victim, d / f"{victim}.toml", kafka_bootstrap,
                    env={"ZEROSUM_FAILPOINT_CRASH_AFTER_FLUSHES": str(rng.randint(1, 3))})
                if victim == "bank-1":
                    await api.connect()
            for _ in range(4):
                try:
                    accepted.append(await api.submit(ids, scope="intersection",
                                                     deadline_s=40))
                except NotAccepted:  # bank-1 died before it accepted: the client is told
                    not_accepted += 1
            if between_produce_and_commit:
                async with asyncio.timeout(60):
                    code = await procs[victim].proc.wait()
                assert code == 137, f"{victim} did not reach its failpoint"
                await procs[victim].stop()
            else:
                await _next_line(procs[victim])  # it is mid-stream: kill it now
                await procs[victim].stop(signal.SIGKILL)
            procs[victim] = await AgentProcess.start(victim, d / f"{victim}.toml",
                                                     kafka_bootstrap)
            if victim == "bank-1":  # its results record delivers what ended before the kill
                await api.connect()
            COUNTERS["kills survived"] += 1
        # every round whose request reached the coordinator ends, exact or typed; a round
        # accepted by an agent killed before it journaled the request never started (its
        # client lost the connection)
        coordinator_topic = cfg.consortium.registry["coordinator"].topic
        requested = {h.round_id.hex() async for h in _headers(kafka_bootstrap,
                                                              [coordinator_topic])
                     if h.kind is MessageKind.ROUND_REQUEST}
        sent = [rid for rid in accepted if rid in requested]
        await api.wait_for(sent, 120)
    finally:
        await api.close()
        for p in procs.values():
            await p.stop()
    # a message re-sent after a crash is the journaled envelope itself: never a second copy
    # sealed anew (a timer's abort after a restart is the one exception, see the README)
    copies: dict[tuple[object, ...], set[bytes]] = {}
    topics = [pp.topic for pp in cfg.consortium.registry.values()]
    async for r in read_to_end(kafka_bootstrap, topics):
        h = Header.decode(msgpack.unpackb(r.value)[1])
        if h.kind is not MessageKind.ROUND_ABORT:
            copies.setdefault((h.sender, h.recipient, h.round_id, h.kind, h.part),
                              set()).add(digest(r.value))
    twice = [k for k, v in copies.items() if len(v) > 1]
    assert not twice, f"{len(twice)} messages went out twice with different bytes: {twice[:3]}"
    published = aborted = wrong = 0
    for rid in sent:
        body = api.ends[rid]
        if body["status"] == "aborted":
            assert body["reason"] in ("TIMEOUT", "EQUIVOCATION"), body
            aborted += 1
            continue
        published += 1
        wrong += wrong_rows(body, want, by_token)
    COUNTERS["rounds checked"] += len(sent)
    COUNTERS["rounds aborted (typed)"] += aborted
    COUNTERS["wrong totals"] += wrong
    COUNTERS["rounds lost"] += len(sent) - published - aborted
    print(f"\n{KILLS} kills: {published} rounds published, {aborted} aborted, {wrong} wrong; "
          f"{len(accepted) - len(sent)} accepted and {not_accepted} refused by a requester "
          f"killed before it sent them; {api.copies} results delivered twice")
    assert wrong == 0
    assert published + aborted == len(sent)
    assert published > 0
    assert len(sent) >= len(accepted) // 2  # most rounds were asked of a live agent


async def _headers(kafka: KafkaAccess, topics: list[str]) -> AsyncIterator[Header]:
    async for r in read_to_end(kafka, topics):
        yield Header.decode(msgpack.unpackb(r.value)[1])
