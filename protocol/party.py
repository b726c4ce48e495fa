"""A party as a sans-I/O endpoint: envelope bytes in, envelope bytes and events out.

`CoordinatorParty` and `InstitutionParty` own the party's `Inbox` (verify, order, decrypt,
reassemble), its outgoing hash `Chain`, and one round machine per round id. They never raise on
input: whatever is wrong with an envelope or message comes back as a `Rejected` event carrying
the typed error (a last-resort guard turns anything unforeseen into `HandlingFailed`), so an
agent logs it, counts it and carries on.

Round ids are unique forever: `ledger` maps every round id this party ever opened to the inbox
position and the digest of the envelope that opened it (`RoundOpened` tells the agent to
persist it). Opening a
known id again is refused (`ReplayedRound`) unless it is the very same input replayed from the
same position (same envelope), which is how an agent rebuilds its state after a restart.

A restart need not replay the whole inbox: a party that is `quiescent()` (no round running, no
message waiting for its round, no chunked message half read) can be `snapshot()`ed, and a new
party `restore()`d from those bytes continues exactly as the old one would have from the next
inbox position (`protocol.snapshot`). What a hostile member could hold open for ever (an early
share whose round never opens, one part of a chunked message) is dropped `expire_after` inbox
positions after it arrived (`EarlyExpired`, `PartialExpired`), so quiescence is always reached
once the rounds in flight end.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidSignature

from protocol.codec import DEFAULT_MAX_BYTES, decode, encode
from protocol.coordinator import CoordinatorPolicy, CoordinatorRound
from protocol.envelope import (
    NO_POSITION,
    Chain,
    Delivery,
    Inbox,
    PrivateParty,
    PublicParty,
    seal,
)
from protocol.errors import (
    DuplicateRound,
    EarlyExpired,
    HandlingFailed,
    MalformedMessage,
    NotAParticipant,
    NotQuiescent,
    QuotaExceeded,
    ReplayedRound,
    SnapshotError,
    UnknownRound,
    ZerosumError,
)
from protocol.institution import (
    DEFAULT_GRACE_MS,
    InstitutionContext,
    InstitutionRound,
    RequestTerms,
    request_terms,
)
from protocol.machine import Deadline, Output, RoundMachine, Send
from protocol.messages import (
    LeaderShare,
    Message,
    RoundAbort,
    RoundRequest,
    RoundResult,
    Scope,
)
from protocol.policy import ConsortiumPolicy, DifferencingGuard
from protocol.snapshot import PartySnapshot, RoundState
from protocol.snapshot import decode as decode_snapshot
from protocol.snapshot import encode as encode_snapshot
from protocol.tokens import LocalTable, Tokens

MAX_ROUNDS_KEPT = 100_000  # machines kept in memory; the ledger keeps every id forever
# peers' messages kept until the coordinator opens their round, per sender: bounded in bytes,
# each message charged its tokens and EARLY_MESSAGE_BYTES more (so at most 65,536 messages),
# not in a count, since a leader sends all its chunks of I at once (one per 65,472 rows)
MAX_EARLY_BYTES_PER_SENDER = 64 * 1024 * 1024
EARLY_MESSAGE_BYTES = 1024
LEDGER_DIGEST_BYTES = 8


class Keyring:
    """Signs with this party's key and verifies with the registry's (`policy.Signer`)."""

    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty],
                 inbox: Inbox | None = None) -> None:
        self._me = me
        self._registry = registry
        self._inbox = inbox  # which past key epochs still verify (current key only if None)
        self._shared: dict[str, bytes] = {}  # static X25519 agreements, per peer

    def sign(self, statement: bytes) -> bytes:
        return self._me.signing_key.sign(statement)

    def agree(self, party: str) -> bytes:
        shared = self._shared.get(party)
        if shared is None:
            peer = self._registry.get(party)
            if peer is None:
                raise ValueError(f"{party} is not in the registry")
            shared = self._shared[party] = self._me.agreement().exchange(peer.agreement())
        return shared

    def verify(self, party: str, signature: bytes, statement: bytes) -> bool:
        """With the party's current key, or a past one the inbox still accepts for the round
        of the message in hand (`Inbox.signing_keys`: a statement signed before the party
        rotated, in a round opened here before its new key was seen)."""
        peer = self._registry.get(party)
        if peer is None:
            return False
        keys_of = (peer,) if self._inbox is None else self._inbox.signing_keys(peer)
        for keys in keys_of:
            try:
                keys.signing_key.verify(signature, statement)
            except InvalidSignature:
                continue
            return True
        return False


@dataclass(frozen=True)
class RoundOpened:
    """A new round id entered the ledger at inbox `position`, opened by the envelope whose
    digest starts with `envelope`: persist it before the outputs of the same input are sent."""

    round_id: bytes
    position: int
    envelope: bytes


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


Event = Output | Outgoing | Rejected | RoundOpened


class _Party:
    ROLE: ClassVar[str]
    policy: ConsortiumPolicy
    guard: DifferencingGuard

    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty], consortium: str,
                 *, chain: Chain | None = None, max_body_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.me = me
        self.registry = registry
        self.consortium = consortium
        self.chain = chain or Chain()
        self.max_body_bytes = max_body_bytes
        self.inbox = Inbox(me, registry, consortium, max_body_bytes=max_body_bytes)
        self.keyring = Keyring(me, registry, self.inbox)
        self.rounds: OrderedDict[bytes, RoundMachine] = OrderedDict()
        self._live: dict[bytes, None] = {}  # ids of rounds that may still run, oldest first
        self.ledger: dict[bytes, tuple[int, bytes]] = {}  # id -> (position, envelope digest)
        self.sealing = True  # False while an agent replays inputs whose outputs were sent
        # the inbox position of the last input: the one given, or (an in-memory driver gives
        # none) the count of inputs so far minus one; what held messages expire by
        self.last_position = NO_POSITION
        self._position = NO_POSITION
        self.next_position = 0  # after the last input received at a position
        self._envelope = b""
        self._opened: list[RoundOpened] = []

    # -- in --------------------------------------------------------------------------------
    def receive(self, wire: bytes, position: int = NO_POSITION) -> list[Event]:
        """One envelope from the bus, read at inbox `position` (when there is one).

        Never raises for anything a peer could have sent: every error is a `Rejected` event.
        First come the messages held past `policy.expire_after` positions, dropped.
        """
        now = position if position != NO_POSITION else self.last_position + 1
        self.last_position = now
        oldest = now - self.policy.expire_after
        expired: list[Event] = [Rejected(e) for e in (*self.inbox.expire_partials(oldest),
                                                      *self._expire_early(oldest))]
        return expired + self._receive(wire, position)

    def _receive(self, wire: bytes, position: int) -> list[Event]:
        self._position = position
        if position != NO_POSITION:
            self.next_position = max(self.next_position, position + 1)
        self._envelope = b""
        self._opened = []
        try:
            try:
                delivery = self.inbox.receive(wire, position, at=self.last_position)
                if delivery is None or delivery.sender == self.me.party_id:
                    return []  # parts still due, or our own receipt of a round's end
                self.inbox.round_id = delivery.round_id
                self._envelope = delivery.digest[:LEDGER_DIGEST_BYTES]
                msg = self._decode(delivery)
                events = self._seal_outputs(self._route(delivery.sender, msg))
            except ZerosumError as exc:
                return [*self._opened, Rejected(exc)]
            except Exception as exc:  # last resort: an input never stops the party
                return [*self._opened, Rejected(HandlingFailed(
                    f"{type(exc).__name__} while handling an input: {exc}"[:1024]))]
            return [*self._opened, *events]
        finally:
            self._position = NO_POSITION
            self.inbox.position, self.inbox.round_id = NO_POSITION, b""

    def rekey(self, me: PrivateParty) -> None:
        """This party's keys rotated: sign and open with `me` from now on (it holds the KEM
        keys of the past epochs still in their grace)."""
        self.me = me
        self.inbox.me = me
        self.keyring = Keyring(me, self.registry, self.inbox)

    def retire(self, party: str, epoch: int, from_position: int) -> None:
        """`party`'s key `epoch` is refused in inputs from inbox `from_position` on, in
        envelopes and in statements inside messages. The agent records this durably before
        it handles that position, and passes its records again after a restart, so that a
        replay of the inbox refuses exactly what the live run refused."""
        self.inbox.retire(party, epoch, from_position)

    def _open(self, round_id: bytes, machine: RoundMachine, sender: str) -> RoundMachine:
        """Enter a new round in the ledger, or refuse an id that was used before."""
        known = self.ledger.get(round_id)
        mark = (self._position, self._envelope)
        if known is not None and (known[0] == NO_POSITION or known != mark):
            raise ReplayedRound(f"round id {round_id.hex()} was used before; round ids are "
                                "unique forever", sender=sender)
        if known is None:
            self.ledger[round_id] = mark
            self._opened.append(RoundOpened(round_id, *mark))
        self.inbox.open_round(round_id)
        self._remember(round_id, machine)
        return machine

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
        return self._seal_outputs(m.handle("", Deadline(round_id)))

    def _route(self, sender: str, msg: Message) -> list[Output]:
        raise NotImplementedError

    def _remember(self, round_id: bytes, machine: RoundMachine) -> None:
        self.rounds[round_id] = machine
        self._live[round_id] = None
        while len(self.rounds) > MAX_ROUNDS_KEPT:
            self.rounds.popitem(last=False)

    # -- out -------------------------------------------------------------------------------
    def _seal_outputs(self, outputs: list[Output]) -> list[Event]:
        """Each Send sealed into an Outgoing (none while replaying); other outputs as they are."""
        events: list[Event] = []
        bodies: dict[int, bytes] = {}  # one encoding of a message sent to many (the result)
        for o in outputs:
            if isinstance(o, Send):
                if self.sealing:  # a replayed input's envelopes are on the bus already
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
        """Ids of the rounds not ended, oldest first (without a look at the ended ones)."""
        self._live = {rid: None for rid in self._live
                      if (m := self.rounds.get(rid)) is not None and m.state not in m.TERMINAL}
        return list(self._live)

    # -- snapshots -------------------------------------------------------------------------
    def _expire_early(self, oldest: int) -> list[ZerosumError]:
        """Drop messages held for rounds not open here that arrived before `oldest`."""
        return []

    def _holds_early(self) -> bool:
        return False

    def quiescent(self) -> bool:
        """No round running, no message waiting for its round, no chunked message half
        read: what a replay from the next inbox position cannot rebuild is all in
        `snapshot()`."""
        return not (self.inbox.partial() or self._holds_early() or self.running())

    def snapshot(self) -> bytes:
        """This party's state as bytes (`protocol.snapshot`), valid after inbox position
        `last_position`; NotQuiescent unless `quiescent()`."""
        if not self.quiescent():
            raise NotQuiescent(
                f"{self.me.party_id} is not quiescent: {len(self.running())} rounds running, "
                f"early messages held: {self._holds_early()}, a chunked message half read: "
                f"{self.inbox.partial()}")
        return encode_snapshot(PartySnapshot(
            self.ROLE, self.me.party_id, self.consortium, self.last_position,
            (self.chain.next_seq, self.chain.prev), len(self.ledger),
            self.guard.window, self.guard.sets(), self.inbox.sequences(),
            [RoundState.of(m) for m in self.rounds.values()]))

    def restore(self, data: bytes) -> int:
        """Take the state of `snapshot()`'s bytes; the inbox position to read from next.

        Call it on a party that has handled nothing yet, after setting its `ledger` (the
        agent's `rounds.ledger`): SnapshotError, and nothing changed, when the bytes are not a
        snapshot of this party and consortium, were taken under another difference window, or
        name rounds the ledger lacks. The chain stays the party's own where that is further
        on (the agent's outbox knows envelopes sealed after the snapshot).
        """
        if self.last_position != NO_POSITION or self.rounds or self.inbox.sequences():
            raise ValueError("restore() takes a party that has handled no input")
        snap = decode_snapshot(data)
        me = (self.ROLE, self.me.party_id, self.consortium)
        if (snap.role, snap.party, snap.consortium) != me:
            raise SnapshotError(f"a snapshot of {snap.role} {snap.party!r} in consortium "
                                f"{snap.consortium!r}, not of {me[0]} {me[1]!r} in {me[2]!r}")
        if snap.difference_window != self.guard.window:
            raise SnapshotError(f"taken under a difference window of {snap.difference_window}"
                                f" rounds; the policy now says {self.guard.window}")
        if len(self.ledger) < snap.ledger_entries:
            raise SnapshotError(f"the ledger holds {len(self.ledger)} round ids; the snapshot "
                                f"was taken beside {snap.ledger_entries}")
        if lost := [r.round_id for r in snap.rounds if r.round_id not in self.ledger]:
            raise SnapshotError(f"round {lost[0].hex()} of the snapshot is not in the ledger")
        self.last_position = snap.last_position
        self.next_position = max(self.next_position, snap.last_position + 1)
        if snap.chain[0] > self.chain.next_seq:
            self.chain.next_seq, self.chain.prev = snap.chain
        self.guard.restore(snap.guard)
        self.inbox.restore_sequences(snap.sequences)
        for r in snap.rounds:
            self.rounds[r.round_id] = r.machine()
        return self.last_position + 1


class CoordinatorParty(_Party):
    """The coordinator. It also seals each round's result or abort to itself, once: a receipt
    in its own inbox, so that an audit with its key can compare what it published with the sum
    of what it received (it cannot open what it sealed to the institutions)."""

    ROLE = "coordinator"

    def _seal_outputs(self, outputs: list[Output]) -> list[Event]:
        events = super()._seal_outputs(outputs)
        if not self.sealing:
            return events
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
        self.guard = DifferencingGuard(policy.difference_window)

    def _route(self, sender: str, msg: Message) -> list[Output]:
        m = self.rounds.get(msg.round_id)
        if isinstance(msg, RoundRequest):
            if m is None:
                m = self._open(msg.round_id, CoordinatorRound(
                    msg.round_id, secret=self.me.secret, policy=self.policy,
                    signer=self.keyring, guard=self.guard), sender)
            elif not m.has_seen(sender, msg.KIND):
                # round ids are unique forever; only the request's own sender may repeat it
                raise DuplicateRound(f"round {msg.round_id.hex()} exists already",
                                     sender=sender)
        elif m is None:
            raise UnknownRound(f"{type(msg).__name__} for unknown round {msg.round_id.hex()}",
                               sender=sender)
        return m.handle(sender, msg)


class InstitutionParty(_Party):
    """An institution. A round opens only on a message from the coordinator; a peer's
    message for a round not open yet (a leader's share can overtake the assignment) waits in
    a small per-sender buffer, `policy.expire_after` inbox positions at most."""

    ROLE = "institution"

    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty], consortium: str,
                 *, coordinator: str, table: LocalTable, policy: ConsortiumPolicy,
                 chain: Chain | None = None, grace_ms: int = DEFAULT_GRACE_MS,
                 max_body_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(me, registry, consortium, chain=chain, max_body_bytes=max_body_bytes)
        self.coordinator = coordinator
        self.policy = policy
        self.attributes = policy.attributes
        self.grace_ms = grace_ms
        self.guard = DifferencingGuard(policy.difference_window)
        self._table = table
        self._token_epoch = 0
        self._earlier_tables: dict[int, LocalTable] = {}
        # per sender: (round id, message, inbox position) of messages for rounds not open yet
        self._early: dict[str, deque[tuple[bytes, Message, int]]] = {}
        # what this institution asked for, by round id: its assignment must repeat it
        self._requested: OrderedDict[bytes, RequestTerms] = OrderedDict()

    @property
    def table(self) -> LocalTable:
        return self._table

    def set_table(self, table: LocalTable, token_epoch: int = 0,
                  earlier: dict[int, LocalTable] | None = None) -> None:
        """A new data snapshot, its tokens under the token key of `token_epoch`, and the same
        data under the token keys of `earlier` epochs still held: used by rounds that start
        from now on, each with the table of the token epoch its assignment names."""
        self._table = table
        self._token_epoch = token_epoch
        self._earlier_tables = dict(earlier or {})

    def _context(self) -> InstitutionContext:
        return InstitutionContext(self.me.party_id, self.coordinator, self.me.secret,
                                  self._table, self.policy, self.keyring, self.guard,
                                  self.grace_ms, self._token_epoch, self._earlier_tables,
                                  self._requested)

    def _route(self, sender: str, msg: Message) -> list[Output]:
        if isinstance(msg, RoundRequest):
            raise UnknownRound("an institution does not take round requests", sender=sender)
        m = self.rounds.get(msg.round_id)
        if m is not None:
            return m.handle(sender, msg)
        if sender != self.coordinator:
            if sender not in self.policy.institutions:
                raise NotAParticipant(f"{sender} is not an institution of the consortium",
                                      sender=sender)
            if msg.round_id in self.ledger:
                raise ReplayedRound(f"{type(msg).__name__} for round {msg.round_id.hex()}, "
                                    "which has ended here", sender=sender)
            if not isinstance(msg, LeaderShare):  # only a leader's share can be early
                raise UnknownRound(f"{type(msg).__name__} for round {msg.round_id.hex()}, "
                                   "which is not open here", sender=sender)
            early = self._early.setdefault(sender, deque())
            early.append((msg.round_id, msg, self.last_position))
            held = sum(EARLY_MESSAGE_BYTES + int(m.tokens.nbytes)
                       for _, m, _ in early if isinstance(m, LeaderShare))
            if held > MAX_EARLY_BYTES_PER_SENDER:
                rid, _, _ = early.popleft()
                raise QuotaExceeded(f"{sender} has more early messages than its quota "
                                    f"({MAX_EARLY_BYTES_PER_SENDER} bytes, each message "
                                    f"{EARLY_MESSAGE_BYTES} bytes and its tokens); dropped one "
                                    f"for {rid.hex()}", sender=sender)
            return []
        m = self._open(msg.round_id, InstitutionRound(msg.round_id, self._context()), sender)
        out = m.handle(sender, msg)
        for peer, queue in self._early.items():
            for item in [it for it in queue if it[0] == msg.round_id]:
                queue.remove(item)
                try:
                    out += m.handle(peer, item[1])
                except ZerosumError:
                    m.dropped.append(peer)  # a stranger's early message: dropped
        self._early = {peer: queue for peer, queue in self._early.items() if queue}
        return out

    def _expire_early(self, oldest: int) -> list[ZerosumError]:
        errors: list[ZerosumError] = []
        for peer, queue in self._early.items():
            while queue and queue[0][2] < oldest:
                rid, msg, at = queue.popleft()
                errors.append(EarlyExpired(
                    f"{type(msg).__name__} of {peer} for round {rid.hex()}, held since inbox "
                    f"position {at}: its round did not open within {self.policy.expire_after} "
                    "positions; dropped", sender=peer))
        self._early = {peer: queue for peer, queue in self._early.items() if queue}
        return errors

    def _holds_early(self) -> bool:
        return any(self._early.values())

    def request(self, round_id: bytes, query: Tokens, *, participants: tuple[str, ...],
                attributes: tuple[str, ...], deadline_ms: int, scope: Scope = Scope.INTERSECTION,
                min_holders: int = 1, token_epoch: int = 0) -> list[Event]:
        """Ask the coordinator for a round whose `query` tokens are under the token key of
        `token_epoch` (raises ValueError for an invalid request)."""
        req = RoundRequest(round_id, self.me.party_id, participants, attributes, scope,
                           min_holders, deadline_ms, query, token_epoch)
        self._requested[round_id] = request_terms(req, self.policy.chunk_rows)
        while len(self._requested) > MAX_ROUNDS_KEPT:
            self._requested.popitem(last=False)
        return [self._seal(Send(self.coordinator, req))]
