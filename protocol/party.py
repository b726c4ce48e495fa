"""A party as a sans-I/O endpoint: envelope bytes in, envelope bytes and events out.

`CoordinatorParty` and `InstitutionParty` own the party's `Inbox` (verify, order, decrypt,
reassemble), its outgoing hash `Chain`, and one round machine per round id. They never raise on
input: whatever is wrong with an envelope or message comes back as a `Rejected` event carrying
the typed error, so an agent logs it and carries on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from protocol.codec import DEFAULT_MAX_BYTES, decode, encode
from protocol.coordinator import CoordinatorPolicy, CoordinatorRound
from protocol.envelope import Chain, Delivery, Inbox, PrivateParty, PublicParty, seal
from protocol.errors import (
    DuplicateRound,
    MalformedMessage,
    UnknownRound,
    ZerosumError,
)
from protocol.fixedpoint import AttributeSpec
from protocol.institution import InstitutionContext, InstitutionRound
from protocol.machine import Deadline, Output, RoundMachine, Send
from protocol.messages import Message, RoundAbort, RoundRequest, RoundResult, Scope
from protocol.tokens import LocalTable, Tokens

MAX_ROUNDS_KEPT = 100_000


@dataclass(frozen=True)
class Outgoing:
    """Envelopes to append to `topic` (the recipient's inbox), in order."""

    recipient: str
    topic: str
    round_id: bytes
    wires: tuple[bytes, ...]


@dataclass(frozen=True)
class Rejected:
    """An input that was refused, with its typed error (logged and counted; never fatal)."""

    error: ZerosumError


Event = Output | Outgoing | Rejected


class _Party:
    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty], consortium: str,
                 *, chain: Chain | None = None, max_body_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.me = me
        self.registry = registry
        self.consortium = consortium
        self.chain = chain or Chain()
        self.max_body_bytes = max_body_bytes
        self.inbox = Inbox(me, registry, consortium, max_body_bytes=max_body_bytes)
        self.rounds: OrderedDict[bytes, RoundMachine] = OrderedDict()

    # -- in --------------------------------------------------------------------------------
    def receive(self, wire: bytes) -> list[Event]:
        """One envelope from the bus. Never raises for anything a peer could have sent."""
        try:
            delivery = self.inbox.receive(wire)
        except ZerosumError as exc:
            return [Rejected(exc)]
        if delivery is None:
            return []
        if delivery.sender == self.me.party_id:
            return []  # our own receipt of a round's end (see CoordinatorParty._finish)
        try:
            msg = self._decode(delivery)
            return self._finish(self._route(delivery.sender, msg))
        except ZerosumError as exc:
            return [Rejected(exc)]

    def _decode(self, d: Delivery) -> Message:
        msg = decode(d.body, max_bytes=self.max_body_bytes)
        if d.kind != msg.KIND or msg.round_id != d.round_id:
            raise MalformedMessage(f"header says {d.kind.name} of round {d.round_id.hex()}, "
                                   f"body {msg.KIND.name} of {msg.round_id.hex()}",
                                   sender=d.sender)
        return msg

    def deadline(self, round_id: bytes) -> list[Event]:
        """The agent's clock says the round's deadline passed."""
        m = self.rounds.get(round_id)
        if m is None or m.state in m.TERMINAL:
            return []
        return self._finish(m.handle("", Deadline(round_id)))

    def _route(self, sender: str, msg: Message) -> list[Output]:
        raise NotImplementedError

    def _remember(self, round_id: bytes, machine: RoundMachine) -> None:
        self.rounds[round_id] = machine
        while len(self.rounds) > MAX_ROUNDS_KEPT:
            self.rounds.popitem(last=False)

    # -- out -------------------------------------------------------------------------------
    def _finish(self, outputs: list[Output]) -> list[Event]:
        events: list[Event] = []
        bodies: dict[int, bytes] = {}  # one encoding of a message sent to many (the result)
        for o in outputs:
            if isinstance(o, Send):
                body = bodies.setdefault(id(o.message), encode(o.message))
                events.append(self._seal(o, body))
            else:
                events.append(o)
        return events

    def _seal(self, send: Send, body: bytes | None = None) -> Outgoing:
        peer = self.registry[send.recipient]
        body = encode(send.message) if body is None else body
        wires = seal(body, sender=self.me, recipient=peer,
                     consortium=self.consortium, round_id=send.message.round_id,
                     kind=send.message.KIND, chain=self.chain)
        return Outgoing(peer.party_id, peer.topic, send.message.round_id, tuple(wires))

    def running(self) -> list[bytes]:
        return [rid for rid, m in self.rounds.items() if m.state not in m.TERMINAL]


class CoordinatorParty(_Party):
    """The coordinator. It also seals each round's result or abort to itself, once: a receipt
    in its own inbox, so that an audit with its key can compare what it published with the sum
    of what it received (it cannot open what it sealed to the institutions)."""

    def _finish(self, outputs: list[Output]) -> list[Event]:
        events = super()._finish(outputs)
        receipts: dict[bytes, Send] = {}
        for o in outputs:
            if isinstance(o, Send) and isinstance(o.message, RoundResult | RoundAbort):
                receipts.setdefault(o.message.round_id, Send(self.me.party_id, o.message))
        return events + [self._seal(r, encode(r.message)) for r in receipts.values()]

    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty], consortium: str,
                 policy: CoordinatorPolicy, *, chain: Chain | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(me, registry, consortium, chain=chain, max_body_bytes=max_body_bytes)
        self.policy = policy

    def _route(self, sender: str, msg: Message) -> list[Output]:
        m = self.rounds.get(msg.round_id)
        if isinstance(msg, RoundRequest):
            if m is None:
                m = CoordinatorRound(msg.round_id, secret=self.me.secret, policy=self.policy)
                self._remember(msg.round_id, m)
            elif not m.has_seen(sender, msg.KIND):
                # round ids are unique forever; only the request's own sender may repeat it
                raise DuplicateRound(f"round {msg.round_id.hex()} exists already",
                                     sender=sender)
        elif m is None:
            raise UnknownRound(f"{type(msg).__name__} for unknown round {msg.round_id.hex()}",
                               sender=sender)
        return m.handle(sender, msg)


class InstitutionParty(_Party):
    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty], consortium: str,
                 *, coordinator: str, table: LocalTable,
                 attributes: dict[str, AttributeSpec],
                 chain: Chain | None = None, grace_ms: int = 5_000,
                 max_body_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(me, registry, consortium, chain=chain, max_body_bytes=max_body_bytes)
        self.coordinator = coordinator
        self.attributes = attributes
        self.grace_ms = grace_ms
        self._table = table

    @property
    def table(self) -> LocalTable:
        return self._table

    def set_table(self, table: LocalTable) -> None:
        """A new data snapshot: used by rounds that start from now on."""
        self._table = table

    def _context(self) -> InstitutionContext:
        return InstitutionContext(self.me.party_id, self.coordinator, self.me.secret,
                                  self._table, self.attributes, self.grace_ms)

    def _route(self, sender: str, msg: Message) -> list[Output]:
        m = self.rounds.get(msg.round_id)
        if m is None:
            if isinstance(msg, RoundRequest):
                raise UnknownRound("an institution does not take round requests",
                                   sender=sender)
            m = InstitutionRound(msg.round_id, self._context())
            self._remember(msg.round_id, m)
        return m.handle(sender, msg)

    def request(self, round_id: bytes, query: Tokens, *, participants: tuple[str, ...],
                attributes: tuple[str, ...], deadline_ms: int, scope: Scope = Scope.INTERSECTION,
                min_holders: int = 1, leader: str = "") -> list[Event]:
        """Ask the coordinator for a round (raises ValueError for an invalid request)."""
        req = RoundRequest(round_id, self.me.party_id, participants, attributes, scope,
                           min_holders, deadline_ms, leader, query)
        return [self._seal(Send(self.coordinator, req))]
