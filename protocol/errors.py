"""One exception hierarchy for the protocol, and the closed set of abort reasons.

`LocalProtocolError`: this party was asked to do something the protocol forbids (a caller bug or
a late input to a finished round). `RemoteProtocolError`: a peer (or whoever wrote to the bus)
sent something invalid; each subclass carries the `AbortReason` that travels in messages.
"""

from __future__ import annotations

from enum import IntEnum


class AbortReason(IntEnum):
    """Why a round ended without a result. The numbers travel on the wire; never renumber."""

    TIMEOUT = 1
    BAD_SIGNATURE = 2
    WRONG_ROUND = 3
    EQUIVOCATION = 4
    INVALID_VALUE = 5
    BELOW_THRESHOLD = 6
    INVALID_SHAPE = 7
    UNEXPECTED_MESSAGE = 8
    BAD_REQUEST = 9
    REFUSED = 10
    MALFORMED = 11
    TOTAL_OUT_OF_RANGE = 12
    POLICY = 13  # the round breaks the consortium's policy (floors, subsets)
    INCONSISTENT = 14  # a message computed on another assignment or other rows than the round's
    DIFFERENCING = 15  # two published totals could differ by one institution's values alone
    TOKEN_EPOCH = 16  # the round's customer tokens are under a token key epoch not held here


class ZerosumError(Exception):
    """Base of every error the protocol raises on purpose."""


class LocalProtocolError(ZerosumError):
    """This party may not do that now (e.g. an input to a round that has already ended)."""


class RoundClosed(LocalProtocolError):
    """An input reached a round that already published its result or aborted."""


class RemoteProtocolError(ZerosumError):
    """A peer sent something invalid. `reason` is what an abort caused by it carries."""

    reason: AbortReason = AbortReason.MALFORMED

    def __init__(self, detail: str, *, sender: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.sender = sender


# -- codec ------------------------------------------------------------------------------------
class CodecError(RemoteProtocolError):
    """Bytes that are not a valid zerosum message. `path` names the offending field."""

    reason = AbortReason.MALFORMED

    def __init__(self, detail: str, *, path: str = "", sender: str | None = None) -> None:
        super().__init__(f"{path}: {detail}" if path else detail, sender=sender)
        self.path = path


class MessageTooLarge(CodecError):
    pass


class MalformedMessage(CodecError):
    pass


class UnsupportedVersion(CodecError):
    pass


class UnknownField(CodecError):
    pass


class MissingField(CodecError):
    pass


class WrongType(CodecError):
    pass


class InvalidField(CodecError):
    """A field of the right type whose value breaks an invariant (length, range, uniqueness)."""

    reason = AbortReason.INVALID_VALUE


# -- envelope ---------------------------------------------------------------------------------
class EnvelopeError(RemoteProtocolError):
    pass


class BadSignature(EnvelopeError):
    reason = AbortReason.BAD_SIGNATURE


class BadCiphertext(EnvelopeError):
    reason = AbortReason.BAD_SIGNATURE


class UnknownSender(EnvelopeError):
    reason = AbortReason.BAD_SIGNATURE


class UnknownEpoch(EnvelopeError):
    """An envelope signed with, or sealed to, a key epoch the receiver does not know or hold
    (a consortium file not yet reloaded, or a key already destroyed)."""

    reason = AbortReason.BAD_SIGNATURE


class RetiredKey(EnvelopeError):
    """An envelope, or a statement inside a message, under a key epoch this party no longer
    accepts: retired from the inbox position of the input (the agent's record), or older than
    an epoch its sender has already been seen signing with."""

    reason = AbortReason.BAD_SIGNATURE


class WrongRecipient(EnvelopeError):
    reason = AbortReason.UNEXPECTED_MESSAGE


class WrongConsortium(EnvelopeError):
    reason = AbortReason.UNEXPECTED_MESSAGE


class DuplicateEnvelope(EnvelopeError):
    """The same envelope again (same sender, sequence number and digest): harmless, dropped."""


class ReplayedEnvelope(EnvelopeError):
    """A sequence number older than the receiver's window that it cannot have missed."""

    reason = AbortReason.WRONG_ROUND


class BrokenChain(EnvelopeError):
    """The hash of the sender's previous envelope does not match the one received."""

    reason = AbortReason.EQUIVOCATION


class EquivocationError(EnvelopeError):
    """Two different envelopes with the same sender and sequence number.

    `evidence` is (digest of the first, the second envelope's bytes): with the topics, an
    auditor finds the first by its digest."""

    reason = AbortReason.EQUIVOCATION

    def __init__(self, detail: str, *, sender: str | None = None,
                 evidence: tuple[bytes, bytes] = (b"", b"")) -> None:
        super().__init__(detail, sender=sender)
        self.evidence = evidence


class ChunkError(EnvelopeError):
    pass


class PartialExpired(ChunkError):
    """A chunked message still unfinished `expire_after` inbox positions after its first part
    arrived: its parts are dropped, so that a lone part cannot hold the party's state open."""


# -- rounds -----------------------------------------------------------------------------------
class RoundError(RemoteProtocolError):
    pass


class UnknownRound(RoundError):
    reason = AbortReason.WRONG_ROUND


class DuplicateRound(RoundError):
    reason = AbortReason.BAD_REQUEST


class NotAParticipant(RoundError):
    """A message about a round from a party that has no part in it: dropped, never an abort."""

    reason = AbortReason.UNEXPECTED_MESSAGE


class ReplayedRound(RoundError):
    """A round id this party has already used: round ids are unique forever."""

    reason = AbortReason.WRONG_ROUND


class HandlingFailed(RemoteProtocolError):
    """Last resort: handling an input raised something no check foresaw. The input is
    rejected and counted like any other; the party carries on."""

    reason = AbortReason.MALFORMED


class QuotaExceeded(EnvelopeError):
    """A sender has more unfinished chunked messages or buffered bytes than its quota."""


class UnexpectedMessage(RoundError):
    reason = AbortReason.UNEXPECTED_MESSAGE


class EarlyExpired(RoundError):
    """A message kept for a round not open here (a leader's share that overtook the
    assignment) whose round did not open within `expire_after` inbox positions: dropped."""

    reason = AbortReason.WRONG_ROUND


# -- snapshots --------------------------------------------------------------------------------
class NotQuiescent(LocalProtocolError):
    """A snapshot was asked for while a round runs, a message waits for its round or a chunked
    message is half read: only a quiescent party can be snapshotted."""


class SnapshotError(ZerosumError):
    """Bytes that are not a usable snapshot of this party (corrupt, foreign, another version,
    or taken under another configuration): restore nothing, replay the inbox instead."""


# -- values -----------------------------------------------------------------------------------
class ValueRangeError(ZerosumError):
    """A local value outside its attribute's declared bounds, or an unparsable decimal."""


class TotalOutOfRange(ZerosumError):
    """A published total lies outside what n honest contributions within bounds can add up to.

    Raised instead of returning a wrapped number.
    """


class DataError(ZerosumError):
    """Local data that cannot be used: duplicate customer, wrong shape, missing column."""
