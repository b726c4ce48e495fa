"""Every (state, input) pair of each role: a table entry, or a typed abort / typed error.

Built from `TABLE` itself: a pair in the table is a transition; any other pair, in a running
round, aborts with UNEXPECTED_MESSAGE (or is a duplicate: dropped if equal, EQUIVOCATION if
not); in an ended round it raises RoundClosed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from protocol.codec import encode
from protocol.coordinator import CoordinatorRound, CoordinatorState
from protocol.errors import AbortReason, NotAParticipant, RoundClosed
from protocol.institution import InstitutionRound, InstitutionState
from protocol.machine import (
    BUFFER,
    ENDED_DIGEST,
    Deadline,
    Ended,
    Input,
    Outcome,
    RoundMachine,
    Send,
)
from protocol.messages import (
    Contribution,
    CoordinatorShare,
    LeaderQuery,
    LeaderShare,
    MaskAssignment,
    Message,
    RoundAbort,
    RoundRequest,
    RoundResult,
)
from tests.samples import (
    COORD,
    RID,
    attested,
    coordinator,
    institution,
    request,
    transcript,
    variant,
)

T = transcript()
INPUT_TYPES: list[type] = [*T.messages, Deadline]
LEADER, OTHER = "bank-b", "bank-a"


def sample(kind: type) -> tuple[str, Input]:
    if kind is Deadline:
        return "", Deadline(RID)
    sender, msg = T.messages[kind]
    return sender, msg


# -- machines in every state -------------------------------------------------------------------
def coord_in(state: CoordinatorState) -> CoordinatorRound:
    c = coordinator()
    if state is CoordinatorState.AWAIT_REQUEST:
        return c
    c.handle("bank-a", request())
    if state is CoordinatorState.COLLECTING:
        return c
    if state is CoordinatorState.PUBLISHED:
        c.handle(LEADER, T.coordinator_share)
        for name, contribution in T.contributions.items():
            c.handle(name, contribution)
    else:
        c.handle("", Deadline(RID))
    assert c.state is state
    return c


def inst_in(state: InstitutionState, name: str = OTHER) -> InstitutionRound:
    m = institution(name)
    if state is InstitutionState.AWAIT_ASSIGNMENT:
        return m
    if state is InstitutionState.AWAIT_QUERY:
        name = LEADER
        m = institution(name)
    m.handle(COORD, T.assignments[name])
    if state in (InstitutionState.AWAIT_SHARE, InstitutionState.AWAIT_QUERY):
        return m
    if state is InstitutionState.ABORTED:
        m.handle("", Deadline(RID))
        return m
    m.handle(LEADER, T.leader_shares[name])
    if state is InstitutionState.DONE:
        m.handle(COORD, T.result)
    assert m.state is state
    return m


def _maker(state: CoordinatorState | InstitutionState) -> Callable[[], RoundMachine]:
    if isinstance(state, CoordinatorState):
        return lambda: coord_in(state)
    return lambda: inst_in(state)


CASES: list[tuple[str, CoordinatorState | InstitutionState, Callable[[], RoundMachine]]] = [
    *(("coordinator", s, _maker(s)) for s in CoordinatorState),
    *(("institution", s, _maker(s)) for s in InstitutionState),
]


@pytest.mark.parametrize(("role", "state", "make"), CASES,
                         ids=[f"{r}-{s.name}" for r, s, _ in CASES])
@pytest.mark.parametrize("kind", INPUT_TYPES, ids=lambda k: k.__name__)
def test_invalid_pairs_abort_or_raise_typed(role: str, state: object,
                                            make: Callable[[], RoundMachine],
                                            kind: type) -> None:
    m = make()
    if (state, kind) in m.TABLE:
        return  # a transition: covered by the round tests
    sender, inp = sample(kind)
    terminal = state in m.TERMINAL
    if isinstance(inp, Message) and not m.may_send(sender):
        # a stranger to the round: dropped with a typed error, never an abort
        with pytest.raises(NotAParticipant):
            m.handle(sender, inp)
        assert m.state is state
        return
    seen = isinstance(inp, Message) and m.has_seen(sender, inp.KIND)
    if seen:
        assert isinstance(inp, Message)
        conflicting: Message = inp
        taken = m.seen_digests()[(sender, inp.KIND)]
        mine = hashlib.sha256(encode(inp)).digest()[:ENDED_DIGEST]
        if mine in (taken[i:i + ENDED_DIGEST] for i in range(0, len(taken), ENDED_DIGEST)):
            assert m.handle(sender, inp) == []  # equal duplicate: nothing happens
            assert m.state is state
            conflicting = variant(inp)
        if terminal:
            with pytest.raises(RoundClosed):
                m.handle(sender, conflicting)
        else:
            ended = [o for o in m.handle(sender, conflicting) if isinstance(o, Ended)]
            assert [e.reason for e in ended] == [AbortReason.EQUIVOCATION]
            assert m.evidence
        return
    if terminal:
        with pytest.raises(RoundClosed):
            m.handle(sender, inp)
        assert m.state is state
        return
    out = m.handle(sender, inp)
    ended = [o for o in out if isinstance(o, Ended)]
    assert [e.reason for e in ended] == [AbortReason.UNEXPECTED_MESSAGE], out
    assert m.state is m.ABORTED
    assert not any(isinstance(o, Send) and not isinstance(o.message, RoundAbort) for o in out)


def test_every_state_of_each_role_is_reached() -> None:
    assert {s for r, s, _ in CASES if r == "coordinator"} == set(CoordinatorState)
    assert {s for r, s, _ in CASES if r == "institution"} == set(InstitutionState)


@pytest.mark.parametrize(("make", "kind", "wrong"), [
    (lambda: coord_in(CoordinatorState.COLLECTING), CoordinatorShare, OTHER),
    (lambda: coord_in(CoordinatorState.COLLECTING), Contribution, LEADER),
    (lambda: inst_in(InstitutionState.AWAIT_ASSIGNMENT), MaskAssignment, LEADER),
    (lambda: inst_in(InstitutionState.AWAIT_SHARE), LeaderShare, "bank-c"),
    (lambda: inst_in(InstitutionState.AWAIT_RESULT), RoundResult, LEADER),
])
def test_right_message_from_the_wrong_sender_aborts(make: Callable[[], RoundMachine],
                                                    kind: type, wrong: str) -> None:
    m = make()
    _, msg = sample(kind)
    ended = [o for o in m.handle(wrong, msg) if isinstance(o, Ended)]
    assert [e.reason for e in ended] == [AbortReason.UNEXPECTED_MESSAGE]
    assert wrong in ended[0].culprits


def test_early_messages_are_buffered_until_the_assignment() -> None:
    assert (InstitutionState.AWAIT_ASSIGNMENT, LeaderShare) in InstitutionRound.TABLE
    assert InstitutionRound.TABLE[(InstitutionState.AWAIT_ASSIGNMENT, LeaderShare)] is BUFFER
    m = institution(OTHER)
    assert m.handle(LEADER, T.leader_shares[OTHER]) == []
    out = m.handle(COORD, T.assignments[OTHER])
    assert any(isinstance(o, Send) and isinstance(o.message, Contribution) for o in out)
    assert m.state is InstitutionState.AWAIT_RESULT
    leader = institution(LEADER)
    assert leader.handle(COORD, T.messages[LeaderQuery][1]) == []
    out = leader.handle(COORD, T.assignments[LEADER])
    assert sum(isinstance(o, Send) and isinstance(o.message, LeaderShare) for o in out) == 2


def test_a_round_ends_exactly_once() -> None:
    c = coord_in(CoordinatorState.PUBLISHED)
    with pytest.raises(RoundClosed):
        c.handle("", Deadline(RID))
    m = inst_in(InstitutionState.DONE)
    with pytest.raises(RoundClosed):
        m.handle(COORD, RoundAbort(RID, AbortReason.TIMEOUT, "late", ()))


def test_leader_refuses_a_round_whose_attribute_specs_differ() -> None:
    from dataclasses import replace

    from protocol.fixedpoint import AttributeSpec
    a = T.assignments[OTHER]
    odd = attested(replace(a, attributes=(AttributeSpec("balance", 3, -1, 1),
                                          a.attributes[1])))
    out = institution(OTHER).handle(COORD, odd)
    ended = [o for o in out if isinstance(o, Ended)]
    assert [e.reason for e in ended] == [AbortReason.REFUSED]
    refusals = [o for o in out if isinstance(o, Send) and isinstance(o.message, RoundAbort)]
    assert [r.recipient for r in refusals] == [COORD]


def test_result_outcome_matches_the_transcript() -> None:
    m = inst_in(InstitutionState.AWAIT_RESULT)
    [outcome] = [o for o in m.handle(COORD, T.result) if isinstance(o, Outcome)]
    assert outcome.totals.tolist() == [[2, 300, 1], [3, 600, 3]]


def test_coordinator_rejects_bad_requests() -> None:
    from dataclasses import replace
    c = coordinator()
    bad = replace(request(), attributes=("balance", "salary"))
    out = c.handle("bank-a", bad)
    ended = [o for o in out if isinstance(o, Ended)]
    assert [e.reason for e in ended] == [AbortReason.BAD_REQUEST]
    assert [o.recipient for o in out if isinstance(o, Send)] == ["bank-a"]
    c2 = coordinator()
    out = c2.handle("bank-c", request())  # bank-c asks in bank-a's name
    assert [e.reason for e in out if isinstance(e, Ended)] == [AbortReason.BAD_REQUEST]
    assert isinstance(T.messages[RoundRequest][1], RoundRequest)


def test_an_abort_from_the_coordinator_is_not_sent_back() -> None:
    for state in (InstitutionState.AWAIT_ASSIGNMENT, InstitutionState.AWAIT_SHARE,
                  InstitutionState.AWAIT_RESULT):
        m = inst_in(state)
        out = m.handle(COORD, RoundAbort(RID, AbortReason.BAD_REQUEST, "no", ("bank-a",)))
        assert [o for o in out if isinstance(o, Send)] == []
        assert [e.reason for e in out if isinstance(e, Ended)] == [AbortReason.BAD_REQUEST]
