"""An in-memory `RoundService` for the API tests: the institutions' holdings in plain
dicts, each round's totals computed in the clear, no Kafka and no cryptography."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from decimal import Decimal
from typing import Any

import numpy as np

from agents.api.service import Delivery, RoundRequest
from protocol.fixedpoint import AttributeSpec
from protocol.machine import Outcome
from protocol.messages import Scope
from protocol.policy import ConsortiumPolicy
from protocol.tokens import tokenize
from zerosum.wire import Role

KEY = bytes(range(32))
Holdings = dict[str, dict[str, dict[str, Decimal]]]  # institution -> customer -> attribute


class _Listener:
    """One `deliveries()` iterator: registered when made, so nothing ends unseen. `idle` is
    set while its reader waits with nothing left: every delivery before has been handled."""

    def __init__(self, listeners: list[_Listener]) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.idle = asyncio.Event()
        listeners.append(self)

    def __aiter__(self) -> _Listener:
        return self

    async def __anext__(self) -> Delivery:
        if self.queue.empty():
            self.idle.set()
        return await self.queue.get()

    def put(self, delivery: Delivery) -> None:
        self.idle.clear()
        self.queue.put_nowait(delivery)


class FakeRoundService:
    """This institution is `me`; the leader of a round is its first participant.

    `gate`, when given, holds every round in `submit` until it is set; `entered` receives
    each round id as its `submit` begins. `in_flight` and `peak` count concurrent submits."""

    def __init__(self, policy: ConsortiumPolicy, holdings: Holdings, me: str = "bank-1",
                 gate: asyncio.Event | None = None) -> None:
        self._policy = policy
        self.holdings = holdings
        self.me = me
        self.gate = gate
        self.entered: asyncio.Queue[bytes] = asyncio.Queue()
        self.in_flight = 0
        self.peak = 0
        self.submitted = 0
        self._listeners: list[_Listener] = []
        self.probe: Callable[[], int] | None = None  # read as each submit begins
        self.probed: list[int] = []
        self.taken_ids: list[bytes] = []  # `taken` calls, in order

    def policy(self) -> ConsortiumPolicy:
        return self._policy

    async def submit(self, round_id: bytes, request: RoundRequest) -> Delivery:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.submitted += 1
        if self.probe is not None:
            self.probed.append(self.probe())
        try:
            self.entered.put_nowait(round_id)
            if self.gate is not None:
                await self.gate.wait()
            else:  # give the other rounds the loop, as a round on the bus would
                for _ in range(3):
                    await asyncio.sleep(0)
            delivery = self.outcome(round_id, request)
        finally:
            self.in_flight -= 1
        self.publish(delivery)
        return delivery

    def outcome(self, round_id: bytes, request: RoundRequest) -> Delivery:
        """The round's totals in the clear, shaped as the agent's `Outcome`."""
        specs = tuple(self._policy.attributes[a] for a in request.attributes)
        leader = request.participants[0]
        ids = [i for i in request.customer_ids if request.scope is Scope.QUERY
               or i in self.holdings[leader]]
        kept, rows = [], []
        for cid in ids:
            held = [self.holdings[p][cid] for p in request.participants
                    if cid in self.holdings[p]]
            if len(held) < request.min_holders:
                continue
            kept.append(cid)
            rows.append([len(held), *(sum(s.parse(str(h[s.name])) for h in held)
                                      for s in specs)])
        totals = np.array(rows, dtype=np.int64).reshape(len(rows), 1 + len(specs))
        roles = {Role.REQUESTER} | ({Role.LEADER} if leader == self.me else set())
        return Delivery(round_id, frozenset(roles), Outcome(
            round_id, tokenize(kept, KEY), totals, specs, len(ids) - len(kept), self.me),
            tuple(kept))

    def publish(self, delivery: Delivery) -> None:
        for listener in self._listeners:
            listener.put(delivery)

    async def handled(self) -> None:
        """Return once every delivery published so far has been taken and handled by each
        reader of `deliveries()` (it asked for the next one)."""
        for listener in self._listeners:
            await listener.idle.wait()

    def contribute(self, round_id: bytes, request: RoundRequest, role: Role) -> Delivery:
        """A round another institution asked for, ending here in `role`: rows by token."""
        asked = self.outcome(round_id, request)
        assert isinstance(asked.result, Outcome)
        delivery = Delivery(round_id, frozenset({role}), asked.result)
        self.publish(delivery)
        return delivery

    def deliveries(self) -> AsyncIterator[Delivery]:
        return _Listener(self._listeners)

    def status(self) -> Mapping[str, Any]:
        return {"submitted": self.submitted, "in_flight": self.in_flight}

    def taken(self, round_id: bytes) -> None:
        self.taken_ids.append(round_id)


def attribute_specs() -> dict[str, AttributeSpec]:
    return {"debt": AttributeSpec("debt", 2, 0, 10**12), "loans": AttributeSpec("loans", 0, 0,
                                                                              1000)}
