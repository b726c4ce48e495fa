"""The messages of a round: frozen, typed, and validated when built, so an invalid one cannot exist.

Who sends what (PROTOCOL.md, "One round"):
  RoundRequest      institution -> coordinator   query tokens, columns, participants, policy
  MaskAssignment    coordinator -> institution   its mask and the round's parameters
  LeaderQuery       coordinator -> leader        the query tokens Q
  LeaderShare       leader -> institution        tokens of I and a 32-byte seed (its share E_j)
  CoordinatorShare  leader -> coordinator        E_S = X_L + m_L - sum_j PRG(seed_j), no tokens
  Contribution      institution -> coordinator   Y_j = E_j + X_j + m_j
  RoundResult       coordinator -> institution   totals of the rows at or above min_holders
  RoundAbort        coordinator -> institution   typed reason (or institution -> coordinator:
                                                 it refuses the round)

Matrices are |I| x A in Z_2^64 with column 0 = holders. Field kinds for the codec are given with
`Annotated` markers, so the codec needs no per-message code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, IntEnum, StrEnum
from typing import Annotated, ClassVar

import numpy as np

from protocol.errors import AbortReason
from protocol.fixedpoint import AttributeSpec
from protocol.ring import SEED_BYTES, U64
from protocol.tokens import TOKEN_DTYPE, Tokens, first_duplicate

PROTOCOL_VERSION = 1
ROUND_ID_BYTES = 16
MAX_PARTICIPANTS = 256
MAX_ATTRIBUTES = 64
MAX_DETAIL = 1024
_PARTY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class FieldKind(Enum):
    ROUND_ID = "round_id"
    SEED = "seed"
    TOKENS = "tokens"
    MATRIX = "matrix"
    VECTOR = "vector"
    BITMAP = "bitmap"


RoundId = Annotated[bytes, FieldKind.ROUND_ID]
Seed = Annotated[bytes, FieldKind.SEED]
TokenList = Annotated[Tokens, FieldKind.TOKENS]
Matrix = Annotated[U64, FieldKind.MATRIX]
Vector = Annotated[U64, FieldKind.VECTOR]
Bitmap = Annotated[bytes, FieldKind.BITMAP]


class MessageKind(IntEnum):
    """The kind of a message; the numbers travel in envelope headers. Never renumber."""

    ROUND_REQUEST = 1
    MASK_ASSIGNMENT = 2
    LEADER_QUERY = 3
    LEADER_SHARE = 4
    COORDINATOR_SHARE = 5
    CONTRIBUTION = 6
    ROUND_RESULT = 7
    ROUND_ABORT = 8


class Scope(StrEnum):
    """`intersection`: the patent's reading, rows are the query customers the leader holds.
    `query`: every query customer is a row (zero where the leader holds none), so nobody learns
    which customers the leader holds."""

    INTERSECTION = "intersection"
    QUERY = "query"


def check_party(name: str, what: str = "party id") -> None:
    if not _PARTY.match(name):
        raise ValueError(f"{what} {name!r}: 1-63 of a-z 0-9 _ . -, starting with a letter or digit")


def _check_round_id(rid: bytes) -> None:
    if len(rid) != ROUND_ID_BYTES:
        raise ValueError(f"round_id has {len(rid)} bytes, expected {ROUND_ID_BYTES}")


def _check_tokens(tokens: Tokens, what: str) -> None:
    if tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d array of {TOKEN_DTYPE}")
    dup = first_duplicate(tokens)
    if dup is not None:
        raise ValueError(f"{what}: token {dup} appears more than once")


def _check_participants(participants: tuple[str, ...]) -> None:
    if not 2 <= len(participants) <= MAX_PARTICIPANTS:
        raise ValueError(f"participants: need 2..{MAX_PARTICIPANTS}, got {len(participants)}")
    for p in participants:
        check_party(p, "participant")
    if len(set(participants)) != len(participants):
        raise ValueError("participants: a party is listed twice")


def _check_min_holders(min_holders: int, n: int) -> None:
    if not 0 <= min_holders <= n:
        raise ValueError(f"min_holders {min_holders} is not in 0..{n}")


def _check_matrix(m: U64, what: str) -> None:
    if m.dtype != np.uint64 or m.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d uint64 matrix")


@dataclass(frozen=True, eq=False)
class Message:
    """Base of every message. Compare contents with `codec.same_content`, not `==`."""

    KIND: ClassVar[MessageKind]
    round_id: RoundId

    def __post_init__(self) -> None:
        _check_round_id(self.round_id)


@dataclass(frozen=True, eq=False)
class RoundRequest(Message):
    KIND: ClassVar[MessageKind] = MessageKind.ROUND_REQUEST
    requester: str
    participants: tuple[str, ...]
    attributes: tuple[str, ...]
    scope: Scope
    min_holders: int
    deadline_ms: int
    leader: str  # "" lets the coordinator choose at random
    query: TokenList

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_participants(self.participants)
        if self.requester not in self.participants:
            raise ValueError(f"requester {self.requester!r} is not among the participants")
        if self.leader and self.leader not in self.participants:
            raise ValueError(f"leader {self.leader!r} is not among the participants")
        if len(self.attributes) > MAX_ATTRIBUTES or len(set(self.attributes)) != len(
                self.attributes):
            raise ValueError("attributes: at most 64, each once")
        _check_min_holders(self.min_holders, len(self.participants))
        if self.deadline_ms <= 0:
            raise ValueError("deadline_ms must be a positive epoch time in milliseconds")
        _check_tokens(self.query, "query")


@dataclass(frozen=True, eq=False)
class MaskAssignment(Message):
    KIND: ClassVar[MessageKind] = MessageKind.MASK_ASSIGNMENT
    requester: str
    participants: tuple[str, ...]
    leader: str
    attributes: tuple[AttributeSpec, ...]
    scope: Scope
    min_holders: int
    deadline_ms: int
    mask: Vector

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_participants(self.participants)
        for who, name in (("leader", self.leader), ("requester", self.requester)):
            if name not in self.participants:
                raise ValueError(f"{who} {name!r} is not among the participants")
        if len({a.name for a in self.attributes}) != len(self.attributes):
            raise ValueError("attributes: each at most once")
        if self.mask.dtype != np.uint64 or self.mask.shape != (1 + len(self.attributes),):
            raise ValueError(f"mask: expected {1 + len(self.attributes)} uint64 values")
        _check_min_holders(self.min_holders, len(self.participants))

    @property
    def width(self) -> int:
        """A: the number of columns, `holders` included."""
        return 1 + len(self.attributes)


@dataclass(frozen=True, eq=False)
class LeaderQuery(Message):
    KIND: ClassVar[MessageKind] = MessageKind.LEADER_QUERY
    query: TokenList

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tokens(self.query, "query")


@dataclass(frozen=True, eq=False)
class LeaderShare(Message):
    KIND: ClassVar[MessageKind] = MessageKind.LEADER_SHARE
    tokens: TokenList
    seed: Seed

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tokens(self.tokens, "tokens")
        if len(self.seed) != SEED_BYTES:
            raise ValueError(f"seed has {len(self.seed)} bytes, expected {SEED_BYTES}")


@dataclass(frozen=True, eq=False)
class CoordinatorShare(Message):
    KIND: ClassVar[MessageKind] = MessageKind.COORDINATOR_SHARE
    share: Matrix

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_matrix(self.share, "share")


@dataclass(frozen=True, eq=False)
class Contribution(Message):
    KIND: ClassVar[MessageKind] = MessageKind.CONTRIBUTION
    values: Matrix

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_matrix(self.values, "values")


@dataclass(frozen=True, eq=False)
class RoundResult(Message):
    """`kept` has one bit per row of I (LSB first); `totals` holds the kept rows in order."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_RESULT
    rows: int
    kept: Bitmap
    totals: Matrix

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_matrix(self.totals, "totals")
        if self.rows < 0 or len(self.kept) != (self.rows + 7) // 8:
            raise ValueError(f"kept: expected {(self.rows + 7) // 8} bytes for {self.rows} rows")
        bits = np.unpackbits(np.frombuffer(self.kept, dtype=np.uint8), bitorder="little")
        if bits[self.rows:].any():
            raise ValueError("kept: bits past the last row are set")
        if int(bits.sum()) != self.totals.shape[0]:
            raise ValueError(f"totals: {self.totals.shape[0]} rows but {int(bits.sum())} kept")

    def kept_mask(self) -> np.ndarray[tuple[int], np.dtype[np.bool_]]:
        bits = np.unpackbits(np.frombuffer(self.kept, dtype=np.uint8), bitorder="little")
        return bits[: self.rows].astype(np.bool_)


@dataclass(frozen=True, eq=False)
class RoundAbort(Message):
    KIND: ClassVar[MessageKind] = MessageKind.ROUND_ABORT
    reason: AbortReason
    detail: str
    culprits: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.detail) > MAX_DETAIL:
            raise ValueError(f"detail: at most {MAX_DETAIL} characters")
        for c in self.culprits:
            check_party(c, "culprit")


MESSAGE_TYPES: dict[MessageKind, type[Message]] = {
    cls.KIND: cls for cls in (RoundRequest, MaskAssignment, LeaderQuery, LeaderShare,
                              CoordinatorShare, Contribution, RoundResult, RoundAbort)
}


def pack_bitmap(mask: np.ndarray[tuple[int], np.dtype[np.bool_]]) -> bytes:
    return np.packbits(mask.astype(np.uint8), bitorder="little").tobytes()
