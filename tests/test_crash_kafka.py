"""kill -9 of the coordinator, the leader or an institution at random points of a stream of
rounds (half of them exactly between a produce and its offset commit): every round ends in
exactly one of a correct total or a typed abort, and restarts resume from the topics."""

from __future__ import annotations

import asyncio
import random
import signal
from decimal import Decimal
from pathlib import Path

import msgpack
import pytest

from agents.agent import load_outcome, read_to_end
from agents.bench import AgentProcess
from agents.config import load_party
from agents.demo import plaintext
from agents.run import spool_request
from agents.security import KafkaAccess
from protocol.envelope import Header, digest
from protocol.messages import MessageKind, Scope
from protocol.tokens import normalise_id, tokenize
from tests.kafka_util import make_consortium
from tests.soak import COUNTERS, KILLS
from tests.test_agents_kafka import query_ids

pytestmark = pytest.mark.kafka
NAMES = ("coordinator", "bank-1", "bank-2", "bank-3")


async def _next_line(p: AgentProcess, timeout_s: float = 30) -> None:
    p.new_line.clear()
    async with asyncio.timeout(timeout_s):
        await p.new_line.wait()


async def _results(p: AgentProcess, results: Path, rounds: list[bytes]) -> None:
    """Wait until every round has a result file; woken by the agent's log lines (it logs after
    writing each file), the event cleared before each look so that no wake-up is lost."""
    pending = set(rounds)
    while True:
        p.new_line.clear()
        pending = {r for r in pending if not (results / f"{r.hex()}.json").exists()}
        if not pending:
            return
        await p.new_line.wait()


async def test_kill_9_at_random_points_of_a_stream(kafka_bootstrap: KafkaAccess,
                                                   tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=150)
    ids = query_ids(d, 60)
    cfg = load_party(d / "bank-1.toml")
    assert cfg.consortium_key is not None
    tokens = tokenize(ids, cfg.consortium_key)
    by_token = {bytes(t): c for t, c in zip(tokens, ids, strict=True)}
    want = plaintext(d / "data")
    rng = random.Random(20261124)
    procs = {n: await AgentProcess.start(n, d / f"{n}.toml", kafka_bootstrap) for n in NAMES}
    submitted: list[bytes] = []
    try:
        for k in range(KILLS):
            victim = rng.choice(NAMES)
            between_produce_and_commit = k % 2 == 0
            if between_produce_and_commit:  # restart it armed: it dies after its n-th batch
                await procs[victim].stop()
                procs[victim] = await AgentProcess.start(
                    victim, d / f"{victim}.toml", kafka_bootstrap,
                    env={"ZEROSUM_FAILPOINT_CRASH_AFTER_FLUSHES": str(rng.randint(1, 3))})
            for _ in range(4):
                submitted.append(spool_request(cfg, tokens, participants=cfg.consortium
                                               .institutions, scope=Scope.INTERSECTION,
                                               min_holders=1, timeout_s=40))
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
            COUNTERS["kills survived"] += 1
        results = d / "state" / "bank-1" / "results"
        async with asyncio.timeout(120):
            await _results(procs["bank-1"], results, submitted)
    finally:
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
    for rid in submitted:
        data, got, totals = load_outcome(results / f"{rid.hex()}.json")
        if data["status"] == "aborted":
            assert data["reason"] in ("TIMEOUT", "EQUIVOCATION"), data
            aborted += 1
            continue
        assert got is not None
        assert totals is not None
        published += 1
        for t, row in zip(got, totals.tolist(), strict=True):
            exp = want[normalise_id(by_token[bytes(t)])]
            got_row = [Decimal(row[0]), Decimal(row[1]).scaleb(-2), Decimal(row[2])]
            wrong += got_row != exp
    COUNTERS["rounds checked"] += len(submitted)
    COUNTERS["rounds aborted (typed)"] += aborted
    COUNTERS["wrong totals"] += wrong
    COUNTERS["rounds lost"] += len(submitted) - published - aborted
    print(f"\n{KILLS} kills: {published} rounds published, {aborted} aborted, {wrong} wrong")
    assert wrong == 0
    assert published + aborted == len(submitted)
    assert published > 0
