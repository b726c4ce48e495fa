"""One valid message of every kind, from a real 3-institution round driven machine by machine."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from protocol.coordinator import CoordinatorRound
from protocol.driver import keys_for
from protocol.errors import AbortReason
from protocol.institution import InstitutionContext, InstitutionRound
from protocol.machine import Output, Send
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
    Scope,
)
from protocol.party import Keyring
from protocol.policy import ConsortiumPolicy
from protocol.ring import U64
from protocol.tokens import LocalTable, tokenize
from tests.helpers import KEY, SPECS

RID = bytes(range(16))
NAMES = ("bank-a", "bank-b", "bank-c")
COORD = "coordinator"
ATTRS = {s.name: s for s in SPECS}


def table(ids: list[str]) -> LocalTable:
    vals = np.array([[100 * (i + 1), i] for i in range(len(ids))], dtype=np.int64)
    return LocalTable.build(tokenize(ids, KEY), vals.reshape(len(ids), 2),
                            ("balance", "overdue_days"))


TABLES = {"bank-a": table(["x", "y", "z"]), "bank-b": table(["y", "z", "w"]),
          "bank-c": table(["z"])}


POLICY = ConsortiumPolicy(frozenset(NAMES), ATTRS)
KEYS = {n: keys_for(n, b"samples") for n in (COORD, *NAMES)}
REGISTRY = {n: pub for n, (_, pub) in KEYS.items()}


def keyring(name: str) -> Keyring:
    return Keyring(KEYS[name][0], REGISTRY)


def coordinator(policy: ConsortiumPolicy = POLICY) -> CoordinatorRound:
    return CoordinatorRound(RID, secret=b"c" * 32, policy=policy, signer=keyring(COORD))


def institution(name: str, policy: ConsortiumPolicy = POLICY) -> InstitutionRound:
    return InstitutionRound(RID, InstitutionContext(name, COORD, name.encode() * 8,
                                                    TABLES[name], policy, keyring(name)))


def request() -> RoundRequest:
    return RoundRequest(RID, "bank-a", NAMES, ("balance", "overdue_days"), Scope.INTERSECTION,
                        1, 10**13, tokenize(["x", "y", "z", "nobody"], KEY))


def attested(a: MaskAssignment) -> MaskAssignment:
    """An assignment changed by a test, signed again as a (hostile) coordinator would."""
    from protocol.codec import assignment_digest, attestation_statement
    return replace(a, attestation=keyring(COORD).sign(
        attestation_statement(a.round_id, assignment_digest(a))))


LEADER = "bank-b"  # the leader the coordinator draws for request() with the secret above


def sends(outputs: list[Output]) -> list[Send]:
    return [o for o in outputs if isinstance(o, Send)]


@dataclass
class Transcript:
    messages: dict[type, tuple[str, Message]]  # kind -> (its sender, one message)
    assignments: dict[str, MaskAssignment]
    leader_shares: dict[str, LeaderShare]
    coordinator_share: CoordinatorShare
    contributions: dict[str, Contribution]
    result: RoundResult


def transcript() -> Transcript:
    c = coordinator()
    out = sends(c.handle("bank-a", request()))
    assignments = {s.recipient: s.message for s in out if isinstance(s.message, MaskAssignment)}
    query = next(s.message for s in out if isinstance(s.message, LeaderQuery))
    assert assignments["bank-a"].leader == LEADER
    leader = institution("bank-b")
    leader.handle(COORD, assignments["bank-b"])
    lout = sends(leader.handle(COORD, query))
    shares = {s.recipient: s.message for s in lout if isinstance(s.message, LeaderShare)}
    e_s = next(s.message for s in lout if isinstance(s.message, CoordinatorShare))
    contributions = {}
    for name in ("bank-a", "bank-c"):
        m = institution(name)
        m.handle(COORD, assignments[name])
        contributions[name] = next(s.message for s in sends(m.handle("bank-b", shares[name]))
                                   if isinstance(s.message, Contribution))
    c.handle("bank-b", e_s)
    c.handle("bank-a", contributions["bank-a"])
    result = next(s.message for s in sends(c.handle("bank-c", contributions["bank-c"]))
                  if isinstance(s.message, RoundResult))
    abort = RoundAbort(RID, AbortReason.TIMEOUT, "late", ("bank-c",))
    assert isinstance(query, LeaderQuery)
    assert isinstance(e_s, CoordinatorShare)
    assert isinstance(result, RoundResult)
    messages: dict[type, tuple[str, Message]] = {
        RoundRequest: ("bank-a", request()), MaskAssignment: (COORD, assignments["bank-a"]),
        LeaderQuery: (COORD, query), LeaderShare: ("bank-b", shares["bank-a"]),
        CoordinatorShare: ("bank-b", e_s), Contribution: ("bank-a", contributions["bank-a"]),
        RoundResult: (COORD, result), RoundAbort: (COORD, abort)}
    return Transcript(messages, assignments, shares, e_s, contributions, result)


def variant(msg: Message) -> Message:
    """The same kind of message for the same round, with different content."""
    if isinstance(msg, RoundRequest):
        return replace(msg, deadline_ms=msg.deadline_ms + 1)
    if isinstance(msg, MaskAssignment):
        return replace(msg, mask=msg.mask + np.uint64(1))
    if isinstance(msg, LeaderQuery):
        return replace(msg, query=tokenize(["other"], KEY))
    if isinstance(msg, LeaderShare):
        return replace(msg, seed=bytes(32))
    if isinstance(msg, CoordinatorShare):
        return replace(msg, share=msg.share + np.uint64(1))
    if isinstance(msg, Contribution):
        return replace(msg, values=msg.values + np.uint64(1))
    if isinstance(msg, RoundResult):
        return replace(msg, totals=msg.totals + _bump(msg.totals))
    if isinstance(msg, RoundAbort):
        return replace(msg, detail=msg.detail + "!")
    raise AssertionError(type(msg))


def _bump(m: U64) -> U64:
    out = np.zeros_like(m)
    if out.size:
        out[0, 0] = 1
    return out


def junk_contribution(rid: bytes) -> Contribution:
    """A well-formed contribution that belongs to no round's assignment."""
    return Contribution(rid, bytes(32), bytes(32), bytes(64), np.zeros((1, 3), dtype=np.uint64))
