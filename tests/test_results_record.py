"""The results record of an institution agent's API (`agents.api.agent_service`): the end of a
round asked here stays on disk until it has reached a client; a torn or foreign record never
stops the agent; only rounds this agent asked for get one. The agent is a stub here: the
record's life does not depend on Kafka (the kill -9 test runs it on the real broker)."""

from __future__ import annotations

import asyncio
import logging
import os
import types
from pathlib import Path
from typing import cast

import numpy as np

from agents.agent import Agent, RoundEnd
from agents.api.agent_service import AgentService, load_records, mark_asked, write_records
from agents.api.scheduler import RoundScheduler
from agents.api.server import ApiServer, ApiSettings
from agents.api.service import Delivery
from protocol.errors import AbortReason
from protocol.fixedpoint import AttributeSpec
from protocol.machine import Ended, Outcome
from protocol.tokens import tokenize
from tests.test_api import running
from zerosum import Client, Role

KEY = bytes(range(32))
SPECS = (AttributeSpec("debt", 2, 0, 10**9),)
WAIT_S = 20.0


def stub_agent(state: Path) -> Agent:
    cfg = types.SimpleNamespace(is_coordinator=False, consortium_key=KEY, party="bank-1",
                                state_dir=state)
    return cast(Agent, types.SimpleNamespace(cfg=cfg, listeners=[],
                                             log=logging.getLogger("zerosum.test")))


def published(rid: bytes, requester: str = "bank-1") -> Outcome:
    return Outcome(rid, tokenize(["CUST-1", "CUST-2"], KEY),
                   np.array([[1, 100], [2, 250]], dtype=np.int64), SPECS, 0, requester)


def on_disk(state: Path) -> set[str]:
    return {p.stem for p in (state / "results").glob("*.json")}


async def test_left_over_records_stay_on_disk_until_a_subscriber_has_them(
        tmp_path: Path) -> None:
    rids = [os.urandom(16) for _ in range(3)]
    write_records(tmp_path / "results", [
        Delivery(rids[0], frozenset({Role.REQUESTER}), published(rids[0])),
        *(Delivery(r, frozenset({Role.REQUESTER}), Ended(r, AbortReason.TIMEOUT, "t", ()))
          for r in rids[1:])])
    for _ in range(2):  # an agent that starts and stops with nobody subscribed keeps them
        service = AgentService(stub_agent(tmp_path))
        server = ApiServer(RoundScheduler(service), ApiSettings(tmp_path / "api.sock"))
        async with running(server):
            pass
        assert on_disk(tmp_path) == {r.hex() for r in rids}
    service = AgentService(stub_agent(tmp_path))
    server = ApiServer(RoundScheduler(service), ApiSettings(tmp_path / "api.sock"))
    async with running(server), Client(tmp_path / "api.sock") as client:
        got = []
        async with asyncio.timeout(WAIT_S):
            async for d in client.results():
                got.append(d)
                if len(got) == 3:
                    break
            await service.removals()  # each `taken` as its frame was written
        assert on_disk(tmp_path) == set()
    assert {d.round_id for d in got} == {r.hex() for r in rids}
    [pub] = [d.result for d in got if d.result is not None]
    assert [(r.token, r.holders, str(r.totals["debt"])) for r in pub.rows] == [
        (bytes(t).hex(), h, v) for t, h, v in zip(tokenize(["CUST-1", "CUST-2"], KEY),
                                                   (1, 2), ("1.00", "2.50"), strict=True)]


def test_a_torn_record_is_logged_and_left_the_agent_starts(tmp_path: Path,
                                                           caplog: object) -> None:
    good, torn = os.urandom(16), os.urandom(16)
    write_records(tmp_path / "results", [
        Delivery(r, frozenset({Role.REQUESTER}), published(r)) for r in (good, torn)])
    (tmp_path / "results" / f"{torn.hex()}.totals.npy").write_bytes(b"")
    (tmp_path / "results" / f"{os.urandom(16).hex()}.json").write_text("{not json")
    records = load_records(tmp_path / "results", "bank-1", logging.getLogger("t"))
    assert [d.round_id for d in records] == [good]
    service = AgentService(stub_agent(tmp_path))  # does not raise
    assert len(service._left_over) == 1
    assert torn.hex() in on_disk(tmp_path)  # left for an operator to look at


async def test_only_rounds_asked_here_get_a_record_and_the_requester_role(
        tmp_path: Path) -> None:
    asked, foreign = os.urandom(16), os.urandom(16)
    mark_asked(tmp_path / "results", asked)  # by this agent before a restart, as `submit` does
    agent = stub_agent(tmp_path)
    service = AgentService(agent)
    listener = service.deliveries()
    [on_ends] = agent.listeners
    # a (hostile) coordinator names bank-1 as requester of a round it never asked for
    await on_ends([RoundEnd(published(asked), "bank-1", "bank-2"),
                   RoundEnd(published(foreign), "bank-1", "bank-2"),
                   RoundEnd(Ended(os.urandom(16), AbortReason.POLICY, "p", ()), None, None)])
    async with asyncio.timeout(WAIT_S):
        got = [await anext(listener) for _ in range(3)]
    assert [d.roles for d in got] == [frozenset({Role.REQUESTER}),
                                      frozenset({Role.CONTRIBUTOR}),
                                      frozenset({Role.CONTRIBUTOR})]
    assert on_disk(tmp_path) == {asked.hex()}
    service.taken(foreign)  # not its record: nothing happens
    service.taken(asked)
    async with asyncio.timeout(WAIT_S):
        await service.removals()
    assert on_disk(tmp_path) == set()
    assert list((tmp_path / "results").glob("*")) == []
