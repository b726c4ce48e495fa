"""Agents on the real broker: each party its own Agent with its own Kafka clients."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from agents.agent import Agent
from agents.config import load_party
from agents.demo import plaintext
from agents.kafka_bus import read_to_end
from agents.run import agents_in_process, party_configs
from agents.security import KafkaAccess
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.messages import MaskMode, Scope
from protocol.tokens import normalise_id, tokenize, tokens_to_bytes
from tests.kafka_util import make_consortium

pytestmark = pytest.mark.kafka
ATTRS = ("balance", "overdue_days")



@contextlib.asynccontextmanager
async def running(directory: Path, skip: tuple[str, ...] = (), *,
                  api: bool = False) -> AsyncIterator[dict[str, Agent]]:
    """Every party of the consortium in `directory` (but `skip`) as an in-process agent,
    institutions with their local API when `api`."""
    configs = [c for c in party_configs(directory) if c.party not in skip]
    async with agents_in_process(configs, api=api) as agents:
        yield agents


def check(outcome: Outcome | Ended | None, ids: list[str], directory: Path) -> int:
    """Every published row equals the plaintext sum; returns the number of rows."""
    assert isinstance(outcome, Outcome), outcome
    key = bytes.fromhex((directory / "keys" / "bank-1" / "consortium.key").read_text()
                        .split('"')[1])
    tokens = tokenize(ids, key)
    by_token = {tokens_to_bytes(tokens[i:i + 1]): c for i, c in enumerate(ids)}
    want = plaintext(directory / "data")
    for i, t in enumerate(outcome.tokens):
        cid = by_token[bytes(t)]
        holders, bal, days = (int(v) for v in outcome.totals[i])
        exp = want.get(normalise_id(cid), [Decimal(0)] * 3)
        assert [Decimal(holders), Decimal(bal).scaleb(-2), Decimal(days)] == exp, cid
    return int(outcome.tokens.size)


def query_ids(directory: Path, k: int = 200) -> list[str]:
    ids = set()
    for f in (directory / "data").glob("*.csv"):
        with open(f, newline="") as fh:
            ids |= {r["customer_id"] for r in csv.DictReader(fh)}
    return [*sorted(ids)[:k], "CUST-NOBODY-1", "CUST-NOBODY-2"]


async def submit(agent: Agent, ids: list[str], scope: Scope = Scope.INTERSECTION, *,
                 deadline_s: float = 60) -> Outcome | Ended | None:
    key = agent.cfg.consortium_key
    assert key is not None
    return await agent.submit(os.urandom(16), tokenize(ids, key),
                              participants=agent.cfg.consortium.institutions, attributes=ATTRS,
                              scope=scope, deadline_s=deadline_s)


@pytest.mark.parametrize("n", [2, 3, 7])
async def test_rounds_equal_plaintext_totals(kafka_bootstrap: KafkaAccess, tmp_path: Path,
                                             n: int) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, n)
    ids = query_ids(d)
    async with running(d) as agents:
        for scope in Scope:
            out = await submit(agents["bank-1"], ids, scope)
            rows = check(out, ids, d)
            assert rows > 0
            if scope is Scope.QUERY:
                assert isinstance(out, Outcome)
                assert rows + out.withheld == len(ids)


async def test_pairwise_masks_on_kafka_with_an_audit(kafka_bootstrap: KafkaAccess,
                                                     tmp_path: Path) -> None:
    """A consortium with pairwise masks: exact totals, and the coordinator-key audit still
    re-adds every sum (it needs no mask: the masks cancel in the sum)."""
    from agents.audit import read_and_audit
    from agents.config import load_party
    from tests.kafka_util import party_access

    d = make_consortium(tmp_path, kafka_bootstrap, 4, masks=MaskMode.PAIRWISE)
    ids = query_ids(d)
    async with running(d) as agents:
        assert agents["coordinator"].cfg.consortium.round_policy().masks is MaskMode.PAIRWISE
        for scope in Scope:
            check(await submit(agents["bank-2"], ids, scope), ids, d)
    cfg = load_party(d / "coordinator.toml")
    run = await read_and_audit(cfg.consortium, party_access(d, kafka_bootstrap, "auditor"),
                               key=cfg.keys)
    assert [str(f) for f in run.report.all_findings()] == []
    assert [r.outcome for r in run.report.rounds] == ["published", "published"]
    assert {r.verified for r in run.report.rounds} == {"coordinator"}  # sums re-added


async def test_50_consecutive_and_20_concurrent_rounds(kafka_bootstrap: KafkaAccess,
                                                       tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=200)
    ids = query_ids(d, 100)
    async with running(d) as agents:
        banks = [agents[f"bank-{i}"] for i in (1, 2, 3)]
        for r in range(50):
            check(await submit(banks[r % 3], ids), ids, d)
        results = await asyncio.gather(*(submit(banks[r % 3], ids, Scope.QUERY)
                                         for r in range(20)))
        assert sum(check(o, ids, d) for o in results) > 0
        assert agents["coordinator"].stats.published == 70
        assert agents["coordinator"].stats.aborted == 0


async def test_raw_topics_hold_no_plaintext(kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=150)
    ids = query_ids(d, 150)
    async with running(d) as agents:
        for scope in Scope:
            check(await submit(agents["bank-2"], ids, scope), ids, d)
        topics = [p.topic for p in agents["bank-1"].cfg.consortium.registry.values()]
    dump = b"".join([r.value async for r in read_to_end(kafka_bootstrap, topics)])
    assert len(dump) > 10_000
    leaks = [c for c in ids[:150] if c.encode() in dump]
    with open(d / "data" / "bank-1.csv", newline="") as fh:
        balances = [r["balance"] for r in csv.DictReader(fh)]
    leaks += [b for b in balances if len(b) > 7 and b.encode() in dump]
    leaks += [b for b in balances
              if abs(int(Decimal(b) * 100)) > 10**6
              and int(Decimal(b) * 100).to_bytes(8, "little", signed=True) in dump]
    assert leaks == []


async def test_round_cli_prints_totals_and_reports_aborts(kafka_bootstrap: KafkaAccess,
                                                          tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3)
    ids = query_ids(d, 50)
    q = tmp_path / "q.csv"
    q.write_text("customer_id\n" + "\n".join(ids) + "\n")
    out_csv = tmp_path / "r.csv"
    exe = Path(sys.executable).parent / "zerosum"
    async with running(d, api=True):
        proc = await asyncio.create_subprocess_exec(
            str(exe), "round", "--config", str(d / "bank-1.toml"), "--query", str(q),
            "--out", str(out_csv), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(120):
            stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert "published" in stdout.decode()
        want = plaintext(d / "data")
        with open(out_csv, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rows
        for r in rows:
            exp = want[normalise_id(r["customer_id"])]
            assert [Decimal(r["holders"]), Decimal(r["balance"]),
                    Decimal(r["overdue_days"])] == exp
        # a stranger among the participants, and a subset where the policy allows none
        for parts, reason in (("bank-1,bank-9", "'bank-9' is not an institution"),
                              ("bank-1,bank-2", "subsets are not allowed")):
            proc = await asyncio.create_subprocess_exec(
                str(exe), "round", "--config", str(d / "bank-1.toml"), "--query", str(q),
                "--participants", parts, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(120):
                _, stderr = await proc.communicate()
            assert proc.returncode == 1
            assert "policy" in stderr.decode()
            assert reason in stderr.decode(), stderr.decode()


async def test_restarting_an_institution_mid_stream(kafka_bootstrap: KafkaAccess,
                                                    tmp_path: Path) -> None:
    """Stop bank-2 while rounds stream; restart it: every round ends correct or aborted."""
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=200)
    ids = query_ids(d, 100)
    async with running(d, skip=("bank-2",)) as agents:
        cfg = load_party(d / "bank-2.toml")
        outcomes: list[Outcome | Ended | None] = []
        for cycle in range(3):
            b2 = Agent(cfg)
            task = asyncio.create_task(b2.run())
            async with asyncio.timeout(60):
                await b2.ready.wait()
            coord = agents["coordinator"]
            seen = coord.stats.received
            pending = [asyncio.create_task(submit(agents["bank-1"], ids, deadline_s=8))
                       for _ in range(4)]
            # mid-stream: the coordinator has the requests when bank-2 stops
            await coord.wait_until(lambda: coord.stats.received >= seen + 4,  # noqa: B023
                                   30)
            b2.stop()
            await task
            if cycle == 2:
                b2 = Agent(cfg)
                task = asyncio.create_task(b2.run())
            outcomes += await asyncio.gather(*pending)
            if cycle == 2:
                b2.stop()
                await task
        for o in outcomes:
            if isinstance(o, Outcome):
                check(o, ids, d)
            else:
                assert isinstance(o, Ended)
                assert o.reason in (AbortReason.TIMEOUT,)
        assert len(outcomes) == 12
        assert agents["coordinator"].stats.published + agents["coordinator"].stats.aborted == 12


async def test_a_round_of_200000_customers_by_4_attributes_chunked(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    from protocol.envelope import CHUNK_BYTES
    from protocol.fixedpoint import AttributeSpec

    specs = (AttributeSpec("balance", 2, -10**13, 10**13),
             AttributeSpec("limit", 2, 0, 10**13),
             AttributeSpec("overdue_days", 0, 0, 36_500),
             AttributeSpec("rate", 4, -10**6, 10**6))
    names = tuple(s.name for s in specs)
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=200_000, attributes=specs)
    ids = [f"CUST-{i:08d}" for i in range(0, 400_000, 2)]  # 200,000 customers asked
    async with running(d) as agents:
        b1 = agents["bank-1"]
        assert b1.cfg.consortium_key is not None
        out = await b1.submit(
            os.urandom(16), tokenize(ids, b1.cfg.consortium_key),
            participants=b1.cfg.consortium.institutions, attributes=names,
            scope=Scope.QUERY, min_holders=1, deadline_s=300)
        sent = {n: a.stats.sent for n, a in agents.items()}
    assert isinstance(out, Outcome), out
    # every query customer is a row; the consortium's floor (1 holder) withholds the unheld
    assert out.tokens.size + out.withheld == 200_000
    assert out.totals.shape == (out.tokens.size, 5)
    assert out.withheld > 0
    # E_S alone is 200,000 x 5 x 8 bytes: it had to travel in chunks
    assert CHUNK_BYTES < 200_000 * 5 * 8
    assert max(sent.values()) > 8
    want = plaintext(d / "data", names)
    key = bytes.fromhex((d / "keys" / "bank-1" / "consortium.key").read_text().split('"')[1])
    tokens = tokenize(ids, key)
    row_of = {tokens_to_bytes(tokens[i:i + 1]): i for i in range(len(ids))}
    zero = [Decimal(0)] * 5
    for r, t in enumerate(out.tokens):
        cid = ids[row_of[bytes(t)]]
        got = [Decimal(int(v)).scaleb(-s) for v, s in
               zip(out.totals[r], (0, *(sp.scale for sp in specs)), strict=True)]
        assert got == want.get(normalise_id(cid), zero), cid


async def _start_process(config: Path) -> asyncio.subprocess.Process:
    exe = Path(sys.executable).parent / "zerosum"
    proc = await asyncio.create_subprocess_exec(
        str(exe), "institution", "--config", str(config), stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    async with asyncio.timeout(60):  # wait for its "serving" line, not for a fixed time
        while b" serving" not in (line := await proc.stderr.readline()):
            assert line, "the agent exited before it was ready"
    return proc


async def test_sigterm_to_an_institution_process_mid_stream(kafka_bootstrap: KafkaAccess,
                                                            tmp_path: Path) -> None:
    import signal

    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=200)
    ids = query_ids(d, 100)
    results: list[Outcome | Ended | None] = []
    async with running(d, skip=("bank-2",)) as agents:
        for _ in range(3):
            proc = await _start_process(d / "bank-2.toml")
            coord = agents["coordinator"]
            seen = coord.stats.received
            stream = [asyncio.create_task(submit(agents["bank-1"], ids, deadline_s=15))
                      for _ in range(5)]
            # mid-stream: the coordinator has the requests when bank-2 gets SIGTERM
            await coord.wait_until(lambda: coord.stats.received >= seen + 5,  # noqa: B023
                                   30)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                assert await proc.wait() == 0  # a graceful stop
            proc = await _start_process(d / "bank-2.toml")  # and back, from the topics
            results += await asyncio.gather(*stream)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                assert await proc.wait() == 0
        coordinator = agents["coordinator"].stats
    assert len(results) == 15
    published = [r for r in results if isinstance(r, Outcome)]
    for r in results:
        if isinstance(r, Outcome):
            check(r, ids, d)
        else:
            assert isinstance(r, Ended)
            assert r.reason is AbortReason.TIMEOUT
    assert len({r.round_id for r in results if r is not None}) == 15
    assert coordinator.published == len(published)
    assert coordinator.published + coordinator.aborted == 15
    assert published, "no round survived the restarts"


async def test_a_state_dir_without_a_position_resumes_from_the_group_offset(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    """A state directory of a version that kept its position only as the consumer group's
    committed offset: the agent takes that offset once, replays below it quietly (sending
    nothing again) and saves it in `inbox.position` from then on."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from tests.kafka_util import party_access

    d = make_consortium(tmp_path, kafka_bootstrap, 2, customers=60)
    ids = query_ids(d, 30)
    async with running(d) as agents:
        check(await submit(agents["bank-1"], ids), ids, d)
    cfg = load_party(d / "bank-2.toml")
    position = cfg.state_dir / "inbox.position"
    handled = int.from_bytes(position.read_bytes(), "big")
    assert handled > 0
    position.unlink()
    group = AIOKafkaConsumer(**party_access(d, kafka_bootstrap, "bank-2").aiokafka_kwargs(),
                             group_id=f"zerosum.{cfg.consortium.id}.bank-2",
                             enable_auto_commit=False)
    await group.start()
    try:
        tp = TopicPartition(cfg.topic, 0)
        group.assign([tp])
        await group.commit({tp: handled})
    finally:
        await group.stop()
    async with running(d) as agents:
        b2 = agents["bank-2"]
        assert b2.stats.replayed == handled  # every input below it rebuilt, quietly
        assert b2.stats.sent == 0
        assert int.from_bytes(position.read_bytes(), "big") == handled
        check(await submit(agents["bank-1"], ids), ids, d)
        assert b2.stats.sent > 0  # and after the replay, it takes part as before
