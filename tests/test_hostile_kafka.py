"""Hostile input through a raw Kafka producer: each is rejected with its typed reason, the agents
keep running, and rounds end as the protocol says."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from agents.agent import Agent
from agents.config import load_party
from agents.kafka_bus import read_to_end
from agents.security import KafkaAccess
from protocol.codec import encode
from protocol.driver import keys_for
from protocol.envelope import Chain, Header, seal
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.messages import MessageKind, Scope
from protocol.party import InstitutionParty
from protocol.tokens import LocalTable, tokenize
from tests.kafka_util import make_consortium, produce
from tests.samples import junk_contribution
from tests.soak import COUNTERS, FULL
from tests.test_agents_kafka import ATTRS, check, query_ids, running

pytestmark = pytest.mark.kafka


async def _records(bootstrap: KafkaAccess, topic: str) -> list[bytes]:
    return [bytes(r.value) async for r in read_to_end(bootstrap, [topic])]


async def test_hostile_envelopes_are_rejected_typed_and_agents_keep_running(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3)
    ids = query_ids(d, 80)
    async with running(d) as agents:
        b1, coord = agents["bank-1"], agents["coordinator"]
        key = b1.cfg.consortium_key
        assert key is not None
        parts = b1.cfg.consortium.institutions

        async def honest() -> None:
            out = await b1.submit(os.urandom(16), tokenize(ids, key), participants=parts,
                                  attributes=ATTRS, scope=Scope.INTERSECTION, deadline_s=30)
            check(out, ids, d)

        await honest()
        c = b1.cfg.consortium
        topic = c.registry["coordinator"].topic
        history = await _records(kafka_bootstrap, topic)
        from_bank2 = next(w for w in history
                          if Header.decode(msgpack.unpackb(w)[1]).sender == "bank-2")
        h2 = Header.decode(msgpack.unpackb(from_bank2)[1])
        bank2 = load_party(d / "bank-2.toml").keys
        mallory, _ = keys_for("mallory", b"evil")
        impostor = type(mallory)("bank-1", mallory.signing_key, mallory.kem, mallory.kem_key,
                                 mallory.secret)
        outer = msgpack.unpackb(history[0])

        def sealed(sender: object, recipient: str, chain: Chain,
                   rid: bytes | None = None) -> bytes:
            rid = rid or os.urandom(16)
            body = encode(junk_contribution(rid))
            [w] = seal(body, sender=sender, recipient=c.registry[recipient],  # type: ignore[arg-type]
                       consortium=c.id, round_id=rid, kind=MessageKind.CONTRIBUTION,
                       chain=chain)
            return w

        cases: list[tuple[str, bytes, str]] = [
            ("malformed msgpack", b"\xc1\xc1\xc1\xc1", "MalformedMessage"),
            ("truncated", history[1][: len(history[1]) // 2], "MalformedMessage"),
            ("oversized", msgpack.packb([1, b"h", os.urandom(1_100_000), b"s"]),
             "MessageTooLarge"),
            ("deeply nested", b"\x91" * 100_000 + b"\xc0", "MalformedMessage"),
            ("unknown version", msgpack.packb([9, *outer[1:]]), "UnsupportedVersion"),
            ("wrong round", sealed(bank2, "coordinator", Chain(h2.seq + 10_000)),
             "UnknownRound"),
            ("wrong recipient", sealed(bank2, "bank-1", Chain(h2.seq + 20_000)),
             "WrongRecipient"),
            ("forged signature", sealed(impostor, "coordinator", Chain()), "BadSignature"),
            ("two messages, one sequence number",
             sealed(bank2, "coordinator", Chain(h2.seq, h2.prev), h2.round_id),
             "EquivocationError"),
        ]
        def rejected(reason: str) -> int:
            return coord.stats.rejected_by_reason.get(reason, 0)

        for name, wire, reason in cases:
            before = rejected(reason)
            await produce(kafka_bootstrap, topic, [wire])
            try:
                await coord.wait_until(lambda: rejected(reason) > before,  # noqa: B023
                                       20)
            except TimeoutError as exc:
                raise AssertionError(f"{name}: not rejected as {reason}") from exc
            COUNTERS["hostile inputs tried"] += 1
        dups = coord.stats.duplicates
        await produce(kafka_bootstrap, topic, [history[0]])  # an old valid envelope again
        await coord.wait_until(lambda: coord.stats.duplicates > dups, 20)
        COUNTERS["hostile inputs tried"] += 1
        await honest()  # the agents kept running and still compute exact totals


async def test_values_out_of_their_declared_range_abort_the_round(kafka_bootstrap: KafkaAccess,
                                                                  tmp_path: Path) -> None:
    """A member whose data breaks the declared bounds: the coordinator aborts, never publishes."""
    d = make_consortium(tmp_path, kafka_bootstrap, 3)
    ids = query_ids(d, 80)
    async with running(d, skip=("bank-3",)) as agents:
        rogue = Agent(load_party(d / "bank-3.toml"))
        key = rogue.cfg.consortium_key
        assert key is not None
        huge = 10**15  # balance max is 10**13 cents
        bad = LocalTable.build(tokenize(ids, key),
                               np.array([[huge, 0]] * len(ids), dtype=np.int64),
                               ("balance", "overdue_days"))
        rogue.snapshot = None  # keep the bad table: it never passed the loader's checks
        assert isinstance(rogue.party, InstitutionParty)
        rogue.party.set_table(bad)
        task = asyncio.create_task(rogue.run())
        try:
            async with asyncio.timeout(60):
                await rogue.ready.wait()
            b1 = agents["bank-1"]
            out = await b1.submit(os.urandom(16), tokenize(ids, key),
                                  participants=b1.cfg.consortium.institutions,
                                  attributes=ATTRS, scope=Scope.QUERY, deadline_s=30)
        finally:
            rogue.stop()
            await task
        assert isinstance(out, Ended), out
        assert not isinstance(out, Outcome)
        assert out.reason is AbortReason.TOTAL_OUT_OF_RANGE
        assert agents["coordinator"].stats.published == 0
        COUNTERS["hostile inputs tried"] += 1


async def test_signed_hostile_bodies_on_kafka_stop_no_agent(kafka_bootstrap: KafkaAccess,
                                                           tmp_path: Path) -> None:
    """Members' keys sign hostile bodies (the 2^63-column matrix among them) into every
    party's inbox; each agent rejects and commits past them, survives a restart without
    reading them into the same failure, and the next round is exact."""
    import random

    from tests.test_hostile_fuzz import hostile_body

    d = make_consortium(tmp_path, kafka_bootstrap, 3)
    ids = query_ids(d, 60)
    count = 4000 if FULL else 600
    async with running(d) as agents:
        b1 = agents["bank-1"]
        c = b1.cfg.consortium
        key = b1.cfg.consortium_key
        assert key is not None
        keys = {n: load_party(d / f"{n}.toml").keys for n in c.registry}
        # sequence numbers far above the agents' own (a few hundred here) yet inside every
        # receiver's window, so that the agents' next envelopes are not taken as replays
        chains = {n: Chain(30_000) for n in keys}
        rng = random.Random(11)
        from tests.samples import transcript
        templates = [msgpack.unpackb(encode(m), raw=False)
                     for _, m in transcript().messages.values()]
        crash = msgpack.packb({"v": 1, "kind": 6, "round_id": bytes(16),
                               "assignment": bytes(32), "rows_digest": bytes(32),
                               "endorsement": bytes(64), "values": [0, 2**63, b""]},
                              use_bin_type=True)
        per_topic: dict[str, list[bytes]] = {}
        for i in range(count):
            kind, rid, data = hostile_body(rng, templates)
            if i == 0:
                kind, data = MessageKind.CONTRIBUTION, crash
            recipient = rng.choice(list(c.registry))
            sender = rng.choice([n for n in c.registry if n != recipient])
            per_topic.setdefault(c.registry[recipient].topic, []).extend(seal(
                data, sender=keys[sender], recipient=c.registry[recipient], consortium=c.id,
                round_id=rid, kind=kind, chain=chains[sender]))
        before = {n: a.stats.received for n, a in agents.items()}
        for topic, wires in per_topic.items():
            await produce(kafka_bootstrap, topic, wires)
        for n, a in agents.items():
            want = before[n] + len(per_topic.get(c.registry[n].topic, []))
            def arrived(a: Agent = a, want: int = want) -> bool:
                return a.stats.received >= want

            await a.wait_until(arrived, 120)
            assert a.stats.rejected_by_reason.get("HandlingFailed", 0) == 0
        COUNTERS["hostile inputs tried"] += count
        out = await b1.submit(os.urandom(16), tokenize(ids, key), participants=c.institutions,
                              attributes=ATTRS, scope=Scope.INTERSECTION, deadline_s=60)
        check(out, ids, d)
        for a in agents.values():
            assert a.stats.rejected_by_reason.get("HandlingFailed", 0) == 0
    # a restart reads past them (committed), never into the same failure
    async with running(d) as agents:
        b1 = agents["bank-1"]
        out = await b1.submit(os.urandom(16), tokenize(ids, key), participants=c.institutions,
                              attributes=ATTRS, scope=Scope.INTERSECTION, deadline_s=60)
        check(out, ids, d)


async def test_a_request_with_a_far_deadline_cannot_hold_a_round_open(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    """A member asks for a round with a deadline 285,000 years away and one participant
    never answers: every party ends it within the consortium's max_deadline_s, typed."""
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=40)
    path = d / "consortium.toml"
    text = re.sub(r"(?m)^deadline_s\s*=.*$", "deadline_s = 2", path.read_text())
    path.write_text(text.replace("[policy]\n", "[policy]\nmax_deadline_s = 3\n", 1))
    ids = query_ids(d, 5)
    async with running(d, skip=("bank-2",)) as agents:  # bank-2 never contributes
        bank = agents["bank-1"]
        key = bank.cfg.consortium_key
        assert key is not None
        coordinator = agents["coordinator"]
        async with asyncio.timeout(60):  # without the bound: the round's end never comes
            out = await bank.submit(os.urandom(16), tokenize(ids, key),
                                    participants=bank.cfg.consortium.institutions,
                                    attributes=ATTRS, deadline_ms=2**53 - 1)
            await coordinator.wait_until(lambda: coordinator.stats.aborted == 1, 30)
    assert isinstance(out, Ended)
    assert out.reason is AbortReason.TIMEOUT
    assert coordinator.stats.published == 0
