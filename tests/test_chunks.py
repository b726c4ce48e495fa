"""The chunk-level pipeline (issue 14): the query, the shares and the contributions travel as
numbered chunks, each stage works on a chunk as soon as it has it, and the coordinator publishes
only once every chunk of every participant is in.

Round tests run on the in-memory driver (real envelopes); the hostile-chunk tests drive the
machines directly with messages signed by the members' real keys.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    assignment_digest,
    decode,
    encode,
    endorsement_statement,
    query_chunk_digests,
    rows_digest,
)
from protocol.coordinator import CoordinatorRound
from protocol.driver import COORDINATOR, Network, build_network
from protocol.envelope import Header
from protocol.errors import (
    AbortReason,
    DuplicateEnvelope,
    InvalidField,
    RoundClosed,
    WrongType,
)
from protocol.institution import InstitutionRound, InstitutionState
from protocol.machine import Ended, Outcome, Published, Send
from protocol.messages import (
    MAX_CHUNKS,
    Contribution,
    CoordinatorShare,
    LeaderQuery,
    LeaderShare,
    MaskAssignment,
    MaskMode,
    Message,
    MessageKind,
    RoundRequest,
    RoundResult,
    Scope,
)
from protocol.party import Outgoing, Rejected
from protocol.policy import ConsortiumPolicy
from protocol.tokens import Tokens, tokenize
from tests.helpers import KEY, SPECS, World, expected, make_world, outcome_of, run_round, token_ids
from tests.samples import ATTRS, COORD, NAMES, RID, attested, coordinator, institution, keyring
from tests.test_audit import _audit, _records

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- whole rounds on the driver ------------------------------------------------------------------
def _check_exact(world: World, rid: bytes, scope: Scope, min_holders: int = 1) -> None:
    net = world.net
    machine = net.coordinator.rounds[rid]
    assert isinstance(machine, CoordinatorRound)
    assert [p.round_id for p in net.published()] == [rid]
    ids, totals, withheld = expected(world, machine.leader, scope, min_holders)
    for who in net.institutions:
        out = outcome_of(world, who, rid)
        assert token_ids(world, out) == ids
        np.testing.assert_array_equal(out.totals, totals)
        assert out.withheld == withheld
        assert net.ended(who) == []


@SETTINGS
@given(n=st.integers(2, 5), universe=st.integers(0, 120),
       hold=st.sampled_from([0.0, 0.3, 0.9, 1.0]), query_frac=st.floats(0.0, 1.2),
       chunk_rows=st.sampled_from([1, 2, 3, 7, 16, 1000]), scope=st.sampled_from(list(Scope)),
       masks=st.sampled_from(list(MaskMode)), reorder=st.booleans(),
       duplicate=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**32 - 1))
def test_chunked_rounds_publish_the_exact_totals(n: int, universe: int, hold: float,
                                                 query_frac: float, chunk_rows: int,
                                                 scope: Scope, masks: MaskMode, reorder: bool,
                                                 duplicate: float, seed: int) -> None:
    """1, 2 or many chunks, rows not a multiple of the chunk, chunks in any order and
    delivered again: the totals are the plaintext sums, exactly, in the leader's order."""
    world = make_world(n, universe=universe, hold=hold, query=int(universe * query_frac),
                       seed=seed, chunk_rows=chunk_rows, max_query=10_000, masks=masks)
    world.net.reorder = reorder
    world.net.duplicate = duplicate
    rid = run_round(world, requester="bank-0", scope=scope, min_holders=1)
    _check_exact(world, rid, scope)


@pytest.mark.parametrize(("query", "chunk_rows", "chunks"),
                         [(10, 10, 1), (10, 5, 2), (11, 5, 3), (40, 3, 14), (0, 4, 1)])
def test_the_round_travels_in_the_expected_number_of_chunks(query: int, chunk_rows: int,
                                                            chunks: int) -> None:
    world = make_world(3, universe=query, hold=1.0, query=query, seed=3, chunk_rows=chunk_rows,
                       max_query=10_000)
    rid = run_round(world, requester="bank-1", scope=Scope.QUERY, min_holders=1)
    _check_exact(world, rid, Scope.QUERY)
    m = world.net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    assert m.assignment is not None
    assert m.assignment.chunks == chunks
    kinds = _kinds_sent(world.net)
    # one query chunk per chunk; a share chunk per other institution and one E_S per chunk;
    # one contribution chunk per other institution per chunk
    assert kinds[MessageKind.LEADER_QUERY] == chunks
    assert kinds[MessageKind.LEADER_SHARE] == 2 * chunks
    assert kinds[MessageKind.COORDINATOR_SHARE] == chunks
    assert kinds[MessageKind.CONTRIBUTION] == 2 * chunks


def _header(wire: bytes) -> Header:
    return Header.decode(msgpack.unpackb(wire)[1])


def _kinds_sent(net: Network) -> dict[MessageKind, int]:
    out: dict[MessageKind, int] = {}
    for w in net.wire_log:
        h = _header(w)
        if h.part == 0:
            out[h.kind] = out.get(h.kind, 0) + 1
    return out


def _request(world: World, scope: Scope = Scope.QUERY) -> bytes:
    net = world.net
    rid = os.urandom(16)
    net.take("bank-0", net.institutions["bank-0"].request(
        rid, world.tokens(world.query_ids), participants=tuple(net.institutions),
        attributes=("balance", "overdue_days"), deadline_ms=10**13, scope=scope))
    return rid


def _deliver(net: Network, keep: Callable[[str, Header], bool]) -> list[tuple[str, bytes]]:
    """Deliver everything in flight (and what it causes) but the envelopes `keep` holds back,
    which are returned (recipient, wire) in the order they were sent."""
    held: list[tuple[str, bytes]] = []
    while net.in_flight:
        to, wire, _ = net.in_flight.pop(0)
        if keep(to, _header(wire)):
            held.append((to, wire))
            continue
        net.take(to, net.party(to).receive(wire))
    return held


def test_stages_overlap_chunk_by_chunk() -> None:
    """The leader shares a chunk of I before it has the rest of the query; an institution
    contributes a chunk before it has the rest of the shares; the coordinator holds the
    chunks it has and publishes only with the last one."""
    world = make_world(3, universe=30, hold=1.0, query=30, seed=5, chunk_rows=10,
                       max_query=10_000)
    net = world.net
    rid = _request(world)
    queries = _deliver(net, lambda to, h: h.kind is MessageKind.LEADER_QUERY)
    assert len(queries) == 3
    leader = queries[0][0]
    net.take(leader, net.party(leader).receive(queries[0][1]))  # the first query chunk only
    assert _kinds_sent(net).get(MessageKind.COORDINATOR_SHARE) == 1
    assert _kinds_sent(net).get(MessageKind.LEADER_SHARE) == 2
    shares = _deliver(net, lambda to, h: h.kind is MessageKind.CONTRIBUTION)
    assert shares == [] or all(_header(w).kind is MessageKind.CONTRIBUTION for _, w in shares)
    assert len(shares) == 2  # each other institution contributed chunk 0 at once
    for to, wire in shares:
        net.take(to, net.party(to).receive(wire))
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    assert sorted(m.chunks) == [0]
    assert m.complete == 1
    assert net.published() == []
    for to, wire in queries[1:]:
        net.take(to, net.party(to).receive(wire))
    net.run()
    _check_exact(world, rid, Scope.QUERY)


def test_every_share_chunk_that_overtakes_the_assignment_is_held() -> None:
    """The leader sends all its chunks of I at once (in `intersection` scope, once it has
    joined the query), so more of them than the count quota of 64 it had can reach an institution
    before its assignment; they are all held (a bound in bytes) and the round is exact."""
    world = make_world(3, universe=100, hold=1.0, query=100, seed=3, chunk_rows=1,
                       max_query=10_000)
    net = world.net
    rid = _request(world, Scope.INTERSECTION)

    def assignment_to_a_member(to: str, h: Header) -> bool:
        return h.kind is MessageKind.MASK_ASSIGNMENT and to != _leader_of(net, rid)

    held = _deliver(net, assignment_to_a_member)
    assert len(held) == 2
    leader = net.institutions[_leader_of(net, rid)].rounds[rid]
    assert isinstance(leader, InstitutionRound)
    assert len(leader.chunks) > 64
    for to, wire in held:
        assert len(net.institutions[to]._early[leader.ctx.me]) == len(leader.chunks)
        net.take(to, net.party(to).receive(wire))
    net.run()
    _check_exact(world, rid, Scope.INTERSECTION)


def _leader_of(net: Network, rid: bytes) -> str:
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    return m.leader


def test_a_missing_chunk_times_out_and_nothing_partial_is_published() -> None:
    world = make_world(3, universe=30, hold=1.0, query=30, seed=6, chunk_rows=10,
                       max_query=10_000)
    net = world.net
    rid = _request(world)
    seen: list[int] = []
    victim: list[str] = []

    def second_of_victim(to: str, h: Header) -> bool:
        """Hold back the second contribution chunk of one institution that is not the leader."""
        if not victim:
            m = net.coordinator.rounds.get(rid)
            if isinstance(m, CoordinatorRound) and m.assignment is not None:
                victim.append(next(p for p in m.participants if p != m.leader))
        if victim and h.kind is MessageKind.CONTRIBUTION and h.sender == victim[0]:
            seen.append(h.seq)
            return len(seen) == 2
        return False

    held = _deliver(net, second_of_victim)
    assert len(held) == 1
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    assert m.complete == 2  # two of three chunks complete, one waits for the victim
    assert m.missing() == (victim[0],)
    net.expire(10**13)
    [end] = [e for e in net.ended(COORDINATOR) if e.round_id == rid]
    assert end.reason is AbortReason.TIMEOUT
    assert end.culprits == (victim[0],)
    assert net.published() == []
    assert m.chunks == {}  # every running sum dropped
    for who in net.institutions:
        assert net.outcomes(who) == []
        assert [e.reason for e in net.ended(who)] == [AbortReason.TIMEOUT]


def test_a_chunk_delivered_again_is_added_once() -> None:
    world = make_world(3, universe=25, hold=1.0, query=25, seed=7, chunk_rows=4,
                       max_query=10_000)
    net = world.net
    net.duplicate = 1.0  # every envelope arrives two to four times
    rid = _request(world)
    net.run()
    _check_exact(world, rid, Scope.QUERY)


# -- machine by machine: hostile chunks ----------------------------------------------------------
POL = ConsortiumPolicy(frozenset(NAMES), ATTRS, chunk_rows=2, max_query=1000)
QUERY = ["x", "y", "z", "w", "nobody"]  # 3 query chunks of 2, 2, 1


@dataclass
class Machines:
    coordinator: CoordinatorRound
    institutions: dict[str, InstitutionRound]
    queue: list[tuple[str, str, Message]] = field(default_factory=list)
    log: list[tuple[str, str, Message]] = field(default_factory=list)
    outputs: dict[str, list[object]] = field(default_factory=dict)

    @property
    def leader(self) -> str:
        return self.coordinator.leader

    def machine(self, name: str) -> CoordinatorRound | InstitutionRound:
        return self.coordinator if name == COORD else self.institutions[name]

    def feed(self, sender: str, to: str, msg: Message) -> None:
        out = self.machine(to).handle(sender, msg)
        self.outputs.setdefault(to, []).extend(out)
        for o in out:
            if isinstance(o, Send):
                self.queue.append((to, o.recipient, o.message))
                self.log.append((to, o.recipient, o.message))

    def run(self, hold: Callable[[str, str, Message], bool] = lambda *_: False,
            order: random.Random | None = None) -> list[tuple[str, str, Message]]:
        held = []
        while self.queue:
            i = order.randrange(len(self.queue)) if order else 0
            sender, to, msg = self.queue.pop(i)
            if hold(sender, to, msg):
                held.append((sender, to, msg))
            else:
                self.feed(sender, to, msg)
        return held

    def ended(self, who: str) -> list[Ended]:
        return [o for o in self.outputs.get(who, []) if isinstance(o, Ended)]

    def sent(self, kind: type[Message], sender: str | None = None) -> list[Message]:
        return [m for s, _, m in self.log if isinstance(m, kind) and sender in (None, s)]


def _machines(scope: Scope = Scope.QUERY, policy: ConsortiumPolicy = POL) -> Machines:
    ms = Machines(coordinator(policy), {n: institution(n, policy) for n in NAMES})
    req = RoundRequest(RID, "bank-a", NAMES, ("balance", "overdue_days"), scope, 1, 10**13,
                       tokenize(QUERY, KEY))
    ms.feed("bank-a", COORD, req)
    return ms


def _published(ms: Machines) -> RoundResult | None:
    found = ms.sent(RoundResult)
    return found[0] if found and isinstance(found[0], RoundResult) else None


def _reference() -> RoundResult:
    ms = _machines()
    ms.run()
    result = _published(ms)
    assert result is not None
    return result


def test_contribution_chunks_in_any_order_and_twice_give_the_same_result() -> None:
    want = _reference()
    for seed in range(8):
        ms = _machines()
        held = ms.run(hold=lambda s, to, m: to == COORD and isinstance(
            m, Contribution | CoordinatorShare))
        assert len(held) == 3 * 3  # 3 chunks of I, from the leader and two others
        random.Random(seed).shuffle(held)
        for sender, to, msg in held + held[:4]:  # and four of them again
            ms.feed(sender, to, msg)
        got = _published(ms)
        assert got is not None
        assert got.rows == want.rows == len(QUERY)
        np.testing.assert_array_equal(got.totals, want.totals)
        assert len(ms.sent(RoundResult)) == 3  # published once, to each participant


def test_a_second_different_chunk_from_one_sender_is_equivocation() -> None:
    ms = _machines()
    held = ms.run(hold=lambda s, to, m: to == COORD and isinstance(m, Contribution))
    sender, to, msg = held[0]
    ms.feed(sender, to, msg)
    assert isinstance(msg, Contribution)
    ms.feed(sender, to, replace(msg, values=msg.values + np.uint64(1)))
    [end] = ms.ended(COORD)
    assert end.reason is AbortReason.EQUIVOCATION
    assert end.culprits == (sender,)
    assert ms.sent(RoundResult) == []


def _endorsement(ms: Machines, tokens: Tokens, *, chunk: int, last: bool) -> bytes:
    """The leader's real signature on a chunk of rows of its choosing (salt of zeros)."""
    a = ms.institutions[ms.leader].assignment
    assert a is not None
    return keyring(ms.leader).sign(endorsement_statement(
        RID, assignment_digest(a), rows_digest(bytes(32), tokens), rows=tokens.size,
        chunk=chunk, last=last))


def test_a_contribution_chunk_past_the_query_or_moved_to_another_index_names_its_sender() -> None:
    ms = _machines()
    held = ms.run(hold=lambda s, to, m: to == COORD and isinstance(m, Contribution))
    sender, _, msg = held[0]
    assert isinstance(msg, Contribution)
    # chunk 0's endorsement under chunk index 1: the leader endorsed no such chunk
    ms.feed(sender, COORD, replace(msg, chunk=msg.chunk + 1))
    [end] = ms.ended(COORD)
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == (sender,)
    assert ms.sent(RoundResult) == []


def test_chunk_indices_past_the_ceiling_are_typed_codec_errors() -> None:
    msg = Contribution(RID, bytes(32), bytes(32), bytes(64), np.zeros((1, 3), dtype=np.uint64),
                       0, True)
    body = msgpack.unpackb(encode(msg), raw=False)
    for bad in (MAX_CHUNKS, -1, 2**63):
        body["chunk"] = bad
        with pytest.raises(InvalidField):
            decode(msgpack.packb(body, use_bin_type=True))
    body["chunk"] = 0
    body["last"] = 1  # a bool, not an integer
    with pytest.raises(WrongType):
        decode(msgpack.packb(body, use_bin_type=True))


def _hostile_leader_share(ms: Machines, victim: str, *, chunk: int, rows: int,
                          last: bool) -> LeaderShare:
    a = ms.institutions[victim].assignment
    assert a is not None
    tokens = tokenize([f"t{i}" for i in range(rows)], KEY)
    endorsement = _endorsement(ms, tokens, chunk=chunk, last=last)
    return LeaderShare(RID, assignment_digest(a), a.attestation, bytes(32), endorsement,
                       tokens, bytes(32), chunk, last)


@pytest.mark.parametrize(("chunk", "rows", "last", "reason"), [
    (0, 1, False, AbortReason.INVALID_SHAPE),   # a short chunk that is not the last
    (0, 3, False, AbortReason.INVALID_SHAPE),   # more rows than a chunk
    (2, 2, True, AbortReason.INVALID_SHAPE),    # query scope: Q's last chunk has 1 row
    (3, 1, True, AbortReason.INVALID_SHAPE),    # past the query
    (1, 0, True, AbortReason.INVALID_SHAPE),    # an empty last chunk after others
])
def test_a_leader_share_chunk_of_the_wrong_size_or_index_is_refused_naming_the_leader(
        chunk: int, rows: int, last: bool, reason: AbortReason) -> None:
    ms = _machines()
    ms.run(hold=lambda s, to, m: isinstance(m, LeaderQuery))  # the leader has no query yet
    victim = next(n for n in NAMES if n != ms.leader)
    ms.feed(ms.leader, victim, _hostile_leader_share(ms, victim, chunk=chunk, rows=rows,
                                                     last=last))
    [end] = ms.ended(victim)
    assert end.reason is reason
    assert end.culprits == (ms.leader,)
    assert ms.sent(Contribution) == []


def test_a_leader_that_ends_i_twice_is_named_by_institution_and_coordinator() -> None:
    ms = _machines(Scope.INTERSECTION)
    ms.run(hold=lambda s, to, m: isinstance(m, LeaderQuery))
    victim = next(n for n in NAMES if n != ms.leader)
    ms.feed(ms.leader, victim, _hostile_leader_share(ms, victim, chunk=0, rows=1, last=True))
    assert ms.ended(victim) == []
    [contribution] = ms.sent(Contribution)
    ms.feed(ms.leader, victim, _hostile_leader_share(ms, victim, chunk=1, rows=1, last=True))
    [end] = ms.ended(victim)
    # a share after the last: refused (the round there waits for its result only)
    assert end.reason in (AbortReason.INCONSISTENT, AbortReason.UNEXPECTED_MESSAGE)
    assert end.culprits == (ms.leader,)
    # the coordinator, given the first contribution and a share chunk that ends I elsewhere
    ms.feed(victim, COORD, contribution)
    a = ms.coordinator.assignment
    assert a is not None
    ms.feed(ms.leader, COORD, CoordinatorShare(RID, ms.coordinator.digest, bytes(32),
                                               np.zeros((2, a.width), dtype=np.uint64), 1,
                                               True))
    [end] = ms.ended(COORD)
    assert end.reason in (AbortReason.INCONSISTENT, AbortReason.INVALID_SHAPE)
    assert end.culprits == (ms.leader,)
    assert ms.sent(RoundResult) == []


def test_a_leader_that_states_two_versions_of_a_chunk_is_named() -> None:
    """E_S chunk 0 over other rows than the endorsed contribution chunk 0."""
    ms = _machines()
    held = ms.run(hold=lambda s, to, m: to == COORD and isinstance(m, CoordinatorShare))
    share = held[0][2]
    assert isinstance(share, CoordinatorShare)
    ms.feed(ms.leader, COORD, replace(share, rows_digest=os.urandom(32)))
    [end] = ms.ended(COORD)
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == (ms.leader,)


@pytest.mark.parametrize("tamper", ["digest", "index", "size"])
def test_a_query_chunk_that_is_not_the_assigned_one_is_refused_naming_the_coordinator(
        tamper: str) -> None:
    ms = _machines()
    held = ms.run(hold=lambda s, to, m: isinstance(m, LeaderQuery))
    q = held[0][2]
    assert isinstance(q, LeaderQuery)
    bad = {"digest": replace(q, query=tokenize(["a", "b"], KEY)),
           "index": replace(q, chunk=3),
           "size": replace(q, query=q.query[:1])}[tamper]
    ms.feed(COORD, ms.leader, bad)
    [end] = ms.ended(ms.leader)
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == (COORD,)
    assert ms.sent(LeaderShare) == []
    assert ms.sent(CoordinatorShare) == []


def test_an_assignment_with_other_chunks_is_refused() -> None:
    ms = _machines()
    [a] = [m for _, to, m in ms.queue if to == "bank-a" and isinstance(m, MaskAssignment)]
    # chunk rows other than the consortium's: refused by its own policy
    other = attested(replace(a, chunk_rows=3, query_chunks=query_chunk_digests(
        tokenize(QUERY, KEY), 3)))
    m = institution("bank-a", POL)
    m.handle(COORD, other)
    assert m.state is InstitutionState.ABORTED
    # a chunk list that is not the one its query digest names
    m = institution("bank-a", POL)
    out = m.handle(COORD, attested(replace(a, query_chunks=os.urandom(len(a.query_chunks)))))
    [end] = [o for o in out if isinstance(o, Ended)]
    assert end.reason is AbortReason.INCONSISTENT
    assert end.culprits == (COORD,)
    # a chunk list of the wrong length cannot even be built
    with pytest.raises(ValueError, match="query_chunks"):
        replace(a, query_chunks=a.query_chunks[:32])


def test_the_leader_buffers_query_chunks_ahead_of_their_turn() -> None:
    """Query chunks out of order: I is still in query order (the same result)."""
    want = _reference()
    ms = _machines()
    held = ms.run(hold=lambda s, to, m: isinstance(m, LeaderQuery))
    for sender, to, msg in reversed(held):
        ms.feed(sender, to, msg)
    ms.run()
    got = _published(ms)
    assert got is not None
    np.testing.assert_array_equal(got.totals, want.totals)
    outcomes = [o for o in ms.outputs["bank-a"] if isinstance(o, Outcome)]
    assert len(outcomes) == 1
    assert next(p for p in ms.outputs[COORD] if isinstance(p, Published)).rows == len(QUERY)


@pytest.mark.parametrize("scope", list(Scope))
def test_a_pacing_coordinator_learns_nothing_from_when_the_leader_shares(scope: Scope) -> None:
    """Finding 1 of the review: a coordinator handing the leader its query one chunk at a time
    would learn, from when each chunk of I comes back, which query chunk completed it (with 1
    row a chunk: I itself). In `intersection` scope the leader sends nothing until it has
    joined the whole query; in `query` scope I is Q and the chunks stream."""
    pol = replace(POL, chunk_rows=1)
    ms = _machines(scope, pol)
    held = ms.run(hold=lambda s, to, m: isinstance(m, LeaderQuery))
    leader = ms.leader
    assert [m.chunk for _, _, m in held if isinstance(m, LeaderQuery)] == list(range(len(QUERY)))
    sent_after: list[int] = []  # the leader's shares sent so far, after each query chunk
    for sender, to, msg in held:
        ms.feed(sender, to, msg)
        sent_after.append(len(ms.sent(CoordinatorShare, leader)) +
                          len(ms.sent(LeaderShare, leader)))
    if scope is Scope.INTERSECTION:
        assert sent_after[:-1] == [0] * (len(QUERY) - 1)
    else:  # one chunk of Q to the coordinator and to each other institution, at once
        assert sent_after[:-1] == [len(NAMES) * (k + 1) for k in range(len(QUERY) - 1)]
    assert sent_after[-1] > 0
    ms.run()
    got = _published(ms)
    assert got is not None
    want = _machines(scope)
    want.run()
    reference = _published(want)
    assert reference is not None
    np.testing.assert_array_equal(got.totals, reference.totals)


@pytest.mark.parametrize("kind", [LeaderQuery, LeaderShare])
def test_chunks_before_the_assignment_are_held_within_the_policy(kind: type[Message]) -> None:
    """Finding 2 of the review: a round opened at an institution by a message before its
    assignment held every later chunk (the reviewer's 300 chunks of 20,000 tokens: 96 MB).
    Before the assignment a sender's chunks of one kind are held only as far as an honest
    round could send them: each at most `chunk_rows` rows, together at most `max_query` rows
    in at most max_query / chunk_rows chunks; past that the round aborts naming the sender."""
    pol = replace(POL, chunk_rows=4, max_query=12)  # at most 3 chunks, 12 rows
    victim = institution("bank-b", pol)
    sender = COORD if kind is LeaderQuery else "bank-a"
    toks = tokenize([f"t{i}" for i in range(4)], KEY)

    def chunk(k: int, tokens: Tokens = toks) -> Message:
        if kind is LeaderQuery:
            return LeaderQuery(RID, bytes(32), tokens, k)
        return LeaderShare(RID, bytes(32), bytes(64), bytes(32), bytes(64), tokens,
                           bytes(32), k, False)

    for k in range(3):  # as much as an honest round's query or I: held
        assert victim.handle(sender, chunk(k)) == []
    assert len(victim._pending) == 3
    [ended] = [o for o in victim.handle(sender, chunk(3)) if isinstance(o, Ended)]
    assert (ended.reason, ended.culprits) == (AbortReason.INVALID_SHAPE, (sender,))
    assert victim._pending == []
    big = institution("bank-b", pol)  # one chunk larger than chunk_rows
    [ended] = [o for o in big.handle(sender, chunk(0, tokenize(list("abcde"), KEY)))
               if isinstance(o, Ended)]
    assert (ended.reason, ended.culprits) == (AbortReason.INVALID_SHAPE, (sender,))
    empty = institution("bank-b", pol)  # empty chunks count too
    for k in range(3):
        assert empty.handle(sender, chunk(k, toks[:0])) == []
    assert [o for o in empty.handle(sender, chunk(3, toks[:0])) if isinstance(o, Ended)]


def test_an_ended_round_keeps_its_duplicate_checks_compact() -> None:
    """Finding 4 of the review: an ended round kept a dict entry per (sender, kind, chunk) (about
    100 bytes each) for as long as it is kept. Once it ends they are one string of 16-byte digest
    prefixes per (sender, kind); a late copy of any chunk is still dropped quietly and a
    different message still refused as to an ended round."""
    pol = replace(POL, chunk_rows=1)
    ms = _machines(Scope.QUERY, pol)
    ms.run()
    assert _published(ms) is not None
    m = ms.coordinator
    assert m.state in m.TERMINAL
    assert m._seen == {}  # no entry per chunk left
    contributions = [(s, msg) for s, to, msg in ms.log
                     if to == COORD and isinstance(msg, Contribution)]
    assert len(contributions) == (len(NAMES) - 1) * len(QUERY)
    assert sum(len(d) for d in m.seen_digests().values()) == 16 * (
        len(contributions) + len(QUERY) + 1)  # + the shares and the request
    for sender, msg in contributions:
        assert m.handle(sender, msg) == []  # a late copy: dropped quietly
        with pytest.raises(RoundClosed):
            m.handle(sender, replace(msg, rows_digest=bytes(32)))


def test_a_chunked_assignment_names_each_chunk() -> None:
    ms = _machines()
    a = ms.coordinator.assignment
    assert isinstance(a, MaskAssignment)
    assert a.chunks == 3
    assert [len(a.query_rows(k)) for k in range(3)] == [2, 2, 1]
    assert a.query_chunks == query_chunk_digests(tokenize(QUERY, KEY), 2)


# -- crash, replay, audit ------------------------------------------------------------------------
def _chunked_round(seed: int = 9) -> tuple[World, bytes]:
    world = make_world(3, universe=40, hold=0.7, query=35, seed=seed, chunk_rows=4,
                       max_query=10_000)
    rid = run_round(world, requester="bank-2", scope=Scope.INTERSECTION, min_holders=1)
    _check_exact(world, rid, Scope.INTERSECTION)
    return world, rid


def test_a_coordinator_rebuilt_from_its_inbox_mid_round_publishes_the_same_result() -> None:
    """A restart half way through the chunks: the inputs before the saved position are replayed
    quietly (sealing off), the rest handled as new; replayed chunks are not added twice."""
    world, rid = _chunked_round()
    net = world.net
    topic = net.coordinator.registry[COORDINATOR].topic
    inbox = [w for t, w in net.topic_log if t == topic and _header(w).round_id == rid]
    assert sum(_header(w).kind is MessageKind.CONTRIBUTION for w in inbox) > 4
    [published] = net.published()
    fresh = build_network({n: p.table for n, p in net.institutions.items()}, SPECS,
                          chunk_rows=4, max_query=10_000)
    coordinator = fresh.coordinator  # its ledger: empty, as the driver read no positions
    half = len(inbox) // 2
    coordinator.sealing = False
    replayed = [e for i, w in enumerate(inbox[:half]) for e in coordinator.receive(w, i)]
    assert not any(isinstance(e, Outgoing | Published | Rejected) for e in replayed), replayed
    coordinator.sealing = True
    again = [e for i, w in enumerate(inbox[:half]) for e in coordinator.receive(w, i)]
    assert all(isinstance(e, Rejected) and isinstance(e.error, DuplicateEnvelope)
               for e in again)
    rest = [e for i, w in enumerate(inbox[half:], half) for e in coordinator.receive(w, i)]
    assert [e for e in rest if isinstance(e, Published)] == [published]
    assert sum(isinstance(e, Outgoing) for e in rest) == 3 + 1  # the result to all, a receipt


def test_the_audit_adds_every_chunk_the_coordinator_received() -> None:
    world, _ = _chunked_round(10)
    net = world.net
    records = _records(net.topic_log)
    report = _audit(net, records, COORDINATOR)
    assert report.all_findings() == []
    assert [r.verified for r in report.rounds] == ["coordinator"]
    # one contribution chunk removed from the coordinator's inbox: not the sum of its inputs
    kinds = [_header(r.value).kind for r in records]
    dropped = [i for i, k in enumerate(kinds) if k is MessageKind.CONTRIBUTION][3]
    report = _audit(net, records[:dropped] + records[dropped + 1:], COORDINATOR)
    assert "sum" in {f.check for f in report.all_findings()}
