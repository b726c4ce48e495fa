"""The coordinator's view of one round (claims 4-6): masks, the query to the leader, the sum.

    AWAIT_REQUEST --RoundRequest--> COLLECTING --last chunk of the last input--> PUBLISHED
                                    COLLECTING --Deadline / refusal / invalid--> ABORTED

The coordinator adds matrices and nothing else: R = E_S + sum_{j != L} Y_j = sum_i X_i, because
the shares sum to X_L + m_L and the masks sum to zero. It sends the query to the leader in
chunks, and adds the share and contribution chunks as they arrive, in any order, each into the
running sum of its chunk (in place); it publishes only once every chunk of every participant is
in, and an abort drops every sum. Before publishing it checks every shape and that every total
is one that honest contributions within bounds can produce; otherwise it aborts. A round ends
exactly once: in PUBLISHED or in ABORTED.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum, auto
from typing import ClassVar

import numpy as np

from protocol.codec import (
    assignment_digest,
    attestation_statement,
    digest_of,
    encode,
    endorsement_statement,
    query_chunk_digests,
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
    ends_elsewhere,
    pack_bitmap,
)
from protocol.policy import ConsortiumPolicy, DifferencingGuard, Signer
from protocol.ring import (
    U64,
    derive_seed,
    permutation,
    uniform_below,
    zero_sum_masks,
)


class CoordinatorState(Enum):
    AWAIT_REQUEST = auto()
    COLLECTING = auto()
    PUBLISHED = auto()
    ABORTED = auto()


CoordinatorPolicy = ConsortiumPolicy  # the coordinator holds the consortium's policy


@dataclass
class ChunkSum:
    """One chunk of I at the coordinator: what the leader stated about it (by its own share or
    by its endorsement in a contribution), the running sum of the inputs taken, and whose."""

    rows: int
    rows_digest: bytes
    last: bool
    total: U64
    got: set[str] = field(default_factory=set)


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
        self.chunks: dict[int, ChunkSum] = {}
        self.last: int | None = None  # the index of I's last chunk, once the leader said it
        self.complete = 0  # chunks with every participant's input added
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
        """Participants a chunk is still due from (the leader while its last is unknown)."""
        if self.assignment is None:
            return ()
        due = range(self.last + 1) if self.last is not None else self.chunks
        return tuple(p for p in self.participants
                     if (p == self.leader and self.last is None) or
                     any(k not in self.chunks or p not in self.chunks[k].got for k in due))

    def abort(self, reason: AbortReason, detail: str,
              culprits: tuple[str, ...] = ()) -> list[Output]:
        out: list[Output] = [Send(p, self.abort_message(self.round_id, reason, detail, culprits))
                             for p in self._notify]
        return out + super().abort(reason, detail, culprits)

    def release(self) -> None:
        self.chunks = {}
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
        chunk_digests = query_chunk_digests(req.query, pol.chunk_rows)
        core = MaskAssignment(self.round_id, req.requester, req.participants, leader, specs,
                              req.scope, req.min_holders, req.deadline_ms, int(req.query.size),
                              query_digest(chunk_digests), pol.chunk_rows, chunk_digests,
                              pol.masks, np.zeros(width, dtype=np.uint64),
                              bytes(SIGNATURE_BYTES), req.token_epoch)
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
        for k in range(core.chunks):  # the leader joins each chunk as it arrives
            rows = core.query_rows(k)
            out.append(Send(leader, LeaderQuery(self.round_id, digest,
                                                req.query[rows.start:rows.stop], k)))
        out.append(SetTimer(self.round_id, req.deadline_ms))
        self.state = CoordinatorState.COLLECTING
        return out

    def _take(self, sender: str, chunk: int, last: bool, rows_digest: bytes,
              m: U64) -> list[Output]:
        """Add one share or contribution chunk into the running sum of its chunk. What it says
        about the chunk (rows, digest, last) is the leader's statement (its own share, or its
        endorsement that `_on_contribution` verified), so a conflict names the leader."""
        a = self.assignment
        assert a is not None
        leader = (a.leader,)
        if m.shape[1] != a.width:
            return self.abort(AbortReason.INVALID_SHAPE, f"{sender}'s chunk {chunk} has "
                              f"{m.shape[1]} columns, not {a.width}", (sender,))
        rows = m.shape[0]
        if problem := a.chunk_problem(chunk, rows, last):
            return self.abort(AbortReason.INVALID_SHAPE, f"{a.leader} stated {problem}", leader)
        if ends_elsewhere(self.last, self.chunks, chunk, last):
            return self.abort(AbortReason.INCONSISTENT, f"{a.leader} ended I at two different "
                              f"chunks ({self.last} and {chunk}, or a chunk past the last)",
                              leader)
        c = self.chunks.get(chunk)
        if c is None:
            # the sum starts as a copy of the first input (a decoded input is a read-only view)
            c = self.chunks[chunk] = ChunkSum(rows, rows_digest, last, np.array(m, copy=True))
        elif (c.rows, c.rows_digest, c.last) != (rows, rows_digest, last):
            return self.abort(AbortReason.INCONSISTENT,
                              f"{a.leader} stated two versions of chunk {chunk} of its rows "
                              f"(to the coordinator and to {sender}, or to two institutions)",
                              leader)
        else:
            np.add(c.total, m, out=c.total)
        c.got.add(sender)
        if last:
            self.last = chunk
        if len(c.got) == len(a.participants):
            self.complete += 1
        return self._maybe_finish()

    def _on_share(self, sender: str, msg: CoordinatorShare) -> list[Output]:
        if sender != self.leader:
            return self.abort_unexpected(sender, msg)
        if msg.assignment != self.digest:
            return self.abort(AbortReason.INCONSISTENT,
                              f"{sender}'s share was computed on another assignment", (sender,))
        return self._take(sender, msg.chunk, msg.last, msg.rows_digest, msg.share)

    def _on_contribution(self, sender: str, msg: Contribution) -> list[Output]:
        if sender == self.leader:
            return self.abort_unexpected(sender, msg)
        if msg.assignment != self.digest:
            return self.abort(AbortReason.INCONSISTENT,
                              f"{sender}'s contribution was computed on another assignment",
                              (sender,))
        if not self.signer.verify(self.leader, msg.endorsement, endorsement_statement(
                self.round_id, self.digest, msg.rows_digest, rows=msg.values.shape[0],
                chunk=msg.chunk, last=msg.last)):
            return self.abort(AbortReason.INCONSISTENT,
                              f"{sender}'s contribution (chunk {msg.chunk}) carries no valid "
                              f"endorsement of its rows by {self.leader}", (sender,))
        return self._take(sender, msg.chunk, msg.last, msg.rows_digest, msg.values)

    def _on_refusal(self, sender: str, msg: RoundAbort) -> list[Output]:
        """A participant refuses. The culprit is the refuser: whom it accuses is only its
        claim, kept in the detail, so no member can get an honest party named."""
        claim = f" (it names {', '.join(msg.culprits)})" if msg.culprits else ""
        return self.abort(msg.reason, f"{sender} refused the round{claim}: {msg.detail}",
                          (sender,))

    def _on_deadline(self, sender: str, _: Deadline) -> list[Output]:
        missing = self.missing()
        # without the leader's share chunks nobody else could contribute: the leader is to blame
        culprits = (self.leader,) if self.leader in missing else missing
        return self.abort(AbortReason.TIMEOUT,
                          "no answer by the deadline from " + ", ".join(missing), culprits)

    def _maybe_finish(self) -> list[Output]:
        a = self.assignment
        assert a is not None
        if self.last is None or self.complete != self.last + 1:
            return []
        totals: list[U64] = []
        kept: list[np.ndarray[tuple[int], np.dtype[np.bool_]]] = []
        for k in range(self.last + 1):  # the result's rows in chunk order: I's order
            total = self.chunks[k].total
            try:
                holders = decode_totals(total, a.attributes, len(a.participants))[:, 0]
            except TotalOutOfRange as exc:  # masked values: nobody can be named
                return self.abort(AbortReason.TOTAL_OUT_OF_RANGE, str(exc))
            if a.scope is Scope.INTERSECTION and holders.size and int(holders.min()) < 1:
                return self.abort(AbortReason.INVALID_VALUE,
                                  "a row of the leader's intersection has no holder")
            kept.append(holders >= a.min_holders)
            totals.append(total[kept[-1]])
        mask = np.concatenate(kept)
        result = RoundResult(self.round_id, int(mask.size), pack_bitmap(mask),
                             np.concatenate(totals))
        self.state = CoordinatorState.PUBLISHED
        self.release()
        out: list[Output] = [Send(p, result) for p in a.participants]
        out.append(Published(self.round_id, int(mask.size), int(mask.sum())))
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
