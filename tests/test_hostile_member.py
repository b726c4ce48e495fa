"""A hostile member (PROTOCOL.md, "A hostile member"): each attack of issue 11 as a test.

The attacker holds a member's real keys and sends anything they can sign. Every attack here
worked on the code before this file (or, for new message fields, could not be stopped there);
each test asserts that it now gets nothing: a typed rejection, or an abort naming the party
that misbehaved, and never a total that tells the attacker one peer's values.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

import msgpack
import numpy as np
import pytest

import protocol.party as party_module
from protocol.codec import (
    assignment_digest,
    decode,
    encode,
    endorsement_statement,
    rows_digest,
)
from protocol.driver import CONSORTIUM, COORDINATOR, Network, build_network, keys_for
from protocol.envelope import Chain, Inbox, padded_size, seal
from protocol.errors import (
    AbortReason,
    HandlingFailed,
    InvalidField,
    MessageTooLarge,
    NotAParticipant,
    QuotaExceeded,
    ReplayedRound,
    UnknownField,
    ZerosumError,
)
from protocol.fixedpoint import AttributeSpec, parse_decimal
from protocol.institution import InstitutionRound
from protocol.machine import Ended, Send
from protocol.messages import (
    Contribution,
    LeaderShare,
    MaskAssignment,
    Message,
    RoundAbort,
    RoundRequest,
    Scope,
)
from protocol.party import InstitutionParty, Keyring, Outgoing, Rejected, RoundOpened
from protocol.policy import ConsortiumPolicy, DifferencingGuard
from protocol.ring import derive_seed
from protocol.tokens import LocalTable, tokenize
from tests.helpers import DEADLINE, KEY, SPECS, expected, make_world, outcome_of, run_round
from tests.samples import COORD, RID, attested, coordinator, institution, keyring, transcript

NAMES = ("balance", "overdue_days")


def _sealed(net: Network, sender: str, recipient: str, msg: Message) -> bytes:
    party = net.party(sender)
    [wire] = seal(encode(msg), sender=party.me, recipient=party.registry[recipient],
                  consortium=CONSORTIUM, round_id=msg.round_id, kind=msg.KIND,
                  chain=party.chain)
    return wire


def _request(net: Network, requester: str, participants: tuple[str, ...], *,
             min_holders: int = 1, rid: bytes | None = None,
             query: list[str] | None = None) -> bytes:
    rid = rid or os.urandom(16)
    ids = query if query is not None else [f"Customer {i:06d}" for i in range(30)]
    net.take(requester, net.institutions[requester].request(
        rid, tokenize(ids, KEY), participants=participants, attributes=NAMES,
        deadline_ms=DEADLINE, scope=Scope.INTERSECTION, min_holders=min_holders))
    net.run()
    return rid


def _step(net: Network) -> None:
    """Deliver the first envelope in flight, and only that one."""
    recipient, wire, _ = net.in_flight.pop(0)
    net.take(recipient, net.party(recipient).receive(wire))


def _coordinator_end(net: Network, rid: bytes) -> Ended | None:
    ends = [e for e in net.ended(COORDINATOR) if e.round_id == rid]
    return ends[0] if ends else None


# -- no input kills an agent ----------------------------------------------------------------
def test_a_matrix_claiming_2_pow_63_columns_is_a_typed_rejection() -> None:
    """The signed envelope that crashed the coordinator into a restart loop."""
    world = make_world(3, universe=50, hold=1.0, query=40, seed=1)
    net = world.net
    body = msgpack.packb({"v": 1, "kind": 6, "round_id": bytes(16), "assignment": bytes(32),
                          "rows_digest": bytes(32), "endorsement": bytes(64),
                          "values": [0, 2**63, b""]}, use_bin_type=True)
    with pytest.raises(InvalidField, match="columns"):
        decode(body)
    b1 = net.institutions["bank-1"]
    [wire] = seal(body, sender=b1.me, recipient=net.coordinator.registry[COORDINATOR],
                  consortium=CONSORTIUM, round_id=bytes(16), kind=Contribution.KIND,
                  chain=b1.chain)
    [event] = net.coordinator.receive(wire)
    assert isinstance(event, Rejected)
    assert isinstance(event.error, InvalidField)
    rid = run_round(world, requester="bank-0", scope=Scope.INTERSECTION, min_holders=1)
    m = net.coordinator.rounds[rid]
    _ids, totals, _ = expected(world, m.leader, Scope.INTERSECTION, 1)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(outcome_of(world, "bank-0", rid).totals, totals)


def test_an_unforeseen_exception_while_handling_is_a_rejection_not_a_crash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(3, universe=20, hold=1.0, query=10, seed=2)
    net = world.net

    def boom(self: object, sender: str, msg: Message) -> list[object]:
        raise RuntimeError("a bug no check foresaw")

    monkeypatch.setattr(type(net.coordinator), "_route", boom)
    b1 = net.institutions["bank-1"]
    out = b1.request(os.urandom(16), world.tokens(world.query_ids),
                     participants=tuple(net.institutions), attributes=NAMES,
                     deadline_ms=DEADLINE)
    [wire] = [w for o in out if isinstance(o, Outgoing) for w in o.wires]
    [event] = net.coordinator.receive(wire)
    assert isinstance(event, Rejected)
    assert type(event.error) is HandlingFailed
    assert "a bug no check foresaw" in str(event.error)


def test_a_leader_share_larger_than_the_query_is_refused_naming_the_leader() -> None:
    t = transcript()
    a = t.assignments["bank-a"]
    m = institution("bank-a")
    m.handle(COORD, a)
    leader_keys = keyring("bank-b")
    tokens = tokenize([f"x{i}" for i in range(a.query_size + 5)], KEY)
    salt = bytes(32)
    share = LeaderShare(RID, a_digest := assignment_digest(a), a.attestation, salt,
                        leader_keys.sign(endorsement_statement(
                            RID, a_digest, rows_digest(salt, tokens), rows=tokens.size)),
                        tokens, bytes(32))
    out = m.handle("bank-b", share)
    [end] = [o for o in out if isinstance(o, Ended)]
    assert end.reason is AbortReason.INVALID_SHAPE
    assert end.culprits == ("bank-b",)
    assert not any(isinstance(o, Send) and isinstance(o.message, Contribution) for o in out)


# -- nobody chooses whose values they see ---------------------------------------------------
def test_a_request_cannot_name_the_leader() -> None:
    req = transcript().messages[RoundRequest][1]
    body = msgpack.unpackb(encode(req), raw=False)
    body["leader"] = "bank-b"
    with pytest.raises(UnknownField, match="leader"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_the_leader_is_drawn_uniformly_whatever_the_requester_does() -> None:
    world = make_world(3, universe=20, hold=1.0, query=10, seed=3)
    net = world.net
    leaders: Counter[str] = Counter()
    for _ in range(300):
        rid = _request(net, "bank-0", tuple(net.institutions), query=world.query_ids)
        leaders[net.coordinator.rounds[rid].leader] += 1  # type: ignore[attr-defined]
    assert set(leaders) == set(net.institutions)
    # 300 draws of 3: each count lies within 100 +- 45 with probability > 0.9999
    assert all(55 <= c <= 145 for c in leaders.values()), leaders


def test_two_member_subset_with_min_holders_0_gets_nothing() -> None:
    """Participants (r, b), leader b, min_holders 0: yesterday b's exact balances."""
    world = make_world(3, universe=30, hold=0.7, query=30, seed=4)
    net = world.net
    rid = _request(net, "bank-0", ("bank-0", "bank-1"), min_holders=1, query=world.query_ids)
    end = _coordinator_end(net, rid)
    assert end is not None
    assert end.reason is AbortReason.POLICY
    assert "subsets are not allowed" in end.detail
    assert end.culprits == ("bank-0",)
    assert net.outcomes("bank-0") == []
    assert net.of("bank-1", Send) == []
    # min_holders below the consortium's floor is refused too
    rid = _request(net, "bank-0", tuple(net.institutions), min_holders=0, rid=os.urandom(16),
                   query=world.query_ids)
    end = _coordinator_end(net, rid)
    assert end is not None
    assert end.reason is AbortReason.POLICY
    assert "floor" in end.detail


def test_institutions_recheck_the_policy_a_hostile_coordinator_waived() -> None:
    t = transcript()
    a = t.assignments["bank-a"]
    waived = attested(replace(a, participants=("bank-a", "bank-b"), min_holders=0))
    m = institution("bank-a")
    out = m.handle(COORD, waived)
    [end] = [o for o in out if isinstance(o, Ended)]
    assert end.reason is AbortReason.POLICY
    assert COORD in end.culprits
    assert not any(isinstance(o, Send) and not isinstance(o.message, RoundAbort) for o in out)


# -- differencing ----------------------------------------------------------------------------
def test_differencing_two_rounds_is_refused_by_the_coordinator() -> None:
    """(r, b, c) minus (r, c) = b's values: where subsets are allowed, the second is refused."""
    world = make_world(3, universe=30, hold=1.0, query=30, seed=5)
    tables = {n: p.table for n, p in world.net.institutions.items()}
    net = build_network(tables, SPECS, allow_subsets=True, min_participants=2)
    first = _request(net, "bank-0", ("bank-0", "bank-1", "bank-2"), query=world.query_ids)
    assert [p.round_id for p in net.published()] == [first]
    second = _request(net, "bank-0", ("bank-0", "bank-2"), query=world.query_ids)
    end = _coordinator_end(net, second)
    assert end is not None
    assert end.reason is AbortReason.DIFFERENCING
    assert "bank-1" in end.detail
    assert [o.round_id for o in net.outcomes("bank-0")] == [first]
    # and the other way round: (r, c) first, then (r, b, c)
    net2 = build_network(tables, SPECS, allow_subsets=True, min_participants=2)
    _request(net2, "bank-0", ("bank-0", "bank-2"), query=world.query_ids)
    later = _request(net2, "bank-0", ("bank-0", "bank-1", "bank-2"), query=world.query_ids)
    end = _coordinator_end(net2, later)
    assert end is not None
    assert end.reason is AbortReason.DIFFERENCING


def test_an_institution_refuses_differencing_a_hostile_coordinator_allows() -> None:
    pol = ConsortiumPolicy(frozenset(("bank-a", "bank-b", "bank-c")),
                           {s.name: s for s in SPECS}, allow_subsets=True, min_participants=2)
    t = transcript()
    party = InstitutionParty(keys_for("bank-c", b"samples")[0],
                             {n: keys_for(n, b"samples")[1]
                              for n in (COORD, "bank-a", "bank-b", "bank-c")},
                             CONSORTIUM, coordinator=COORD,
                             table=LocalTable.build(tokenize(["z"], KEY),
                                                    np.array([[1, 1]], dtype=np.int64), NAMES),
                             policy=pol)
    first = t.assignments["bank-c"]
    assert party._route(COORD, first)  # took part in (a, b, c)
    second = attested(replace(first, round_id=os.urandom(16), participants=("bank-a", "bank-c"),
                              leader="bank-a"))
    out = party._route(COORD, second)
    [end] = [o for o in out if isinstance(o, Ended)]
    assert end.reason is AbortReason.DIFFERENCING


# -- fresh randomness, provably --------------------------------------------------------------
def test_a_replayed_round_id_is_refused_even_after_the_round_was_forgotten() -> None:
    """Evict the round with junk, re-run its id with one row changed: a refusal."""
    world = make_world(3, universe=30, hold=1.0, query=30, seed=6)
    net = world.net
    rid = _request(net, "bank-0", tuple(net.institutions), query=world.query_ids)
    assert len(net.published()) == 1
    net.coordinator.rounds.clear()  # as if junk rounds had evicted it from memory
    for p in net.institutions.values():
        p.rounds.clear()
    b0 = net.institutions["bank-0"]
    out = b0.request(rid, world.tokens(world.query_ids[:-1]),
                     participants=tuple(net.institutions), attributes=NAMES,
                     deadline_ms=DEADLINE)
    [wire] = [w for o in out if isinstance(o, Outgoing) for w in o.wires]
    [event] = net.coordinator.receive(wire)
    assert isinstance(event, Rejected)
    assert isinstance(event.error, ReplayedRound)
    # a hostile coordinator re-using the id is refused by the institutions
    a = attested(replace(transcript().assignments["bank-a"], round_id=rid))
    wire = _sealed(net, COORDINATOR, "bank-1", attested(replace(
        a, participants=tuple(net.institutions), requester="bank-0", leader="bank-0")))
    events = net.institutions["bank-1"].receive(wire)
    assert [type(e.error) for e in events if isinstance(e, Rejected)] == [ReplayedRound]
    assert len(net.published()) == 1


def test_rounds_that_differ_in_any_field_share_no_seed() -> None:
    a = transcript().assignments["bank-b"]
    variants = [a,
                replace(a, round_id=os.urandom(16)),
                replace(a, requester="bank-c"),
                replace(a, participants=("bank-a", "bank-b")),
                replace(a, leader="bank-a"),
                replace(a, attributes=a.attributes[:1], mask=a.mask[:2]),
                replace(a, scope=Scope.QUERY),
                replace(a, min_holders=2),
                replace(a, deadline_ms=a.deadline_ms + 1),
                replace(a, query_size=a.query_size + 1),
                replace(a, query_digest=os.urandom(32))]
    digests = {assignment_digest(v) for v in variants}
    assert len(digests) == len(variants)
    seeds = {derive_seed(b"b" * 32, "share", d, i) for d in digests for i in range(3)}
    assert len(seeds) == 3 * len(variants)
    # the mask and the attestation are not part of it: every participant agrees on it
    assert assignment_digest(replace(a, mask=a.mask + np.uint64(1),
                                     attestation=bytes(64))) == assignment_digest(a)


# -- consistency -----------------------------------------------------------------------------
def _leader_world() -> tuple[Network, bytes]:
    """A round stopped after the leader's messages are in flight."""
    world = make_world(3, universe=40, hold=1.0, query=30, seed=8)
    net = world.net
    rid = os.urandom(16)
    net.take("bank-0", net.institutions["bank-0"].request(
        rid, world.tokens(world.query_ids), participants=tuple(net.institutions),
        attributes=NAMES, deadline_ms=DEADLINE))
    return net, rid


def test_a_leader_that_gives_institutions_different_rows_is_named() -> None:
    net, rid = _leader_world()
    # deliver until the leader has sent its shares, then tamper with one of them
    while not any(isinstance(e, Outgoing) and e.round_id == rid
                  for n in net.institutions for e in net.events[n]
                  if isinstance(e, Outgoing) and e.recipient != COORDINATOR):
        _step(net)
    leader = net.coordinator.rounds[rid].leader  # type: ignore[attr-defined]
    lp = net.institutions[leader]
    lm = lp.rounds[rid]
    assert isinstance(lm, InstitutionRound)
    victim = next(n for n in net.institutions if n != leader)
    # drop the honest share to the victim; the hostile leader sends one over fewer rows
    net.in_flight = [(to, w, c) for to, w, c in net.in_flight if to != victim]
    a = lm.assignment
    assert a is not None
    assert lm.tokens is not None
    fewer = lm.tokens[:-1]
    salt = os.urandom(32)
    digest = assignment_digest(a)
    share = LeaderShare(rid, digest, a.attestation, salt,
                        lp.keyring.sign(endorsement_statement(
                            rid, digest, rows_digest(salt, fewer), rows=fewer.size)),
                        fewer, os.urandom(32))
    net.in_flight.append((victim, _sealed(net, leader, victim, share), False))
    net.run()
    end = _coordinator_end(net, rid)
    assert end is not None
    assert end.reason in (AbortReason.INCONSISTENT, AbortReason.INVALID_SHAPE)
    assert end.culprits == (leader,)
    assert net.published() == []


def test_a_coordinator_that_sends_different_participant_lists_is_named() -> None:
    t = transcript()
    a = t.assignments["bank-a"]
    # bank-a is told the round is (a, b, c) with a changed deadline; the leader saw another
    other = attested(replace(a, deadline_ms=a.deadline_ms + 1))
    m = institution("bank-a")
    m.handle(COORD, other)
    out = m.handle("bank-b", t.leader_shares["bank-a"])
    [end] = [o for o in out if isinstance(o, Ended)]
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == (COORD,)
    assert not any(isinstance(o, Send) and isinstance(o.message, Contribution) for o in out)


def test_a_forged_endorsement_in_a_contribution_names_the_contributor() -> None:
    t = transcript()
    c = coordinator()
    c.handle("bank-a", t.messages[RoundRequest][1])
    forged = replace(t.contributions["bank-a"], endorsement=bytes(64))
    [end] = [o for o in c.handle("bank-a", forged) if isinstance(o, Ended)]
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == ("bank-a",)
    # a contribution computed on another assignment: its sender is named
    c = coordinator()
    c.handle("bank-a", t.messages[RoundRequest][1])
    other = replace(t.contributions["bank-c"], assignment=bytes(32))
    [end] = [o for o in c.handle("bank-c", other) if isinstance(o, Ended)]
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == ("bank-c",)


def test_a_non_participant_never_aborts_someone_elses_round() -> None:
    world = make_world(3, universe=30, hold=1.0, query=30, seed=9)
    tables = {n: p.table for n, p in world.net.institutions.items()}
    net = build_network(tables, SPECS, allow_subsets=True, min_participants=2)
    rid = os.urandom(16)
    net.take("bank-0", net.institutions["bank-0"].request(
        rid, tokenize(world.query_ids, KEY), participants=("bank-0", "bank-1"),
        attributes=NAMES, deadline_ms=DEADLINE))
    _step(net)  # the coordinator has the request
    # bank-2, not a participant, refuses the round and sends a share to bank-0
    abort = RoundAbort(rid, AbortReason.REFUSED, "no", ("bank-1",))
    events = net.coordinator.receive(_sealed(net, "bank-2", COORDINATOR, abort))
    assert [type(e.error) for e in events if isinstance(e, Rejected)] == [NotAParticipant]
    junk = LeaderShare(rid, bytes(32), bytes(64), bytes(32), bytes(64),
                       tokenize(["x"], KEY), bytes(32))
    net.in_flight.append(("bank-0", _sealed(net, "bank-2", "bank-0", junk), False))
    net.run()
    assert [p.round_id for p in net.published()] == [rid]
    assert all(e.round_id != rid for n in net.institutions for e in net.ended(n))


# -- bounds, decimals, quotas, padding -------------------------------------------------------
def test_bounds_that_exclude_zero_work_per_row() -> None:
    age = AttributeSpec("age", 0, 18, 120)
    ids = [f"c{i}" for i in range(6)]
    tables = {
        "bank-0": LocalTable.build(tokenize(ids, KEY), np.array([[30]] * 6, np.int64), ("age",)),
        "bank-1": LocalTable.build(tokenize(ids[:2], KEY), np.array([[40]] * 2, np.int64),
                                   ("age",)),
        "bank-2": LocalTable.build(tokenize(ids[:1], KEY), np.array([[50]], np.int64),
                                   ("age",)),
    }
    net = build_network(tables, (age,))
    rid = os.urandom(16)
    net.take("bank-0", net.institutions["bank-0"].request(
        rid, tokenize(ids, KEY), participants=tuple(tables), attributes=("age",),
        deadline_ms=DEADLINE, scope=Scope.QUERY))
    net.run()
    [out] = net.outcomes("bank-0")
    assert out.totals.tolist() == [[3, 120], [2, 70], [1, 30], [1, 30], [1, 30], [1, 30]]


def test_a_30_digit_decimal_is_exact_or_refused() -> None:
    assert parse_decimal("123456789012345678901234567.891", 3) == \
        123456789012345678901234567891
    with pytest.raises(ZerosumError):
        parse_decimal("123456789012345678901234567.891", 2)
    with pytest.raises(ZerosumError):
        parse_decimal("1e999999999", 2)


def test_reassembly_quotas_per_sender_and_expiry() -> None:
    alice, alice_pub = keys_for("alice", b"q")
    bob, bob_pub = keys_for("bob", b"q")
    inbox = Inbox(bob, {"alice": alice_pub, "bob": bob_pub}, CONSORTIUM)
    chain = Chain()
    big = os.urandom(3 * 1024 * 1024)
    for i in range(4):  # four unfinished messages: each only its first part
        wires = seal(big, sender=alice, recipient=bob_pub, consortium=CONSORTIUM,
                     round_id=bytes(16), kind=Contribution.KIND, chain=chain)
        assert inbox.receive(wires[0]) is None, i
    wires = seal(big, sender=alice, recipient=bob_pub, consortium=CONSORTIUM,
                 round_id=bytes(16), kind=Contribution.KIND, chain=chain)
    with pytest.raises(QuotaExceeded):
        inbox.receive(wires[0])
    held = inbox.unfinished()
    assert 0 < held <= 4 * 1024 * 1024 + 4096 * 4
    # once alice is far past them, her unfinished messages expire
    far = Chain(chain.next_seq + 5000, bytes(32))
    [w] = seal(b"small", sender=alice, recipient=bob_pub, consortium=CONSORTIUM,
               round_id=bytes(16), kind=Contribution.KIND, chain=far)
    inbox.receive(w)
    big_in = seal(big, sender=alice, recipient=bob_pub, consortium=CONSORTIUM,
                  round_id=bytes(16), kind=Contribution.KIND, chain=far)
    assert inbox.receive(big_in[0]) is None
    assert inbox.unfinished() < held


def test_a_sender_cannot_fill_the_buffer_for_everyone() -> None:
    alice, alice_pub = keys_for("alice", b"q")
    carol, carol_pub = keys_for("carol", b"q")
    bob, bob_pub = keys_for("bob", b"q")
    reg = {"alice": alice_pub, "bob": bob_pub, "carol": carol_pub}
    inbox = Inbox(bob, reg, CONSORTIUM, max_body_bytes=2 * 1024 * 1024)
    chain = Chain()
    wires = seal(os.urandom(5 * 1024 * 1024), sender=alice, recipient=bob_pub,
                 consortium=CONSORTIUM, round_id=bytes(16), kind=Contribution.KIND, chain=chain)
    inbox.receive(wires[0])
    inbox.receive(wires[1])
    with pytest.raises(MessageTooLarge):
        inbox.receive(wires[2])
    body = os.urandom(1024 * 1024 + 5)
    cw = seal(body, sender=carol, recipient=bob_pub, consortium=CONSORTIUM,
              round_id=bytes(16), kind=Contribution.KIND, chain=Chain())
    delivered = [inbox.receive(w) for w in cw]
    assert delivered[-1] is not None
    assert delivered[-1].body == body


def test_bodies_are_padded_to_coarse_size_buckets() -> None:
    sizes = {padded_size(n) for n in range(115 * 16, 127 * 16)}
    assert len(sizes) == 1  # 115 and 126 tokens look alike on the bus
    assert all(padded_size(n) >= n + 8 for n in (0, 1, 255, 10**6, 10**7))
    assert all(padded_size(n) <= max(256, (n + 8) * 1.25 + 1) for n in range(0, 10**5, 997))
    alice, _ = keys_for("alice", b"p")
    _, bob_pub = keys_for("bob", b"p")
    lens = {len(seal(os.urandom(n), sender=alice, recipient=bob_pub, consortium=CONSORTIUM,
                     round_id=bytes(16), kind=Contribution.KIND, chain=Chain())[0])
            for n in (1600, 1700, 1770)}
    assert len(lens) == 1


def test_a_member_assignment_from_a_peer_opens_no_round(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Only the coordinator opens a round at an institution; a peer's early messages are
    held in a per-sender buffer bounded in bytes (here small enough for 64 of them)."""
    monkeypatch.setattr(party_module, "MAX_EARLY_BYTES_PER_SENDER",
                        64 * (party_module.EARLY_MESSAGE_BYTES + 16))
    world = make_world(3, universe=20, hold=1.0, query=10, seed=10)
    net = world.net
    target = net.institutions["bank-1"]
    junk = LeaderShare(bytes(16), bytes(32), bytes(64), bytes(32), bytes(64),
                       tokenize(["x"], KEY), bytes(32))
    errors = []
    for _ in range(200):
        msg = replace(junk, round_id=os.urandom(16))
        for e in target.receive(_sealed(net, "bank-2", "bank-1", msg)):
            assert isinstance(e, Rejected)
            errors.append(type(e.error))
    assert len(target.rounds) == 0
    assert target.ledger == {}
    assert len(errors) == 200 - 64
    assert set(errors) == {QuotaExceeded}


def test_keyring_rejects_unknown_signers() -> None:
    k = Keyring(keys_for("a", b"k")[0], {"a": keys_for("a", b"k")[1]})
    sig = k.sign(b"x")
    assert k.verify("a", sig, b"x")
    assert not k.verify("a", sig, b"y")
    assert not k.verify("nobody", sig, b"x")


def test_assignment_self_check_uses_policy_of_institution() -> None:
    a = transcript().assignments["bank-a"]
    assert isinstance(a, MaskAssignment)
    m = institution("bank-a", ConsortiumPolicy(frozenset(("bank-a", "bank-b", "bank-c")),
                                               {s.name: s for s in SPECS}, min_holders=2))
    [end] = [o for o in m.handle(COORD, a) if isinstance(o, Ended)]
    assert end.reason is AbortReason.POLICY


def test_a_refusal_cannot_get_an_honest_party_named() -> None:
    """A member refuses 'because bank-a equivocated': the refuser is the culprit; whom it
    accuses stays its claim, in the detail."""
    t = transcript()
    c = coordinator()
    c.handle("bank-a", t.messages[RoundRequest][1])
    lie = RoundAbort(RID, AbortReason.EQUIVOCATION, "bank-a sent two shares", ("bank-a",))
    [end] = [o for o in c.handle("bank-c", lie) if isinstance(o, Ended)]
    assert end.culprits == ("bank-c",)
    assert "it names bank-a" in end.detail


def test_only_a_leader_share_may_arrive_before_its_round() -> None:
    world = make_world(3, universe=20, hold=1.0, query=10, seed=12)
    net = world.net
    stray = replace(transcript().contributions["bank-a"], round_id=os.urandom(16))
    events = net.institutions["bank-1"].receive(_sealed(net, "bank-2", "bank-1", stray))
    assert [type(e.error).__name__ for e in events if isinstance(e, Rejected)] == [
        "UnknownRound"]
    assert net.institutions["bank-1"]._early == {}


def test_differencing_through_three_rounds_is_refused() -> None:
    """{t,a,b} + {t,c,d} - {a,b,c,d} = 2t: no two of these sets differ by one institution,
    yet together they give t's values. The third round is refused."""
    guard = DifferencingGuard(100)
    for s in (("t", "a", "b"), ("t", "c", "d")):
        assert guard.problem(s) == ""
        guard.record(s)
    problem = guard.problem(("a", "b", "c", "d"))
    assert "t" in problem.split("values of ")[1]
    # the same set again adds nothing, and disjoint rounds stay allowed
    assert guard.problem(("t", "a", "b")) == ""
    other = DifferencingGuard(100)
    other.record(("a", "b"))
    assert other.problem(("c", "d")) == ""
    # with no window there is no guard
    assert DifferencingGuard(0).problem(("a",)) == ""


def test_the_ledger_tells_a_replay_from_a_recreated_topic() -> None:
    """After a restart the same envelope at the same offset rebuilds its round; another
    envelope at that offset (a topic deleted and created again) cannot reopen the id."""
    world = make_world(3, universe=20, hold=1.0, query=10, seed=13)
    net = world.net
    b1 = net.institutions["bank-1"]
    rid = os.urandom(16)
    out = b1.request(rid, world.tokens(world.query_ids), participants=tuple(net.institutions),
                     attributes=NAMES, deadline_ms=DEADLINE)
    [wire] = [w for o in out if isinstance(o, Outgoing) for w in o.wires]
    first = net.coordinator.receive(wire, 7)
    assert any(type(e) is RoundOpened for e in first)
    # a fresh coordinator with the persisted ledger replays the same envelope at offset 7
    fresh = build_network({n: p.table for n, p in net.institutions.items()}, SPECS)
    fresh.coordinator.ledger = dict(net.coordinator.ledger)
    fresh.coordinator.sealing = False
    assert not any(isinstance(e, Rejected) for e in fresh.coordinator.receive(wire, 7))
    # another request under the same id, at the same offset of a recreated topic: refused
    again = build_network({n: p.table for n, p in net.institutions.items()}, SPECS)
    again.coordinator.ledger = dict(net.coordinator.ledger)
    out = again.institutions["bank-1"].request(
        rid, world.tokens(world.query_ids[:-1]), participants=tuple(net.institutions),
        attributes=NAMES, deadline_ms=DEADLINE)
    [other] = [w for o in out if isinstance(o, Outgoing) for w in o.wires]
    [event] = again.coordinator.receive(other, 7)
    assert isinstance(event, Rejected)
    assert isinstance(event.error, ReplayedRound)
