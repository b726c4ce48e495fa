"""Restart in time independent of history: an agent replays its inbox only from its checkpoint
(the first input of the oldest round not ended), with the differencing guard's earlier sets
restored from it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents.checkpoint import CheckpointFile
from agents.run import agents_in_process, party_configs
from agents.security import KafkaAccess
from protocol.policy import DifferencingGuard
from tests.kafka_util import make_consortium
from tests.test_agents_kafka import check, query_ids, submit


def test_the_guard_as_of_a_position_and_back() -> None:
    g = DifferencingGuard(10)
    for pos, parts in ((3, ("a", "b", "c")), (7, ("a", "b")), (12, ("c", "d"))):
        g.position = pos
        g.record(parts)
    assert g.before(10) == [(3, ["a", "b", "c"]), (7, ["a", "b"])]
    h = DifferencingGuard(10)
    assert h.problem(("a", "b")) == ""  # nothing recorded: nothing to difference against
    h.restore(g.before(5))
    assert "c" in h.problem(("a", "b"))  # (a,b,c) - (a,b) = c: the restored set counts
    h.restore(g.before(10))
    assert h.problem(("a", "b")) == ""  # the same set again adds nothing


@pytest.mark.kafka
async def test_a_restart_replays_only_what_is_in_flight(kafka_bootstrap: KafkaAccess,
                                                        tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=60)
    ids = query_ids(d, 10)
    async with agents_in_process(party_configs(d)) as agents:
        for r in range(12):
            check(await submit(agents[f"bank-{1 + r % 3}"], ids), ids, d)
        handled = {n: a.stats.received for n, a in agents.items()}
    for n in agents:
        cp, why = CheckpointFile(d / "state" / n).load()
        assert cp is not None, why
    async with agents_in_process(party_configs(d)) as again:
        replayed = {n: a.stats.replayed for n, a in again.items()}
        async with asyncio.timeout(120):
            check(await submit(again["bank-2"], ids), ids, d)
    assert all(v >= 12 for v in handled.values()), handled  # a history to replay...
    assert replayed == dict.fromkeys(replayed, 0)  # ...and none of it was
    # without its checkpoint, an agent replays its whole inbox (the old way, still right)
    (d / "state" / "coordinator" / "inbox.checkpoint").unlink()
    async with agents_in_process(party_configs(d)) as full:
        assert full["coordinator"].stats.replayed >= handled["coordinator"]
        async with asyncio.timeout(120):
            check(await submit(full["bank-3"], ids), ids, d)
