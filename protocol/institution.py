"""An institution's view of one round (claims 1-3): as the leader, or as one of the others.

    AWAIT_ASSIGNMENT --MaskAssignment--> AWAIT_QUERY (leader) --last LeaderQuery--> AWAIT_RESULT
                                         AWAIT_SHARE (other)  --last LeaderShare--> AWAIT_RESULT
    AWAIT_RESULT --RoundResult--> DONE;  any running state --RoundAbort / Deadline--> ABORTED

The leader joins Q with its data (I = Q ∩ D_L, in query order; or I = Q in `query` scope) and
splits X_L + m_L into n shares: a 32-byte seed for each other institution (E_j = PRG(seed_j))
and the full matrix E_S = X_L + m_L - sum_j E_j for the coordinator, without the tokens. Every
other institution aligns its data to the tokens of I and sends Y_j = E_j + X_j + m_j.

All of it chunk by chunk (messages.py): the leader joins each query chunk as it arrives (in
order), and sends a chunk of I, its shares and E_S, as soon as it has a full chunk of rows (the
rest, marked last, once the whole query is joined); every other institution sends the
contribution of each chunk of I as it arrives. A chunk of E_j is the same row range of PRG(seed_j)
at the leader and at j (`ring.prg_rows`). Each query chunk is checked against its digest in the
assignment, each share chunk against the leader's endorsement, on arrival.
A share or query that arrives before the assignment is kept until the assignment arrives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar, TypeVar

import numpy as np
from numpy.typing import NDArray

from protocol.codec import (
    assignment_digest,
    attestation_statement,
    endorsement_statement,
    query_chunk_digests,
    query_digest,
    rows_digest,
)
from protocol.errors import AbortReason, DataError, TotalOutOfRange
from protocol.fixedpoint import AttributeSpec, decode_totals
from protocol.machine import (
    BUFFER,
    Deadline,
    Handler,
    Input,
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
    chunk_count,
    ends_elsewhere,
)
from protocol.policy import ConsortiumPolicy, DifferencingGuard, Signer
from protocol.ring import (
    U64,
    add_mask,
    coordinator_share,
    derive_seed,
    pairwise_mask,
    pairwise_seed,
    prg_rows,
)
from protocol.tokens import TOKEN_DTYPE, LocalTable, Tokens

G = TypeVar("G", bound=np.generic)
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


def request_terms(req: RoundRequest, chunk_rows: int) -> RequestTerms:
    """`req`'s terms, its query's digest over chunks of the policy's `chunk_rows`."""
    return RequestTerms(req.token_epoch, req.scope, req.participants, req.attributes,
                        req.min_holders, req.deadline_ms, int(req.query.size),
                        query_digest(query_chunk_digests(req.query, chunk_rows)))


def _rows(inp: Input) -> int:
    """The rows of a chunk held before the assignment (a query chunk or a leader's share)."""
    return inp.query.size if isinstance(inp, LeaderQuery) else \
        inp.tokens.size if isinstance(inp, LeaderShare) else 0


@dataclass
class _Joined:
    """The leader's rows of I joined but not yet shared (fewer than a chunk, but for the
    query chunk just joined), and what it needs to share them."""

    tokens: list[Tokens] = field(default_factory=list)
    values: list[U64] = field(default_factory=list)
    rows: int = 0
    seeds: list[bytes] = field(default_factory=list)
    salt: bytes = b""


class InstitutionRound(RoundMachine):
    TERMINAL: ClassVar[frozenset[InstitutionState]] = frozenset(
        {InstitutionState.DONE, InstitutionState.ABORTED})
    ABORTED: ClassVar[InstitutionState] = InstitutionState.ABORTED

    def __init__(self, round_id: bytes, ctx: InstitutionContext) -> None:
        super().__init__(round_id, InstitutionState.AWAIT_ASSIGNMENT)
        self.ctx = ctx
        self.assignment: MaskAssignment | None = None
        self.digest = b""  # the assignment's digest
        self.chunks: dict[int, Tokens] = {}  # tokens of I, by chunk of I
        self.last: int | None = None  # I's last chunk, once the leader said which
        self.queries: dict[int, Tokens] = {}  # the leader's query chunks ahead of their turn
        self.joined = 0  # the leader's query chunks joined
        self.unshared = _Joined()
        self.unsent: list[Output] = []  # `intersection` scope: chunks of I shared, not sent
        self.table = ctx.table  # the data under the round's token epoch (set by its assignment)

    @property
    def tokens(self) -> Tokens | None:
        """The tokens of I in row order, once every chunk is in (None before)."""
        if self.last is None or len(self.chunks) != self.last + 1:
            return None
        return np.concatenate([self.chunks[k] for k in range(self.last + 1)]) if \
            self.last else self.chunks[0]

    def senders(self) -> frozenset[str] | None:
        a = self.assignment
        return None if a is None else frozenset((self.ctx.coordinator, *a.participants))

    def unheld(self, sender: str, inp: Input) -> str:
        """Before the assignment a sender's chunks of one kind are held only as far as an
        honest round sends them: each of at most `chunk_rows` rows, at most `max_query` rows in
        at most max_query / chunk_rows chunks (what one whole query would hold)."""
        pol = self.ctx.policy
        rows = _rows(inp)
        held = [_rows(i) for s, i in self._pending if s == sender and type(i) is type(inp)]
        if rows > pol.chunk_rows or len(held) >= chunk_count(pol.max_query, pol.chunk_rows) \
                or sum(held) + rows > pol.max_query:
            return (f"{sender} sent more {type(inp).__name__} chunks before the assignment "
                    f"than a round holds (this one {rows} rows, {len(held)} held of "
                    f"{sum(held)} rows; chunk_rows {pol.chunk_rows}, max_query {pol.max_query})")
        return ""

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
        self.chunks = {}
        self.queries = {}
        self.unshared = _Joined()
        self.unsent = []

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
        if problem := ctx.policy.problem(a.participants, a.min_holders, a.query_size, a.masks,
                                         a.chunk_rows):
            return self._refuse(problem, AbortReason.POLICY, (ctx.coordinator,))
        if query_digest(a.query_chunks) != a.query_digest:
            return self._refuse("the assignment's query digest is not that of its chunks' "
                                "digests", AbortReason.INCONSISTENT, coord)
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

    def _masked(self, values: U64, start: int) -> U64:
        """X + m over rows start .. of I: the dealt mask added to every row, or this
        institution's pairwise mask over that row range."""
        a, ctx = self.assignment, self.ctx
        assert a is not None
        if a.masks is MaskMode.DEALT:
            return add_mask(values, a.mask)
        me = a.participants.index(ctx.me)
        seeds = {j: pairwise_seed(ctx.signer.agree(p), self.digest, ctx.me, p)
                 for j, p in enumerate(a.participants) if p != ctx.me}
        mask = pairwise_mask(me, seeds, values.shape[0], values.shape[1], start)
        np.add(mask, values, out=mask)
        return mask

    def _names(self) -> tuple[str, ...]:
        assert self.assignment is not None
        return tuple(s.name for s in self.assignment.attributes)

    def _on_query(self, sender: str, q: LeaderQuery) -> list[Output]:
        a, ctx = self.assignment, self.ctx
        assert a is not None
        if sender != ctx.coordinator:
            return self.abort_unexpected(sender, q)
        if q.assignment != self.digest or q.chunk >= a.chunks or \
                q.query.size != len(a.query_rows(q.chunk)) or \
                query_chunk_digests(q.query, a.chunk_rows) != a.chunk_digest(q.chunk):
            return self._refuse(f"query chunk {q.chunk} does not match the round's assignment",
                                AbortReason.INCONSISTENT, (ctx.coordinator,))
        if not self.unshared.salt:  # the first chunk: the round's seeds and salt
            others = [p for p in a.participants if p != ctx.me]
            # every seed of the round is derived from the digest of its whole assignment
            self.unshared.seeds = [derive_seed(ctx.secret, "share", self.digest,
                                               a.participants.index(p)) for p in others]
            self.unshared.salt = derive_seed(ctx.secret, "salt", self.digest)
        self.queries[q.chunk] = q.query  # joined in query order: I is in query order
        out: list[Output] = []
        while self.joined in self.queries:
            query = self.queries.pop(self.joined)
            self.joined += 1
            if problem := self._join(query):
                return self._refuse(problem)
            final = self.joined == a.chunks
            # a full chunk is shared at once (in `intersection` scope the last may then be
            # empty); at the end of the query the rest is the last chunk, full or not
            while self.unshared.rows > a.chunk_rows or (
                    self.unshared.rows == a.chunk_rows and not final):
                out += self._share_chunk(a.chunk_rows, last=False)
            if final:
                out += self._share_chunk(self.unshared.rows, last=True)
                self.state = InstitutionState.AWAIT_RESULT
        if a.scope is Scope.INTERSECTION and self.state is not InstitutionState.AWAIT_RESULT:
            # when a chunk of I left would tell which query chunk filled it (with a chunk of
            # one row: I itself), so none leaves before the whole query is joined
            self.unsent += out
            return []
        out, self.unsent = self.unsent + out, []
        return out

    def _join(self, query: Tokens) -> str:
        """Join one query chunk into the leader's rows of I not yet shared."""
        a, p = self.assignment, self.unshared
        assert a is not None
        if a.scope is Scope.INTERSECTION:
            found, _ = self.table.locate(query)
            tokens = query[found]
        else:
            tokens = query
        try:
            p.values.append(self.table.aligned(tokens, self._names()))
        except DataError as exc:
            return str(exc)
        p.tokens.append(tokens)
        p.rows += tokens.size
        return ""

    def _share_chunk(self, rows: int, *, last: bool) -> list[Output]:
        """The leader's next chunk of I (its first `rows` joined rows): a LeaderShare to every
        other institution and E_S to the coordinator."""
        a, ctx, p = self.assignment, self.ctx, self.unshared
        assert a is not None
        k = len(self.chunks)
        tokens = _take_rows(p.tokens, rows, np.empty(0, dtype=TOKEN_DTYPE))
        values = _take_rows(p.values, rows, np.empty((0, a.width), dtype=np.uint64))
        p.rows -= rows
        start = k * a.chunk_rows
        digest = rows_digest(p.salt, tokens)
        endorsement = ctx.signer.sign(endorsement_statement(
            self.round_id, self.digest, digest, rows=rows, chunk=k, last=last))
        e_s = coordinator_share(self._masked(values, start), p.seeds, start)
        self.chunks[k] = tokens
        if last:
            self.last = k
        others = [q for q in a.participants if q != ctx.me]
        out: list[Output] = [
            Send(q, LeaderShare(self.round_id, self.digest, a.attestation, p.salt, endorsement,
                                tokens, s, k, last))
            for q, s in zip(others, p.seeds, strict=True)]
        out.append(Send(ctx.coordinator, CoordinatorShare(self.round_id, self.digest, digest,
                                                          e_s, k, last)))
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
        n_rows = s.tokens.size
        rows = rows_digest(s.salt, s.tokens)
        if not ctx.signer.verify(sender, s.endorsement, endorsement_statement(
                self.round_id, self.digest, rows, rows=n_rows, chunk=s.chunk, last=s.last)):
            return self._refuse(f"{sender}'s endorsement of its rows (chunk {s.chunk}) does "
                                "not verify", AbortReason.INCONSISTENT, (sender,))
        if problem := a.chunk_problem(s.chunk, n_rows, s.last):
            return self._refuse(f"{sender} shared {problem}", AbortReason.INVALID_SHAPE,
                                (sender,))
        if ends_elsewhere(self.last, self.chunks, s.chunk, s.last):
            return self._refuse(f"{sender} ended I at two different chunks",
                                AbortReason.INCONSISTENT, (sender,))
        try:
            x = self.table.aligned(s.tokens, self._names())
        except DataError as exc:
            return self._refuse(str(exc))
        start = s.chunk * a.chunk_rows
        y = self._masked(x, start)
        y += prg_rows(s.seed, start, n_rows, a.width)  # Y_j = E_j + X_j + m_j
        self.chunks[s.chunk] = s.tokens
        if s.last:
            self.last = s.chunk
        if self.tokens is not None:
            self.state = InstitutionState.AWAIT_RESULT
        return [Send(ctx.coordinator, Contribution(self.round_id, self.digest, rows,
                                                   s.endorsement, y, s.chunk, s.last))]

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


def _take_rows(parts: list[NDArray[G]], rows: int, empty: NDArray[G]) -> NDArray[G]:
    """Remove the first `rows` rows from the list of arrays `parts` and return them as one
    array (a view when they lie in one part)."""
    taken = []
    need = rows
    while need:
        head = parts[0]
        if head.shape[0] <= need:
            taken.append(parts.pop(0))
            need -= head.shape[0]
        else:
            taken.append(head[:need])
            parts[0] = head[need:]
            need = 0
    if not taken:
        return empty
    return taken[0] if len(taken) == 1 else np.concatenate(taken)

