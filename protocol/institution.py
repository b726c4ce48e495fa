"""An institution's view of one round (claims 1-3): as the leader, or as one of the others.

    AWAIT_ASSIGNMENT --MaskAssignment--> AWAIT_QUERY (leader) --LeaderQuery--> AWAIT_RESULT
                                         AWAIT_SHARE (other)  --LeaderShare--> AWAIT_RESULT
    AWAIT_RESULT --RoundResult--> DONE;  any running state --RoundAbort / Deadline--> ABORTED

The leader joins Q with its data (I = Q ∩ D_L, in query order; or I = Q in `query` scope) and
splits X_L + m_L into n shares: a 32-byte seed for each other institution (E_j = PRG(seed_j))
and the full matrix E_S = X_L + m_L - sum_j E_j for the coordinator, without the tokens. Every
other institution aligns its data to the tokens of I and sends Y_j = E_j + X_j + m_j.
A share or query that arrives before the assignment is kept until the assignment arrives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar

import numpy as np

from protocol.codec import (
    assignment_digest,
    attestation_statement,
    endorsement_statement,
    query_digest,
    rows_digest,
)
from protocol.errors import AbortReason, DataError, TotalOutOfRange
from protocol.fixedpoint import AttributeSpec, decode_totals
from protocol.machine import (
    BUFFER,
    Deadline,
    Handler,
    Outcome,
    Output,
    RoundMachine,
    Send,
    SetTimer,
    _Buffer,
)
from protocol.messages import (
    Contribution,
    CoordinatorShare,
    LeaderQuery,
    LeaderShare,
    MaskAssignment,
    MaskMode,
    RoundAbort,
    RoundRequest,
    RoundResult,
    Scope,
)
from protocol.policy import ConsortiumPolicy, DifferencingGuard, Signer
from protocol.ring import (
    U64,
    add_mask,
    coordinator_share,
    derive_seed,
    pairwise_mask,
    pairwise_seed,
    prg_matrix,
)
from protocol.tokens import LocalTable, Tokens

DEFAULT_GRACE_MS = 5_000  # ms past a round's deadline an institution still waits for its end


class InstitutionState(Enum):
    AWAIT_ASSIGNMENT = auto()
    AWAIT_QUERY = auto()
    AWAIT_SHARE = auto()
    AWAIT_RESULT = auto()
    DONE = auto()
    ABORTED = auto()


@dataclass(frozen=True)
class InstitutionContext:
    """What an institution brings to every round: identity, secret, keys, data snapshot, and
    its own copy of the consortium's policy (checked against every assignment)."""

    me: str
    coordinator: str
    secret: bytes
    table: LocalTable
    policy: ConsortiumPolicy
    signer: Signer
    guard: DifferencingGuard | None = None
    grace_ms: int = DEFAULT_GRACE_MS
    token_epoch: int = 0  # the token key epoch of `table`
    earlier_tables: Mapping[int, LocalTable] = field(default_factory=dict)  # by token epoch
    # round id -> the terms of the request this institution sent for it (`request_terms`)
    requested: Mapping[bytes, RequestTerms] = field(default_factory=dict)

    @property
    def attributes(self) -> dict[str, AttributeSpec]:
        return self.policy.attributes

    def table_of(self, token_epoch: int) -> LocalTable | None:
        """The data with tokens under the token key of `token_epoch`, None if not held."""
        if token_epoch == self.token_epoch:
            return self.table
        return self.earlier_tables.get(token_epoch)


@dataclass(frozen=True)
class RequestTerms:
    """What a requester asked for, as its round's assignment must repeat it."""

    token_epoch: int
    scope: Scope
    participants: tuple[str, ...]
    attributes: tuple[str, ...]
    min_holders: int
    deadline_ms: int
    query_size: int
    query_digest: bytes

    def mismatch(self, a: MaskAssignment) -> str | None:
        """The first term `a` does not repeat, described; None if it repeats them all."""
        got = RequestTerms(a.token_epoch, a.scope, a.participants,
                           tuple(s.name for s in a.attributes), a.min_holders, a.deadline_ms,
                           a.query_size, a.query_digest)
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(got, f.name)
            if mine != theirs:
                return f"{f.name} is {theirs!r} in the assignment, {mine!r} in the request"
        return None


def request_terms(req: RoundRequest) -> RequestTerms:
    return RequestTerms(req.token_epoch, req.scope, req.participants, req.attributes,
                        req.min_holders, req.deadline_ms, int(req.query.size),
                        query_digest(req.query))


class InstitutionRound(RoundMachine):
    TERMINAL: ClassVar[frozenset[InstitutionState]] = frozenset(
        {InstitutionState.DONE, InstitutionState.ABORTED})
    ABORTED: ClassVar[InstitutionState] = InstitutionState.ABORTED

    def __init__(self, round_id: bytes, ctx: InstitutionContext) -> None:
        super().__init__(round_id, InstitutionState.AWAIT_ASSIGNMENT)
        self.ctx = ctx
        self.assignment: MaskAssignment | None = None
        self.digest = b""  # the assignment's digest
        self.tokens: Tokens | None = None  # tokens of I, in row order
        self.table = ctx.table  # the data under the round's token epoch (set by its assignment)

    def senders(self) -> frozenset[str] | None:
        a = self.assignment
        return None if a is None else frozenset((self.ctx.coordinator, *a.participants))

    def abort(self, reason: AbortReason, detail: str,
              culprits: tuple[str, ...] = ()) -> list[Output]:
        """Abort here and tell the coordinator (its own aborts end in `_on_abort`, timeouts
        are its to declare)."""
        out: list[Output] = []
        if reason is not AbortReason.TIMEOUT:
            out.append(Send(self.ctx.coordinator,
                            self.abort_message(self.round_id, reason, detail, culprits)))
        return out + super().abort(reason, detail, culprits)

    def release(self) -> None:
        self.tokens = None

    def _refuse(self, detail: str, reason: AbortReason = AbortReason.REFUSED,
                culprits: tuple[str, ...] | None = None) -> list[Output]:
        return self.abort(reason, f"{self.ctx.me}: {detail}",
                          (self.ctx.me,) if culprits is None else culprits)

    # -- handlers ------------------------------------------------------------------------
    def _on_assignment(self, sender: str, a: MaskAssignment) -> list[Output]:
        ctx = self.ctx
        if sender != ctx.coordinator or ctx.me not in a.participants:
            return self.abort_unexpected(sender, a)
        self.assignment = a
        self.digest = assignment_digest(a)
        coord = (ctx.coordinator,)
        if not ctx.signer.verify(ctx.coordinator, a.attestation,
                                 attestation_statement(self.round_id, self.digest)):
            return self._refuse("the assignment's attestation does not verify",
                                AbortReason.INCONSISTENT, coord)
        asked = ctx.requested.get(self.round_id) if a.requester == ctx.me else None
        if asked is not None and (problem := asked.mismatch(a)):
            # a coordinator that changes a request (its token epoch, query, scope, ...) would
            # otherwise hand back a result that answers another question
            return self._refuse(f"the assignment of the round it asked for differs from its "
                                f"request: {problem}", AbortReason.INCONSISTENT, coord)
        # the consortium's floors, checked against this institution's own copy
        if problem := ctx.policy.problem(a.participants, a.min_holders, a.query_size, a.masks):
            return self._refuse(problem, AbortReason.POLICY, (ctx.coordinator,))
        if ctx.guard is not None and ctx.policy.allow_subsets and (
                problem := ctx.guard.problem(a.participants)):
            return self._refuse(problem, AbortReason.DIFFERENCING, (ctx.coordinator,))
        table = ctx.table_of(a.token_epoch)
        if table is None:
            return self._refuse(f"the round's tokens are under token key epoch "
                                f"{a.token_epoch}, which this institution does not hold "
                                f"(current: {ctx.token_epoch})", AbortReason.TOKEN_EPOCH)
        self.table = table
        for spec in a.attributes:
            mine = ctx.attributes.get(spec.name)
            if mine != spec:
                return self._refuse(f"attribute {spec.name!r} differs from the local "
                                    f"configuration ({mine} here, {spec} in the round)")
            if spec.name not in table.columns:
                return self._refuse(f"the local data has no column {spec.name!r}")
        if ctx.guard is not None:
            ctx.guard.record(a.participants)
        self.state = (InstitutionState.AWAIT_QUERY if a.leader == ctx.me
                      else InstitutionState.AWAIT_SHARE)
        return [SetTimer(self.round_id, a.deadline_ms + ctx.grace_ms)]

    def _masked(self, values: U64) -> U64:
        """X + m: the dealt mask added to every row, or this institution's pairwise mask."""
        a, ctx = self.assignment, self.ctx
        assert a is not None
        if a.masks is MaskMode.DEALT:
            return add_mask(values, a.mask)
        me = a.participants.index(ctx.me)
        seeds = {j: pairwise_seed(ctx.signer.agree(p), self.digest, ctx.me, p)
                 for j, p in enumerate(a.participants) if p != ctx.me}
        mask = pairwise_mask(me, seeds, values.shape[0], values.shape[1])
        return np.add(values, mask, dtype=np.uint64)

    def _names(self) -> tuple[str, ...]:
        assert self.assignment is not None
        return tuple(s.name for s in self.assignment.attributes)

    def _on_query(self, sender: str, q: LeaderQuery) -> list[Output]:
        a, ctx = self.assignment, self.ctx
        assert a is not None
        if sender != ctx.coordinator:
            return self.abort_unexpected(sender, q)
        if q.assignment != self.digest or q.query.size != a.query_size or \
                query_digest(q.query) != a.query_digest:
            return self._refuse("the query does not match the round's assignment",
                                AbortReason.INCONSISTENT, (ctx.coordinator,))
        if a.scope is Scope.INTERSECTION:
            found, _ = self.table.locate(q.query)
            tokens = q.query[found]
        else:
            tokens = q.query
        try:
            values = self.table.aligned(tokens, self._names())
        except DataError as exc:
            return self._refuse(str(exc))
        others = [p for p in a.participants if p != ctx.me]
        # every seed of the round is derived from the digest of its whole assignment
        seeds = [derive_seed(ctx.secret, "share", self.digest, a.participants.index(p))
                 for p in others]
        salt = derive_seed(ctx.secret, "salt", self.digest)
        rows = rows_digest(salt, tokens)
        endorsement = ctx.signer.sign(endorsement_statement(self.round_id, self.digest, rows))
        e_s = coordinator_share(self._masked(values), seeds)
        self.tokens = tokens
        self.state = InstitutionState.AWAIT_RESULT
        out: list[Output] = [
            Send(p, LeaderShare(self.round_id, self.digest, a.attestation, salt, endorsement,
                                tokens, s))
            for p, s in zip(others, seeds, strict=True)]
        out.append(Send(ctx.coordinator, CoordinatorShare(self.round_id, self.digest, rows, e_s)))
        return out

    def _on_share(self, sender: str, s: LeaderShare) -> list[Output]:
        a, ctx = self.assignment, self.ctx
        assert a is not None
        if sender != a.leader:
            return self.abort_unexpected(sender, s)
        if not ctx.signer.verify(ctx.coordinator, s.attestation,
                                 attestation_statement(self.round_id, s.assignment)):
            return self._refuse(f"{sender} forwarded an attestation that does not verify",
                                AbortReason.INCONSISTENT, (sender,))
        if s.assignment != self.digest:
            # the coordinator signed two different assignments for this round
            return self._refuse(f"{ctx.coordinator} attested two different assignments",
                                AbortReason.INCONSISTENT, (ctx.coordinator,))
        rows = rows_digest(s.salt, s.tokens)
        if not ctx.signer.verify(sender, s.endorsement,
                                 endorsement_statement(self.round_id, self.digest, rows)):
            return self._refuse(f"{sender}'s endorsement of its rows does not verify",
                                AbortReason.INCONSISTENT, (sender,))
        n_rows = s.tokens.size
        if (n_rows != a.query_size) if a.scope is Scope.QUERY else (n_rows > a.query_size):
            return self._refuse(f"{sender} shared {n_rows} rows for a query of "
                                f"{a.query_size} ({a.scope})", AbortReason.INVALID_SHAPE,
                                (sender,))
        try:
            x = self.table.aligned(s.tokens, self._names())
        except DataError as exc:
            return self._refuse(str(exc))
        y = self._masked(x)
        y += prg_matrix(s.seed, n_rows, a.width)  # Y_j = E_j + X_j + m_j
        self.tokens = s.tokens
        self.state = InstitutionState.AWAIT_RESULT
        return [Send(ctx.coordinator, Contribution(self.round_id, self.digest, rows,
                                                   s.endorsement, y))]

    def _on_result(self, sender: str, r: RoundResult) -> list[Output]:
        a, tokens = self.assignment, self.tokens
        assert a is not None
        assert tokens is not None
        if sender != self.ctx.coordinator:
            return self.abort_unexpected(sender, r)
        if r.rows != tokens.size or r.totals.shape[1] != a.width:
            return self.abort(AbortReason.INVALID_SHAPE,
                              f"result has {r.rows} x {r.totals.shape[1]}, expected "
                              f"{tokens.size} x {a.width}", (sender,))
        try:
            totals = decode_totals(r.totals, a.attributes, len(a.participants))
        except TotalOutOfRange as exc:
            return self.abort(AbortReason.TOTAL_OUT_OF_RANGE, str(exc), (sender,))
        kept = r.kept_mask()
        if totals.shape[0] and int(totals[:, 0].min()) < a.min_holders:
            return self.abort(AbortReason.INVALID_VALUE,
                              "result shows a row below the minimum of holders", (sender,))
        self.state = InstitutionState.DONE
        out: list[Output] = [Outcome(self.round_id, tokens[kept], totals, a.attributes,
                                     int(r.rows - kept.sum()), a.requester)]
        self._messages.clear()
        self.release()
        return out

    def _on_abort(self, sender: str, m: RoundAbort) -> list[Output]:
        if sender != self.ctx.coordinator:
            return self.abort_unexpected(sender, m)
        # the coordinator ended the round: end it here without telling it back
        return RoundMachine.abort(self, m.reason, m.detail, m.culprits)

    def _on_deadline(self, sender: str, _: Deadline) -> list[Output]:
        return self.abort(AbortReason.TIMEOUT,
                          f"no result by the deadline (state {self.state.name})")

    TABLE: ClassVar[dict[tuple[object, type], Handler | _Buffer]] = {
        (InstitutionState.AWAIT_ASSIGNMENT, MaskAssignment): _on_assignment,
        (InstitutionState.AWAIT_ASSIGNMENT, LeaderQuery): BUFFER,
        (InstitutionState.AWAIT_ASSIGNMENT, LeaderShare): BUFFER,
        (InstitutionState.AWAIT_ASSIGNMENT, RoundAbort): _on_abort,
        (InstitutionState.AWAIT_ASSIGNMENT, Deadline): _on_deadline,
        (InstitutionState.AWAIT_QUERY, LeaderQuery): _on_query,
        (InstitutionState.AWAIT_QUERY, RoundAbort): _on_abort,
        (InstitutionState.AWAIT_QUERY, Deadline): _on_deadline,
        (InstitutionState.AWAIT_SHARE, LeaderShare): _on_share,
        (InstitutionState.AWAIT_SHARE, RoundAbort): _on_abort,
        (InstitutionState.AWAIT_SHARE, Deadline): _on_deadline,
        (InstitutionState.AWAIT_RESULT, RoundResult): _on_result,
        (InstitutionState.AWAIT_RESULT, RoundAbort): _on_abort,
        (InstitutionState.AWAIT_RESULT, Deadline): _on_deadline,
    }
