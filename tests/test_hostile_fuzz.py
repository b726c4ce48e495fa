"""Correctly signed and sealed envelopes with hostile bodies, through every party's receive path.

A member's (or the coordinator's) real keys sign bodies whose fields are replaced with hostile
values: huge and negative dimensions, wrong lengths and types, deep nesting, token lists with
duplicates or past the query, extra and missing fields, other kinds' bodies. Each is delivered
to the party that would receive that kind, while live rounds are open there, so the inputs reach
the round machines. No input may raise; the parties keep their memory bounded; and an honest
round afterwards is exact. `ZEROSUM_HOSTILE_COUNT` sets the count (100,000 by default).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import tracemalloc
from collections import Counter
from typing import Any

import msgpack
import numpy as np

from protocol.codec import encode
from protocol.driver import CONSORTIUM, COORDINATOR, Network
from protocol.envelope import seal
from protocol.machine import Ended, Published
from protocol.messages import MessageKind, Scope
from protocol.party import Outgoing, Rejected
from tests.helpers import expected, make_world, outcome_of, run_round
from tests.samples import transcript

COUNT = int(os.environ.get("ZEROSUM_HOSTILE_COUNT", "100000"))
MEMORY_LIMIT = 96 * 1024 * 1024
TO_COORDINATOR = {MessageKind.ROUND_REQUEST, MessageKind.COORDINATOR_SHARE,
                  MessageKind.CONTRIBUTION, MessageKind.ROUND_ABORT}


def hostile_value(rng: random.Random) -> Any:
    """A value of the wrong kind, size or shape for whatever field it replaces."""
    choice = rng.randrange(16)
    if choice == 0:
        return rng.choice([0, -1, 2**31, 2**32 + 1, 2**63 - 1, -(2**63), 2**64 - 1])
    if choice == 1:
        return [rng.choice([0, 1, -1, 2**63, 2**31, 16_000_001]),
                rng.choice([0, 1, 3, 65, 2**63, -5]), rng.randbytes(rng.choice([0, 8, 24, 7]))]
    if choice == 2:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 31, 32, 33, 63, 64, 65, 160, 4096]))
    if choice == 3:
        return rng.randbytes(16) * rng.randint(2, 40)  # duplicated tokens
    if choice == 4:
        return "x" * rng.choice([0, 1, 64, 300, 60_000])
    if choice == 5:
        v: Any = 0
        for _ in range(rng.randint(1, 200)):
            v = [v]
        return v
    if choice == 6:
        return {"a": 1} if rng.random() < 0.5 else {str(i): i for i in range(rng.randint(1, 70))}
    if choice == 7:
        return [rng.choice(["bank-0", "bank-1", "bank-2", "coordinator", "BANK", "", "a" * 70])
                for _ in range(rng.randint(0, 300))]
    if choice == 8:
        return None
    if choice == 9:
        return rng.random() * 1e300
    if choice == 10:
        return True
    if choice == 11:
        return [["balance", 2, -10**12, 10**12]] * rng.randint(0, 70)
    if choice == 12:
        return [["x", 99, 5, 1], "junk", [1, 2, 3, 4]]
    if choice == 13:
        return [rng.randint(0, 5), rng.randint(0, 5), rng.randbytes(8 * rng.randint(0, 25))]
    if choice == 14:
        return rng.randint(0, 300)
    return rng.randbytes(rng.randint(0, 2000))


def hostile_body(rng: random.Random, bodies: list[dict[str, Any]]) -> tuple[MessageKind, bytes,
                                                                           bytes]:
    body = dict(rng.choice(bodies))
    kind = MessageKind(body["kind"])
    keys = [k for k in body if k not in ("v", "kind", "round_id")]
    for _ in range(rng.choice([1, 1, 1, 2])):
        op = rng.randrange(20)
        if op < 16 and keys:
            body[rng.choice(keys)] = hostile_value(rng)
        elif op == 16 and keys:
            body.pop(rng.choice(keys), None)
        elif op == 17:
            body["extra"] = hostile_value(rng)
        elif op == 18:
            body["kind"] = rng.choice([*range(0, 10), 2**40])
        else:
            body["v"] = rng.choice([0, 2, "1", None])
    rid = body.get("round_id")
    if not isinstance(rid, bytes) or len(rid) != 16:
        rid = bytes(16)
    try:
        data = msgpack.packb(body, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        data = msgpack.packb({"v": 1, "kind": int(kind)}, use_bin_type=True)
    return kind, rid, data


def test_hostile_bodies_signed_by_members_never_stop_a_party() -> None:
    rng = random.Random(20261125)
    world = make_world(3, universe=60, hold=0.8, query=50, seed=11)
    net: Network = world.net
    names = list(net.institutions)
    templates = [msgpack.unpackb(encode(m), raw=False) for _, m in transcript().messages.values()]
    outcomes: Counter[str] = Counter()
    live: list[bytes] = []
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        for i in range(COUNT):
            if i % 2000 == 0:  # keep live rounds at every party for the inputs to reach
                rid = os.urandom(16)
                net.take("bank-0", net.institutions["bank-0"].request(
                    rid, world.tokens(world.query_ids), participants=tuple(names),
                    attributes=("balance", "overdue_days"), deadline_ms=10**13))
                net.run()
                live = [rid, *live[:4]]
            kind, rid, data = hostile_body(rng, templates)
            if rng.random() < 0.7:
                rid = rng.choice(live)
                body = msgpack.unpackb(data, raw=False, strict_map_key=False)
                if isinstance(body, dict):
                    body["round_id"] = rid
                    with contextlib.suppress(ValueError, TypeError, OverflowError):
                        data = msgpack.packb(body, use_bin_type=True)
            if kind in TO_COORDINATOR:
                sender, recipient = rng.choice(names), COORDINATOR
            else:
                sender = rng.choice([COORDINATOR, *names])
                recipient = rng.choice([n for n in names if n != sender])
            party = net.party(sender)
            wires = seal(data, sender=party.me, recipient=party.registry[recipient],
                         consortium=CONSORTIUM, round_id=rid, kind=kind, chain=party.chain)
            for wire in wires:
                events = net.party(recipient).receive(wire)  # must not raise
                for e in events:
                    outcomes[type(e.error).__name__ if isinstance(e, Rejected)
                             else type(e).__name__] += 1
                    if isinstance(e, Outgoing):  # aborts and refusals reach their recipients
                        for w in e.wires:
                            net.in_flight.append((e.recipient, w, False))
            net.run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t0
    rejected = sum(v for k, v in outcomes.items()
                   if k not in ("Outgoing", "Ended", "SetTimer", "Published", "Outcome"))
    print(f"\nhostile bodies: {COUNT} signed inputs in {seconds:.0f} s, {rejected} typed "
          f"rejections, {outcomes['Ended']} round ends; peak traced memory "
          f"{peak / 2**20:.1f} MiB; {dict(outcomes.most_common(8))}")
    assert rejected > COUNT * 0.5  # the hostile values do reach the checks
    assert "HandlingFailed" not in outcomes, "an input got past every check into a crash"
    assert peak < MEMORY_LIMIT
    # the parties kept running: an honest round now is exact
    rid = run_round(world, requester="bank-1", scope=Scope.INTERSECTION, min_holders=1)
    m = net.coordinator.rounds[rid]
    _ids, totals, _ = expected(world, m.leader, Scope.INTERSECTION, 1)  # type: ignore[attr-defined]
    for who in names:
        np.testing.assert_array_equal(outcome_of(world, who, rid).totals, totals)
    assert any(isinstance(p, Published) and p.round_id == rid for p in net.published())
    assert not [e for e in net.ended(COORDINATOR) if isinstance(e, Ended) and e.round_id == rid]
