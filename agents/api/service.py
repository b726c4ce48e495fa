"""What the API server needs of an institution agent: `RoundService`.

The server talks to the agent through this protocol only, so the agent (or a fake, in tests)
plugs in without the server knowing about Kafka, the outbox or the state machines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.machine import Ended, Outcome
from protocol.messages import Scope
from protocol.policy import ConsortiumPolicy
from zerosum.wire import ErrorCode, Role


@dataclass(frozen=True)
class RoundRequest:
    """A round as a local client asks for it, checked against the policy and with its
    defaults filled in (every attribute, the consortium's min_holders, every institution).

    `customer_ids` are the institution's plaintext ids: only its own agent tokenises them.
    `deadline_s` is seconds from now; None means the consortium's `deadline_s`."""

    customer_ids: tuple[str, ...]
    scope: Scope
    attributes: tuple[str, ...]
    min_holders: int
    participants: tuple[str, ...]
    deadline_s: float | None = None


@dataclass(frozen=True, eq=False)
class Delivery:
    """The end of a round this institution took part in, as its agent saw it.

    `roles` holds at least one role (a requester may also be the round's leader).
    `customer_ids` names the rows of an `Outcome` (one per token, in order) when this
    institution knows them, which is when it asked; otherwise None and rows go by token.
    """

    round_id: bytes
    roles: frozenset[Role]
    result: Outcome | Ended
    customer_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.roles:
            raise ValueError("a delivery names this institution's role in the round")
        if (self.customer_ids is not None and isinstance(self.result, Outcome)
                and len(self.customer_ids) != self.result.tokens.size):
            raise ValueError(f"{len(self.customer_ids)} customer ids for "
                             f"{self.result.tokens.size} rows")


def roles(me: str, requester: str, leader: str | None) -> frozenset[Role]:
    """This institution's roles in a round with that requester and leader (None: not
    known, when the round ended before its assignment reached this institution)."""
    mine = {Role.REQUESTER} if requester == me else set()
    if leader == me:
        mine.add(Role.LEADER)
    return frozenset(mine or {Role.CONTRIBUTOR})


class Refused(Exception):
    """A request the agent will not run; travels to the client as an error frame."""

    def __init__(self, code: ErrorCode, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field


class RoundService(Protocol):
    """An institution agent as the API server sees it. Every method is called from the
    agent's event loop."""

    def policy(self) -> ConsortiumPolicy:
        """The consortium's floors as the agent holds them now (they may be reloaded)."""
        ...

    async def submit(self, round_id: bytes, request: RoundRequest) -> Delivery:
        """Run one round that this institution requests and return its end, published or
        aborted (an abort is a result, not an exception). Raise `Refused` for a request the
        agent will not send. The server calls it with at most `max_in_flight` rounds at once,
        with a fresh random `round_id`; the round also appears on `deliveries()`."""
        ...

    def deliveries(self) -> AsyncIterator[Delivery]:
        """Every round this institution takes part in, in any role, as each ends, from the
        call on. The server reads it at once and never blocks on it: the agent may buffer
        without a bound here, or drop with a log line."""
        ...

    def status(self) -> Mapping[str, Any]:
        """The agent's figures (JSON values only), for the `status` request."""
        ...

    def taken(self, round_id: bytes) -> None:
        """The end of `round_id` reached a client: its requester's answer or a subscriber's
        delivery frame was written, or the app bus's record acknowledged. Until then the
        agent keeps it (durably, for a round asked here)."""
        ...
