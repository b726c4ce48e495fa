"""An institution joins a running consortium: a SCRAM user, ACLs and a topic on the broker
that keeps running, and a new [parties] entry in consortium.toml that the running agents pick
up by themselves. None of them restarts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from agents.agent import Agent
from agents.config import load_consortium, load_party
from agents.kafka_admin import provision
from agents.security import KafkaAccess
from protocol.machine import Outcome
from protocol.tokens import tokenize
from tests.kafka_util import make_consortium
from tests.test_agents_kafka import ATTRS, check, query_ids, running

pytestmark = pytest.mark.kafka


async def test_an_institution_joins_without_restarting_anything(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 4, customers=80, admin_step=False)
    cfile = d / "consortium.toml"
    full_text = cfile.read_text()
    # the consortium before bank-4 joined: its [parties] entry and its data left out
    cfile.write_text(re.sub(r"\[parties\.bank-4\]\n(?:[^\[\n][^\n]*\n)*", "", full_text))
    assert "bank-4" not in load_consortium(cfile).registry
    parked = d / "bank-4.csv.parked"
    (d / "data" / "bank-4.csv").rename(parked)
    (d / "bank-4.toml").rename(d / "bank-4.toml.parked")
    provision(kafka_bootstrap, load_consortium(cfile))
    ids = query_ids(d, 60)
    async with running(d) as agents:  # coordinator, bank-1..3
        b1 = agents["bank-1"]
        key = b1.cfg.consortium_key
        assert key is not None
        three = await b1.submit(b"\x01" * 16, tokenize(ids, key),
                                participants=("bank-1", "bank-2", "bank-3"), attributes=ATTRS,
                                deadline_s=60)
        check(three, ids, d)
        # bank-4 joins: the admin provisions it, the consortium file lists it
        parked.rename(d / "data" / "bank-4.csv")
        (d / "bank-4.toml.parked").rename(d / "bank-4.toml")
        cfile.write_text(full_text)
        provision(kafka_bootstrap, load_consortium(cfile))
        newcomer = Agent(load_party(d / "bank-4.toml"))
        task = asyncio.create_task(newcomer.run())
        try:
            async with asyncio.timeout(60):
                await newcomer.ready.wait()
            four = await b1.submit(b"\x02" * 16, tokenize(ids, key),
                                   participants=("bank-1", "bank-2", "bank-3", "bank-4"),
                                   attributes=ATTRS, deadline_s=60)
        finally:
            newcomer.stop()
            await task
        assert isinstance(four, Outcome), four
        check(four, ids, d)  # bank-4's values are in the totals now
        assert int(four.totals[:, 0].max()) >= 1
        for name in ("coordinator", "bank-2", "bank-3"):
            assert "bank-4" in agents[name].cfg.consortium.registry, name
