"""The coordinator's view of one round (claims 4-6): masks, the query to the leader, the sum.

    AWAIT_REQUEST --RoundRequest--> COLLECTING --last share/contribution--> PUBLISHED
                                    COLLECTING --Deadline / refusal / invalid--> ABORTED

The coordinator adds matrices and nothing else: R = E_S + sum_{j != L} Y_j = sum_i X_i, because
the shares sum to X_L + m_L and the masks sum to zero. Before publishing it checks every shape
and that every total is one that honest contributions within bounds can produce; otherwise it
aborts. A round ends exactly once: in PUBLISHED or in ABORTED.
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum, auto
from typing import ClassVar

import numpy as np

from protocol.codec import (
    assignment_digest,
    attestation_statement,
    digest_of,
    encode,
    endorsement_statement,
    query_digest,
)
from protocol.errors import AbortReason, TotalOutOfRange
from protocol.fixedpoint import decode_totals
from protocol.machine import (
    Deadline,
    Ended,
    Handler,
    Output,
    Published,
    RoundMachine,
    Send,
    SetTimer,
    _Buffer,
)
from protocol.messages import (
    SIGNATURE_BYTES,
    Contribution,
    CoordinatorShare,
    LeaderQuery,
    MaskAssignment,
    MaskMode,
    RoundAbort,
    RoundRequest,
    RoundResult,
    Scope,
    pack_bitmap,
)
from protocol.policy import ConsortiumPolicy, DifferencingGuard, Signer
from protocol.ring import (
    U64,
    derive_seed,
    permutation,
    sum_matrices,
    uniform_below,
    zero_sum_masks,
)


class CoordinatorState(Enum):
    AWAIT_REQUEST = auto()
    COLLECTING = auto()
    PUBLISHED = auto()
    ABORTED = auto()


CoordinatorPolicy = ConsortiumPolicy  # the coordinator holds the consortium's policy


class CoordinatorRound(RoundMachine):
    TERMINAL: ClassVar[frozenset[CoordinatorState]] = frozenset(
        {CoordinatorState.PUBLISHED, CoordinatorState.ABORTED})
    ABORTED: ClassVar[CoordinatorState] = CoordinatorState.ABORTED

    def __init__(self, round_id: bytes, *, secret: bytes, policy: ConsortiumPolicy,
                 signer: Signer, guard: DifferencingGuard | None = None) -> None:
        super().__init__(round_id, CoordinatorState.AWAIT_REQUEST)
        self._secret = secret
        self.policy = policy
        self.signer = signer
        self.guard = guard
        self.request: RoundRequest | None = None
        self.assignment: MaskAssignment | None = None
        self.digest = b""  # the assignment's digest: what every share must carry
        self.masks: U64 | None = None  # row i is the mask of participants[i]
        self.share: CoordinatorShare | None = None
        self.contributions: dict[str, Contribution] = {}
        self._notify: tuple[str, ...] = ()

    # -- helpers -------------------------------------------------------------------------
    @property
    def participants(self) -> tuple[str, ...]:
        return self.assignment.participants if self.assignment else ()

    @property
    def leader(self) -> str:
        return self.assignment.leader if self.assignment else ""

    def senders(self) -> frozenset[str] | None:
        return None if self.assignment is None else frozenset(self.assignment.participants)

    def missing(self) -> tuple[str, ...]:
        """Participants whose message the round still waits for."""
        if self.assignment is None:
            return ()
        out = [] if self.share is not None else [self.leader]
        out += [p for p in self.participants if p != self.leader and p not in self.contributions]
        return tuple(out)

    def abort(self, reason: AbortReason, detail: str,
              culprits: tuple[str, ...] = ()) -> list[Output]:
        out: list[Output] = [Send(p, self.abort_message(self.round_id, reason, detail, culprits))
                             for p in self._notify]
        return out + super().abort(reason, detail, culprits)

    def release(self) -> None:
        self.share = None
        self.contributions = {}
        self.request = None

    # -- handlers ------------------------------------------------------------------------
    def _on_request(self, sender: str, req: RoundRequest) -> list[Output]:
        self._notify = (sender,)  # until the request is accepted, only its sender hears back
        pol = self.policy
        problem = ""
        if sender != req.requester:
            problem = f"{sender} sent a request in the name of {req.requester}"
        elif missing := [a for a in req.attributes if a not in pol.attributes]:
            problem = f"attribute {missing[0]!r} is not configured"
        if problem:
            return self.abort(AbortReason.BAD_REQUEST, problem, (sender,))
        if problem := pol.problem(req.participants, req.min_holders, req.query.size):
            return self.abort(AbortReason.POLICY, problem, (sender,))
        if self.guard is not None and pol.allow_subsets and (
                problem := self.guard.problem(req.participants)):
            return self.abort(AbortReason.DIFFERENCING, problem, (sender,))
        n = len(req.participants)
        specs = tuple(pol.attributes[a] for a in req.attributes)
        if too := [s.name for s in specs if n > s.max_participants()]:
            return self.abort(AbortReason.BAD_REQUEST,
                              f"{n} participants could overflow the bounds of {too[0]}",
                              (sender,))
        # the leader: uniform among the participants, from a digest of the whole request
        request_digest = digest_of("request", encode(req))
        leader = req.participants[
            uniform_below(derive_seed(self._secret, "leader", request_digest), n, 1)[0]]
        width = 1 + len(specs)
        core = MaskAssignment(self.round_id, req.requester, req.participants, leader, specs,
                              req.scope, req.min_holders, req.deadline_ms, int(req.query.size),
                              query_digest(req.query), pol.masks,
                              np.zeros(width, dtype=np.uint64), bytes(SIGNATURE_BYTES),
                              req.token_epoch)
        digest = assignment_digest(core)
        attestation = self.signer.sign(attestation_statement(self.round_id, digest))
        if pol.masks is MaskMode.PAIRWISE:  # the institutions derive theirs pairwise
            masks = np.zeros((n, width), dtype=np.uint64)
        else:
            masks = zero_sum_masks(derive_seed(self._secret, "masks", digest), n, width)
            order = permutation(derive_seed(self._secret, "order", digest), n)
            masks = masks[order]  # assigned to the participants in random order (claim 4)
        if self.guard is not None:
            self.guard.record(req.participants)
        self.request = req
        self.masks = masks
        self.digest = digest
        self._notify = req.participants
        out: list[Output] = []
        for i, p in enumerate(req.participants):
            a = replace(core, mask=masks[i].copy(), attestation=attestation)
            if p == leader:
                self.assignment = a
            out.append(Send(p, a))
        assert self.assignment is not None
        out.append(Send(leader, LeaderQuery(self.round_id, digest, req.query)))
        out.append(SetTimer(self.round_id, req.deadline_ms))
        self.state = CoordinatorState.COLLECTING
        return out

    def _shape_problem(self, who: str, m: U64, rows: int | None = None) -> str:
        a = self.assignment
        assert a is not None
        if m.shape[1] != a.width:
            return f"{who}'s matrix has {m.shape[1]} columns, not {a.width}"
        if rows is not None:
            return "" if m.shape[0] == rows else (
                f"{who}'s matrix has {m.shape[0]} rows; the leader's share has {rows}")
        if (m.shape[0] != a.query_size) if a.scope is Scope.QUERY else (
                m.shape[0] > a.query_size):
            return f"{who}'s matrix has {m.shape[0]} rows for a query of {a.query_size}"
        return ""

    def _on_share(self, sender: str, msg: CoordinatorShare) -> list[Output]:
        if sender != self.leader:
            return self.abort_unexpected(sender, msg)
        if msg.assignment != self.digest:
            return self.abort(AbortReason.INCONSISTENT,
                              f"{sender}'s share was computed on another assignment", (sender,))
        if problem := self._shape_problem(sender, msg.share):
            return self.abort(AbortReason.INVALID_SHAPE, problem, (sender,))
        self.share = msg
        return self._maybe_finish()

    def _on_contribution(self, sender: str, msg: Contribution) -> list[Output]:
        if sender == self.leader:
            return self.abort_unexpected(sender, msg)
        if msg.assignment != self.digest:
            return self.abort(AbortReason.INCONSISTENT,
                              f"{sender}'s contribution was computed on another assignment",
                              (sender,))
        if not self.signer.verify(self.leader, msg.endorsement, endorsement_statement(
                self.round_id, self.digest, msg.rows_digest)):
            return self.abort(AbortReason.INCONSISTENT,
                              f"{sender}'s contribution carries no valid endorsement of its "
                              f"rows by {self.leader}", (sender,))
        if problem := self._shape_problem(sender, msg.values):
            return self.abort(AbortReason.INVALID_SHAPE, problem, (sender,))
        self.contributions[sender] = msg
        return self._maybe_finish()

    def _on_refusal(self, sender: str, msg: RoundAbort) -> list[Output]:
        """A participant refuses. The culprit is the refuser: whom it accuses is only its
        claim, kept in the detail, so no member can get an honest party named."""
        claim = f" (it names {', '.join(msg.culprits)})" if msg.culprits else ""
        return self.abort(msg.reason, f"{sender} refused the round{claim}: {msg.detail}",
                          (sender,))

    def _on_deadline(self, sender: str, _: Deadline) -> list[Output]:
        missing = self.missing()
        # without the leader's share nobody else could contribute: the leader is to blame
        culprits = (self.leader,) if self.share is None else missing
        return self.abort(AbortReason.TIMEOUT,
                          "no answer by the deadline from " + ", ".join(missing), culprits)

    def _maybe_finish(self) -> list[Output]:
        if self.missing():
            return []
        a, share = self.assignment, self.share
        assert a is not None
        assert share is not None
        rows = share.share.shape[0]
        for p in a.participants:
            c = self.contributions.get(p)
            if c is None:
                continue
            if c.rows_digest != share.rows_digest:
                # the endorsement verified: the leader signed two different sets of rows
                return self.abort(AbortReason.INCONSISTENT,
                                  f"{a.leader} gave {p} other rows than it shared with the "
                                  "coordinator (two endorsed row digests)", (a.leader,))
            if problem := self._shape_problem(p, c.values, rows):
                return self.abort(AbortReason.INVALID_SHAPE, problem, (p,))
        total = sum_matrices([share.share, *(self.contributions[p].values
                                             for p in a.participants if p != a.leader)])
        try:
            decoded = decode_totals(total, a.attributes, len(a.participants))
        except TotalOutOfRange as exc:  # masked values: nobody can be named
            return self.abort(AbortReason.TOTAL_OUT_OF_RANGE, str(exc))
        holders = decoded[:, 0]
        if a.scope is Scope.INTERSECTION and rows and int(holders.min()) < 1:
            return self.abort(AbortReason.INVALID_VALUE,
                              "a row of the leader's intersection has no holder")
        kept = holders >= a.min_holders
        result = RoundResult(self.round_id, rows, pack_bitmap(kept),
                             np.ascontiguousarray(total[kept]))
        self.state = CoordinatorState.PUBLISHED
        self._messages.clear()
        self.release()
        out: list[Output] = [Send(p, result) for p in a.participants]
        out.append(Published(self.round_id, rows, int(kept.sum())))
        return out

    TABLE: ClassVar[dict[tuple[object, type], Handler | _Buffer]] = {
        (CoordinatorState.AWAIT_REQUEST, RoundRequest): _on_request,
        (CoordinatorState.COLLECTING, CoordinatorShare): _on_share,
        (CoordinatorState.COLLECTING, Contribution): _on_contribution,
        (CoordinatorState.COLLECTING, RoundAbort): _on_refusal,
        (CoordinatorState.COLLECTING, Deadline): _on_deadline,
    }


__all__ = ["ConsortiumPolicy", "CoordinatorPolicy", "CoordinatorRound", "CoordinatorState",
           "Ended", "Published"]
