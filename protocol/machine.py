"""What the coordinator's and the institution's round machines share: inputs, outputs, and the
table-driven `handle` loop.

A machine's `TABLE` maps (state, input type) to a handler or to `BUFFER` (the input is early:
keep it and feed it again after the next transition). A pair with no entry is invalid: in a
running round it aborts the round with `UNEXPECTED_MESSAGE`; in an ended round it raises
`RoundClosed`. A message from a party that has no part in the round raises `NotAParticipant`
(the party drops and logs it: a stranger never aborts somebody else's round). Before the table
is consulted, a message equal in content to one already taken from the same sender (same kind,
same chunk) is dropped, and a different one of the same kind and chunk aborts the round with
`EQUIVOCATION`, both kept in `evidence`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from protocol.codec import encode
from protocol.errors import AbortReason, NotAParticipant, RoundClosed
from protocol.fixedpoint import AttributeSpec
from protocol.messages import Message, MessageKind, RoundAbort, chunk_of
from protocol.tokens import Tokens


@dataclass(frozen=True)
class Deadline:
    """Input: the round's deadline has passed (fired by the agent's clock, never read here)."""

    round_id: bytes


@dataclass(frozen=True)
class Send:
    """Output: deliver `message` to `recipient`."""

    recipient: str
    message: Message


@dataclass(frozen=True)
class SetTimer:
    """Output: feed `Deadline(round_id)` at `at_ms` (epoch milliseconds) unless ended first."""

    round_id: bytes
    at_ms: int


@dataclass(frozen=True)
class Ended:
    """Output: the round aborted, for this party, with a typed reason."""

    round_id: bytes
    reason: AbortReason
    detail: str
    culprits: tuple[str, ...]


@dataclass(frozen=True)
class Published:
    """Output (coordinator): the result went to every participant."""

    round_id: bytes
    rows: int
    kept: int


@dataclass(frozen=True, eq=False)
class Outcome:
    """Output (institution): the published totals, mapped back to tokens of I.

    `totals` is int64, one row per kept token; column 0 is holders, then `attributes` in scaled
    units. `withheld` counts rows below the round's minimum of holders.
    """

    round_id: bytes
    tokens: Tokens
    totals: NDArray[np.int64]
    attributes: tuple[AttributeSpec, ...]
    withheld: int
    requester: str


Output = Send | SetTimer | Ended | Published | Outcome
Input = Message | Deadline


class _Buffer(Enum):
    BUFFER = "buffer"


BUFFER = _Buffer.BUFFER
Handler = Callable[[Any, str, Any], list[Output]]


ENDED_DIGEST = 16  # bytes of each digest an ended round keeps


def _holds(taken: bytes, prefix: bytes) -> bool:
    """Whether `prefix` is one of the ENDED_DIGEST-byte entries of `taken`."""
    at = taken.find(prefix)
    while at != -1 and at % ENDED_DIGEST:
        at = taken.find(prefix, at + 1)
    return at != -1


class RoundMachine:
    """Base of one party's view of one round. Subclasses define states, TABLE and handlers."""

    TABLE: ClassVar[dict[tuple[Any, type], Handler | _Buffer]]
    TERMINAL: ClassVar[frozenset[Any]]
    ABORTED: ClassVar[Any]

    def __init__(self, round_id: bytes, initial: Any) -> None:
        self.round_id = round_id
        self.state = initial
        # (sender, digest of the message taken first, digest of the conflicting one): digests,
        # not messages, so that equivocation cannot pin memory; the topics hold the messages
        self.evidence: list[tuple[str, bytes, bytes]] = []
        # content digests for duplicate checks, per (sender, kind, chunk): 32 bytes each, not
        # the messages, so that a round holds none of its chunks once it has handled them
        self._seen: dict[tuple[str, MessageKind, int], bytes] = {}
        # once the round has ended: per (sender, kind), the ENDED_DIGEST-byte prefixes of the
        # digests taken, one after the other (an ended round only tells a copy, dropped quietly,
        # from anything else, refused; a prefix collision would only choose between the two)
        self._ended: dict[tuple[str, MessageKind], bytes] | None = None
        self._pending: list[tuple[str, Input]] = []
        self.dropped: list[str] = []  # senders of buffered inputs dropped as strangers

    def has_seen(self, sender: str, kind: MessageKind, chunk: int = 0) -> bool:
        if self._ended is not None:
            return (sender, kind) in self._ended
        return (sender, kind, chunk) in self._seen

    def seen_digests(self) -> dict[tuple[str, MessageKind], bytes]:
        """Per (sender, kind), the digest prefixes of the messages taken, in the order taken
        (what an ended round keeps)."""
        if self._ended is not None:
            return dict(self._ended)
        out: dict[tuple[str, MessageKind], bytes] = {}
        for (sender, kind, _), digest in self._seen.items():
            out[(sender, kind)] = out.get((sender, kind), b"") + digest[:ENDED_DIGEST]
        return out

    def senders(self) -> frozenset[str] | None:
        """Who has a part in this round (subclasses know who); None: anyone, so far."""
        return None

    def may_send(self, sender: str) -> bool:
        """Whether `sender` has a part in this round."""
        allowed = self.senders()
        return allowed is None or sender in allowed

    def handle(self, sender: str, inp: Input) -> list[Output]:
        """Feed one input from `sender` (the authenticated envelope sender, or "" for timers)."""
        if isinstance(inp, Message) and not self.may_send(sender):
            raise NotAParticipant(f"{type(inp).__name__} from {sender}, who has no part in "
                                  f"round {self.round_id.hex()}", sender=sender)
        if self._ended is not None:
            taken = self._ended.get((sender, inp.KIND)) if isinstance(inp, Message) else None
            if taken is not None and isinstance(inp, Message):
                if _holds(taken, hashlib.sha256(encode(inp)).digest()[:ENDED_DIGEST]):
                    return []
                raise RoundClosed(f"round {self.round_id.hex()} has ended")
            raise RoundClosed(f"round {self.round_id.hex()} has ended ({self.state.name}); "
                              f"{type(inp).__name__} from {sender or 'the clock'} ignored")
        out = self._handle_live(sender, inp)
        if self.state in self.TERMINAL:
            self._close()
        return out

    def _close(self) -> None:
        """The round has ended: keep its duplicate checks compact from now on."""
        if self._ended is None:
            self._ended = self.seen_digests()
            self._seen = {}

    def _handle_live(self, sender: str, inp: Input) -> list[Output]:
        digest = b""
        if isinstance(inp, Message):
            key = (sender, inp.KIND, chunk_of(inp))
            digest = hashlib.sha256(encode(inp)).digest()
            prior = self._seen.get(key)
            if prior is not None:
                if prior == digest:
                    return []
                if self.state in self.TERMINAL:
                    raise RoundClosed(f"round {self.round_id.hex()} has ended")
                self.evidence.append((sender, prior, digest))
                return self.abort(AbortReason.EQUIVOCATION,
                                  f"{sender} sent two different {inp.KIND.name} (chunk "
                                  f"{key[2]})", (sender,))
        if self.state in self.TERMINAL:
            raise RoundClosed(f"round {self.round_id.hex()} has ended ({self.state.name}); "
                              f"{type(inp).__name__} from {sender or 'the clock'} ignored")
        entry = self.TABLE.get((self.state, type(inp)))
        if isinstance(inp, Message):
            self._seen[(sender, inp.KIND, chunk_of(inp))] = digest
        if entry is None:
            return self.abort_unexpected(sender, inp)
        if entry is BUFFER:
            if problem := self.unheld(sender, inp):
                return self.abort(AbortReason.INVALID_SHAPE, problem, (sender,) if sender else ())
            self._pending.append((sender, inp))
            return []
        out = entry(self, sender, inp)
        return out + self._drain()

    def unheld(self, sender: str, inp: Input) -> str:
        """Why `inp` from `sender` is not to be held for a later state ("": it is held)."""
        return ""

    def _drain(self) -> list[Output]:
        out: list[Output] = []
        progressed = True
        while progressed and self._pending and self.state not in self.TERMINAL:
            progressed = False
            for i, (sender, inp) in enumerate(self._pending):
                entry = self.TABLE.get((self.state, type(inp)))
                if entry is BUFFER:
                    continue
                del self._pending[i]
                if sender and not self.may_send(sender):
                    self.dropped.append(sender)  # early, and from a stranger: never an abort
                elif entry is None:
                    out += self.abort_unexpected(sender, inp)
                else:
                    out += entry(self, sender, inp)
                progressed = True
                break
        return out

    def abort_unexpected(self, sender: str, inp: Input) -> list[Output]:
        """Abort the round: `inp` (from `sender`; "" for the clock) has no place in this state."""
        what = type(inp).__name__
        return self.abort(AbortReason.UNEXPECTED_MESSAGE,
                          f"{what} from {sender or 'the clock'} in state {self.state.name}",
                          (sender,) if sender else ())

    def abort(self, reason: AbortReason, detail: str,
              culprits: tuple[str, ...] = ()) -> list[Output]:
        """End the round with `reason`; subclasses add whom to tell."""
        self.state = self.ABORTED
        self._pending.clear()
        self.release()
        self._close()
        return [Ended(self.round_id, reason, detail[:1024], culprits)]

    def release(self) -> None:
        """Drop the round's large data once it has ended (kept: state, evidence, seen)."""

    @staticmethod
    def abort_message(round_id: bytes, reason: AbortReason, detail: str,
                      culprits: tuple[str, ...]) -> RoundAbort:
        return RoundAbort(round_id, reason, detail[:1024], culprits)
