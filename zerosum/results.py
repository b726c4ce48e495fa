"""Rounds as the client returns them: totals as exact `decimal.Decimal`s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from zerosum.errors import ApiError, RoundAborted
from zerosum.wire import ROLE_ORDER, Role


@dataclass(frozen=True)
class Row:
    """One published row. `customer_id` is set when this institution asked for the round
    (it knows the ids of its query); otherwise rows go by `token`, the consortium's keyed hash
    of the id. `holders` is how many institutions hold the customer."""

    customer_id: str | None
    token: str
    holders: int
    totals: Mapping[str, Decimal]


@dataclass(frozen=True)
class RoundResult:
    """A published round: one `Row` per customer kept, and how many rows were withheld
    (held by fewer institutions than the round's min_holders)."""

    round_id: str
    roles: frozenset[Role]
    attributes: tuple[str, ...]
    rows: tuple[Row, ...]
    withheld: int

    def by_customer(self) -> dict[str, Row]:
        """The rows by customer id (those with one)."""
        return {r.customer_id: r for r in self.rows if r.customer_id is not None}


@dataclass(frozen=True)
class Delivery:
    """A round this institution took part in, from `Client.results()`: `result` when it
    was published, else `aborted`. `role` is the first of `roles` in the order requester,
    leader, contributor."""

    round_id: str
    roles: frozenset[Role]
    result: RoundResult | None
    aborted: RoundAborted | None

    @property
    def role(self) -> Role:
        return next(r for r in ROLE_ORDER if r in self.roles)


def parse_delivery(body: dict[str, Any]) -> Delivery:
    """A delivery frame's body (see `agents.api.codec.delivery_body`); `ApiError` if it is
    not one."""
    try:
        return _delivery(body)
    except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as exc:
        raise ApiError(f"a malformed delivery from the agent: {type(exc).__name__}: "
                       f"{exc}") from exc


def _delivery(body: dict[str, Any]) -> Delivery:
    round_id = str(body["round_id"])
    roles = frozenset(Role(r) for r in body["roles"])
    if body["status"] != "published":
        return Delivery(round_id, roles, None, RoundAborted(
            round_id, str(body["reason"]), str(body["detail"]),
            tuple(str(c) for c in body["culprits"])))
    names = tuple(str(name) for name, _ in body["attributes"])
    rows = tuple(Row(r[0], r[1], int(r[2]), dict(zip(names, map(Decimal, r[3:]), strict=True)))
                 for r in body["table"])
    return Delivery(round_id, roles, RoundResult(round_id, roles, names, rows,
                                                 int(body["withheld"])), None)
