"""Key rotation while agents run: a stream of rounds, an institution's keys and the token key
rotated in the middle of it (`zerosum keys rotate`), no agent restarted. Every round ends
exact or in a typed abort, never with a wrong total, and the audit of the topics passes across
both epochs."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import pytest

from agents.agent import Agent
from agents.audit import read_and_audit
from agents.cli import main
from agents.config import load_consortium, load_party
from agents.demo import plaintext
from agents.security import KafkaAccess
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.tokens import normalise_id, tokenize, tokens_to_bytes
from tests.kafka_util import make_consortium, party_access
from tests.test_agents_kafka import ATTRS, query_ids, running

pytestmark = pytest.mark.kafka

ROUNDS = 20
IN_FLIGHT = 3
ROTATE_AFTER = 8  # rounds ended before the rotation


def exact(out: Outcome, ids: list[str], key: bytes, want: dict[str, list[Decimal]]) -> int:
    """The number of rows; AssertionError on any total that differs from the plaintext."""
    tokens = tokenize(ids, key)
    by_token = {tokens_to_bytes(tokens[i:i + 1]): c for i, c in enumerate(ids)}
    for i, t in enumerate(out.tokens):
        cid = by_token[bytes(t)]  # a token of another key would not be found: wrong rows
        holders, bal, days = (int(v) for v in out.totals[i])
        assert [Decimal(holders), Decimal(bal).scaleb(-2), Decimal(days)] == want.get(
            normalise_id(cid), [Decimal(0)] * 3), cid
    return int(out.tokens.size)


async def test_rotation_during_a_stream_of_rounds(kafka_bootstrap: KafkaAccess,
                                                  tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=80)
    cfile = d / "consortium.toml"
    ids = query_ids(d, 60)
    want = plaintext(d / "data")
    ended: list[tuple[int, Outcome | Ended]] = []
    rotated = asyncio.Event()
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int, requester: Agent) -> None:
        async with gate:
            if i >= ROTATE_AFTER + IN_FLIGHT:  # asked after the rotation
                await asyncio.wait_for(rotated.wait(), 60)
            cfg = requester.cfg  # the token key the query is made under, and its epoch
            assert cfg.consortium_key is not None
            out = await requester.submit(os.urandom(16), tokenize(ids, cfg.consortium_key),
                                         participants=cfg.consortium.institutions,
                                         attributes=ATTRS, deadline_s=30,
                                         token_epoch=cfg.token_epoch)
            assert out is not None
            if isinstance(out, Outcome):
                exact(out, ids, cfg.consortium_key, want)
            else:
                assert isinstance(out.reason, AbortReason), out
            ended.append((cfg.token_epoch, out))
            if len(ended) == ROTATE_AFTER:  # rounds still in flight at the others
                assert main(["keys", "rotate", "--config", str(cfile),
                             "--party", "bank-2"]) == 0
                assert main(["keys", "rotate", "--config", str(cfile), "--token-key"]) == 0
                rotated.set()

    async with running(d) as agents:
        names = ("bank-1", "bank-2", "bank-3")
        async with asyncio.timeout(300):
            await asyncio.gather(*(one(i, agents[names[i % 3]]) for i in range(ROUNDS)))
        # every agent took the new keys from the files, none restarted
        assert agents["bank-2"].party.me.epoch == 1
        for name in ("coordinator", *names):
            assert agents[name].cfg.consortium.registry["bank-2"].epoch == 1, name
        for name in names:
            assert agents[name].cfg.token_epoch == 1, name
    outcomes = [out for _, out in ended]
    published = [o for o in outcomes if isinstance(o, Outcome)]
    aborted = [o for o in outcomes if isinstance(o, Ended)]
    late = [out for epoch, out in ended if epoch == 1]
    print(f"\n{len(published)} published, {len(aborted)} aborted "
          f"({', '.join(sorted({o.reason.name for o in aborted})) or 'none'}); "
          f"{len(late)} under the new token key")
    assert len(outcomes) == ROUNDS
    assert late
    assert all(isinstance(o, Outcome) for o in late)
    assert len(published) >= ROUNDS - IN_FLIGHT  # only rounds in flight may abort
    # the audit over the topics: public keys of both epochs, and the coordinator's sums
    auditor = party_access(d, kafka_bootstrap, "auditor")
    public = await read_and_audit(load_consortium(cfile), auditor)
    assert [str(f) for f in public.report.all_findings()] == []
    coord = load_party(d / "coordinator.toml")
    summed = await read_and_audit(coord.consortium, auditor, key=coord.keys)
    assert [str(f) for f in summed.report.all_findings()] == []
    assert sum(r.outcome == "published" for r in summed.report.rounds) == len(published)
    assert await asyncio.to_thread(main, ["audit", "--config", str(cfile)]) == 0
