"""The coordinator's view of one round (claims 4-6): masks, the query to the leader, the sum.

    AWAIT_REQUEST --RoundRequest--> COLLECTING --last share/contribution--> PUBLISHED
                                    COLLECTING --Deadline / refusal / invalid--> ABORTED

The coordinator adds matrices and nothing else: R = E_S + sum_{j != L} Y_j = sum_i X_i, because
the shares sum to X_L + m_L and the masks sum to zero. Before publishing it checks every shape
and that every total is one that honest contributions within bounds can produce; otherwise it
aborts. A round ends exactly once: in PUBLISHED or in ABORTED.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import ClassVar

import numpy as np

from protocol.errors import AbortReason, TotalOutOfRange
from protocol.fixedpoint import AttributeSpec, decode_totals
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
    Contribution,
    CoordinatorShare,
    LeaderQuery,
    MaskAssignment,
    RoundAbort,
    RoundRequest,
    RoundResult,
    Scope,
    pack_bitmap,
)
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


@dataclass(frozen=True)
class CoordinatorPolicy:
    """The coordinator's configuration: known institutions, attribute specs, limits."""

    institutions: frozenset[str]
    attributes: dict[str, AttributeSpec]
    min_participants: int = 2
    max_query: int = 10_000_000


class CoordinatorRound(RoundMachine):
    TERMINAL: ClassVar[frozenset[CoordinatorState]] = frozenset(
        {CoordinatorState.PUBLISHED, CoordinatorState.ABORTED})
    ABORTED: ClassVar[CoordinatorState] = CoordinatorState.ABORTED

    def __init__(self, round_id: bytes, *, secret: bytes, policy: CoordinatorPolicy) -> None:
        super().__init__(round_id, CoordinatorState.AWAIT_REQUEST)
        self._secret = secret
        self.policy = policy
        self.request: RoundRequest | None = None
        self.assignment: MaskAssignment | None = None
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
        elif unknown := [p for p in req.participants if p not in pol.institutions]:
            problem = f"participant {unknown[0]!r} is not an institution of this consortium"
        elif missing := [a for a in req.attributes if a not in pol.attributes]:
            problem = f"attribute {missing[0]!r} is not configured"
        elif req.query.size > pol.max_query:
            problem = f"query of {req.query.size} customers exceeds {pol.max_query}"
        if problem:
            return self.abort(AbortReason.BAD_REQUEST, problem, (sender,))
        n = len(req.participants)
        specs = tuple(pol.attributes[a] for a in req.attributes)
        if n < pol.min_participants:
            return self.abort(AbortReason.BELOW_THRESHOLD,
                              f"{n} participants; the policy needs {pol.min_participants}")
        if too := [s.name for s in specs if n > s.max_participants()]:
            return self.abort(AbortReason.BAD_REQUEST,
                              f"{n} participants could overflow the bounds of {too[0]}")
        width = 1 + len(specs)
        masks = zero_sum_masks(derive_seed(self._secret, "masks", self.round_id), n, width)
        order = permutation(derive_seed(self._secret, "order", self.round_id), n)
        masks = masks[order]  # assigned to the participants in random order (claim 4)
        leader = req.leader or req.participants[
            uniform_below(derive_seed(self._secret, "leader", self.round_id), n, 1)[0]]
        self.request = req
        self.masks = masks
        self._notify = req.participants
        out: list[Output] = []
        for i, p in enumerate(req.participants):
            a = MaskAssignment(self.round_id, req.requester, req.participants, leader, specs,
                               req.scope, req.min_holders, req.deadline_ms, masks[i].copy())
            if p == leader:
                self.assignment = a
            out.append(Send(p, a))
        assert self.assignment is not None
        out.append(Send(leader, LeaderQuery(self.round_id, req.query)))
        out.append(SetTimer(self.round_id, req.deadline_ms))
        self.state = CoordinatorState.COLLECTING
        return out

    def _on_share(self, sender: str, msg: CoordinatorShare) -> list[Output]:
        if sender != self.leader:
            return self.invalid(sender, msg)
        self.share = msg
        return self._maybe_finish()

    def _on_contribution(self, sender: str, msg: Contribution) -> list[Output]:
        if sender not in self.participants or sender == self.leader:
            return self.invalid(sender, msg)
        self.contributions[sender] = msg
        return self._maybe_finish()

    def _on_refusal(self, sender: str, msg: RoundAbort) -> list[Output]:
        if sender not in self.participants:
            return self.invalid(sender, msg)
        return self.abort(msg.reason, f"{sender} refused the round: {msg.detail}", (sender,))

    def _on_deadline(self, sender: str, _: Deadline) -> list[Output]:
        missing = self.missing()
        return self.abort(AbortReason.TIMEOUT,
                          "no answer by the deadline from " + ", ".join(missing), missing)

    def _maybe_finish(self) -> list[Output]:
        if self.missing():
            return []
        a, req, share = self.assignment, self.request, self.share
        assert a is not None
        assert req is not None
        assert share is not None
        rows = share.share.shape[0]
        if share.share.shape[1] != a.width:
            return self.abort(AbortReason.INVALID_SHAPE,
                              f"{a.leader}'s share has {share.share.shape[1]} columns, "
                              f"not {a.width}", (a.leader,))
        if (rows != req.query.size) if a.scope is Scope.QUERY else (rows > req.query.size):
            return self.abort(AbortReason.INVALID_SHAPE,
                              f"{a.leader}'s share has {rows} rows for a query of "
                              f"{req.query.size} ({a.scope})", (a.leader,))
        for p, c in self.contributions.items():
            if c.values.shape != (rows, a.width):
                return self.abort(AbortReason.INVALID_SHAPE,
                                  f"{p}'s contribution is {c.values.shape}, expected "
                                  f"{(rows, a.width)}", (p,))
        total = sum_matrices([share.share, *(self.contributions[p].values
                                             for p in a.participants if p != a.leader)])
        try:
            decoded = decode_totals(total, a.attributes, len(a.participants))
        except TotalOutOfRange as exc:
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


__all__ = ["CoordinatorPolicy", "CoordinatorRound", "CoordinatorState", "Ended", "Published"]
