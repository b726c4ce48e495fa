"""Whole rounds through real envelopes on the in-memory driver: faults, hostile input, secrecy."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import encode
from protocol.coordinator import CoordinatorRound
from protocol.driver import CONSORTIUM, COORDINATOR, build_network, keys_for
from protocol.envelope import Chain, KemKind, seal
from protocol.errors import DuplicateRound, UnknownRound, UnknownSender
from protocol.machine import Output, Send
from protocol.messages import Contribution, LeaderQuery, Scope
from protocol.party import Outgoing, Rejected
from protocol.ring import U64, add_mask
from protocol.tokens import LocalTable, tokenize
from tests.helpers import (
    DEADLINE,
    KEY,
    SPECS,
    expected,
    make_world,
    outcome_of,
    run_round,
    token_ids,
)
from tests.samples import COORD, institution, junk_contribution, transcript

ALL = Scope.INTERSECTION


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 6), rounds=st.integers(1, 4))
def test_duplicates_and_reordering_change_nothing(seed: int, n: int, rounds: int) -> None:
    world = make_world(n, universe=300, hold=0.6, query=200, seed=seed)
    net = world.net
    net.duplicate, net.reorder = 0.5, True
    rids = [run_round(world, requester=f"bank-{r % n}", scope=ALL, min_holders=1)
            for r in range(rounds)]
    assert len(net.published()) == rounds
    for rid in rids:
        m = net.coordinator.rounds[rid]
        assert isinstance(m, CoordinatorRound)
        ids, totals, _ = expected(world, m.leader, ALL, 1)
        for who in net.institutions:
            out = outcome_of(world, who, rid)
            assert token_ids(world, out) == ids
            np.testing.assert_array_equal(out.totals, totals)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), drop=st.floats(0.05, 0.6))
def test_with_drops_every_round_ends_once_correct_or_aborted(seed: int, drop: float) -> None:
    world = make_world(4, universe=200, hold=0.5, query=150, seed=seed)
    net = world.net
    net.drop, net.duplicate, net.reorder = drop, 0.3, True
    rid = run_round(world, requester="bank-0", scope=Scope.QUERY, min_holders=1)
    net.expire(DEADLINE + 10_000)  # everyone's deadline (and grace) has passed
    m = net.coordinator.rounds.get(rid)
    published = [p for p in net.published() if p.round_id == rid]
    coord_aborts = [e for e in net.ended(COORDINATOR) if e.round_id == rid]
    if m is None:  # the request itself was lost: nothing started anywhere
        assert published == []
        assert coord_aborts == []
        return
    assert len(published) + len(coord_aborts) == 1
    assert isinstance(m, CoordinatorRound)
    ids, totals, _ = expected(world, m.leader, Scope.QUERY, 1)
    for who in net.institutions:
        outs = [o for o in net.outcomes(who) if o.round_id == rid]
        ends = [e for e in net.ended(who) if e.round_id == rid]
        assert len(outs) + len(ends) <= 1
        for o in outs:  # any result anyone got is the exact one
            assert published
            assert token_ids(world, o) == ids
            np.testing.assert_array_equal(o.totals, totals)


def test_concurrent_rounds_interleaved() -> None:
    world = make_world(5, universe=400, hold=0.5, query=300, seed=11)
    net = world.net
    net.reorder = True
    rids = []
    for r in range(20):  # all requests in flight before any delivery
        rid = os.urandom(16)
        rids.append(rid)
        req = net.institutions[f"bank-{r % 5}"].request(
            rid, world.tokens(world.query_ids), participants=tuple(net.institutions),
            attributes=("balance", "overdue_days"), deadline_ms=DEADLINE, scope=ALL)
        net.take(f"bank-{r % 5}", req)
    net.run()
    assert len(net.published()) == 20
    for rid in rids:
        m = net.coordinator.rounds[rid]
        assert isinstance(m, CoordinatorRound)
        ids, totals, _ = expected(world, m.leader, ALL, 1)
        out = outcome_of(world, "bank-3", rid)
        np.testing.assert_array_equal(out.totals, totals)
        assert token_ids(world, out) == ids


def test_hybrid_post_quantum_kem_round() -> None:
    world = make_world(3, universe=100, hold=0.7, query=80, seed=3)
    tables = {n: p.table for n, p in world.net.institutions.items()}
    world.net = build_network(tables, SPECS, kem=KemKind.MLKEM768_X25519)
    rid = run_round(world, requester="bank-1", scope=ALL, min_holders=2)
    m = world.net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    _ids, totals, _ = expected(world, m.leader, ALL, 2)
    np.testing.assert_array_equal(outcome_of(world, "bank-0", rid).totals, totals)


def test_a_raw_dump_of_the_bus_holds_no_plaintext() -> None:
    world = make_world(3, universe=300, hold=0.8, query=300, seed=5)
    rid = run_round(world, requester="bank-0", scope=ALL, min_holders=1)
    assert outcome_of(world, "bank-0", rid).tokens.size > 100
    dump = b"".join(world.net.wire_log)
    for c in world.ids[:300]:
        assert c.encode() not in dump
    hits = 0
    for held in world.net.institutions.values():
        for v in held.table.values[:, 0]:
            if abs(int(v)) > 10**6:
                hits += int(np.int64(v).tobytes() in dump)
    for t in world.tokens(world.query_ids[:200]):
        hits += int(bytes(t) in dump)
    assert hits == 0


def _chi2_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expect = len(data) / 256
    return float(((counts - expect) ** 2 / expect).sum())


def test_what_the_coordinator_receives_passes_as_uniform() -> None:
    """Chi-square over bytes (255 dof; p = 1e-4 is about 339) of E_S and every Y_j, for data
    that is as structured as it gets: every institution holds the same constant values."""
    ids = [f"c{i}" for i in range(4000)]
    tbl = LocalTable.build(tokenize(ids, KEY), np.full((4000, 2), 7, dtype=np.int64),
                           ("balance", "overdue_days"))
    world_tables = {"bank-a": tbl, "bank-b": tbl, "bank-c": tbl}
    net = build_network(world_tables, SPECS)
    captured: list[U64] = []
    original = CoordinatorRound._take

    def spy(self: CoordinatorRound, sender: str, chunk: int, last: bool, rows_digest: bytes,
            m: U64) -> list[Output]:
        captured.append(m)  # E_S from the leader, or a contribution
        return original(self, sender, chunk, last, rows_digest, m)

    CoordinatorRound._take = spy  # type: ignore[method-assign]
    try:
        net.take("bank-a", net.institutions["bank-a"].request(
            os.urandom(16), tokenize(ids, KEY), participants=("bank-a", "bank-b", "bank-c"),
            attributes=("balance", "overdue_days"), deadline_ms=DEADLINE))
        net.run()
    finally:
        CoordinatorRound._take = original  # type: ignore[method-assign]
    assert len(net.published()) == 1
    assert len(captured) == 3
    for m in captured:
        assert _chi2_bytes(m.tobytes()) < 339
        bits = np.unpackbits(np.frombuffer(m.tobytes(), dtype=np.uint8))
        assert abs(bits.mean() - 0.5) < 0.005
    # negative control: the same data merely masked (no shares) is far from uniform
    plain = add_mask(tbl.aligned(tokenize(ids, KEY), ("balance", "overdue_days")),
                     np.arange(3, dtype=np.uint64) * np.uint64(2**40 + 12345))
    assert _chi2_bytes(plain.tobytes()) > 10_000


def test_a_restarted_party_sends_the_same_content() -> None:
    """Per-round randomness is derived, not drawn: the same inputs give the same messages."""
    t = transcript()
    query = t.messages[LeaderQuery][1]
    out = []
    for m in (institution("bank-b"), institution("bank-b")):
        m.handle(COORD, t.assignments["bank-b"])
        out.append([encode(o.message) for o in m.handle(COORD, query) if isinstance(o, Send)])
    assert len(out[0]) == 3  # two seeds and E_S
    assert out[0] == out[1]
    assert transcript().assignments["bank-a"].mask.tobytes() == t.assignments[
        "bank-a"].mask.tobytes()


def test_hostile_senders_and_wrong_rounds_are_rejected_typed() -> None:
    world = make_world(3, universe=50, hold=1.0, query=40, seed=9)
    net = world.net
    rid = run_round(world, requester="bank-0", scope=ALL, min_holders=1)
    # a stranger with keys of its own
    stranger, _ = keys_for("mallory", b"evil")
    [wire] = seal(encode(junk_contribution(rid)),
                  sender=stranger, recipient=net.coordinator.registry[COORDINATOR],
                  consortium=CONSORTIUM, round_id=rid, kind=Contribution.KIND, chain=Chain())
    [rej] = net.coordinator.receive(wire)
    assert isinstance(rej, Rejected)
    assert isinstance(rej.error, UnknownSender)
    # a member sending for a round that does not exist
    ghost = os.urandom(16)
    b1 = net.institutions["bank-1"]
    [wire] = seal(encode(junk_contribution(ghost)),
                  sender=b1.me, recipient=net.coordinator.registry[COORDINATOR],
                  consortium=CONSORTIUM, round_id=ghost, kind=Contribution.KIND, chain=b1.chain)
    [rej] = net.coordinator.receive(wire)
    assert isinstance(rej, Rejected)
    assert isinstance(rej.error, UnknownRound)
    # another member reusing an existing round id for a request of its own
    out = b1.request(rid, world.tokens(world.query_ids), participants=tuple(net.institutions),
                     attributes=("balance",), deadline_ms=DEADLINE)
    events = [e for w in out if isinstance(w, Outgoing)
              for e in net.coordinator.receive(w.wires[0])]
    assert len(events) == 1
    assert isinstance(events[0], Rejected)
    assert isinstance(events[0].error, DuplicateRound)
    # an old valid envelope replayed later: dropped, the round stays published once
    old = world.net.wire_log[0]
    assert all(isinstance(e, Rejected) for e in net.coordinator.receive(old))
    assert len(net.published()) == 1
