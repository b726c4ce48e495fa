"""The messages of a round: frozen, typed, and validated when built, so an invalid one cannot exist.

Who sends what (PROTOCOL.md, "One round"):
  RoundRequest      institution -> coordinator   query tokens, columns, participants, policy
  MaskAssignment    coordinator -> institution   its mask and the round's parameters
  LeaderQuery       coordinator -> leader        one chunk of the query tokens Q
  LeaderShare       leader -> institution        one chunk of the tokens of I and a 32-byte
                                                 seed (its share E_j)
  CoordinatorShare  leader -> coordinator        one chunk of E_S = X_L + m_L - sum_j E_j,
                                                 no tokens
  Contribution      institution -> coordinator   one chunk of Y_j = E_j + X_j + m_j
  RoundResult       coordinator -> institution   totals of the rows at or above min_holders
  RoundAbort        coordinator -> institution   typed reason (or institution -> coordinator:
                                                 it refuses the round)

Matrices are |I| x A in Z_2^64 with column 0 = holders. Field kinds for the codec are given with
`Annotated` markers, so the codec needs no per-message code.

Chunks: the query, the shares and the contributions travel as numbered chunks of the round's
`chunk_rows` rows (the consortium's policy), each its own message, so that every stage works on
one chunk while the next is on its way. Query chunk k holds rows k*chunk_rows .. of Q, and the
assignment lists the digest of every query chunk. Chunk k of I (of the shares and
contributions) holds rows k*chunk_rows .. of I; every chunk but the last (`last`) is full, so
nobody learns more of I from the chunks than |I|, and the PRG of chunk k is the row range
k*chunk_rows .. of the whole expansion (`ring.prg_rows`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
    DIGEST = "digest"
    DIGEST_LIST = "digest_list"
    SIGNATURE = "signature"


RoundId = Annotated[bytes, FieldKind.ROUND_ID]
Seed = Annotated[bytes, FieldKind.SEED]
TokenList = Annotated[Tokens, FieldKind.TOKENS]
Matrix = Annotated[U64, FieldKind.MATRIX]
Vector = Annotated[U64, FieldKind.VECTOR]
Bitmap = Annotated[bytes, FieldKind.BITMAP]
Digest = Annotated[bytes, FieldKind.DIGEST]
Signature = Annotated[bytes, FieldKind.SIGNATURE]
DigestList = Annotated[bytes, FieldKind.DIGEST_LIST]
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
MAX_QUERY = 16_000_000  # a hard ceiling; the consortium's policy sets the real limit
MAX_CHUNKS = 16_384  # chunks of one query (the policy keeps max_query / chunk_rows below)
MAX_CHUNK_ROWS = 1 << 20
# 64 rows short of 2^16: a full chunk's body (rows x A x 8 bytes and ~300 bytes of framing)
# then fills its padding bucket (envelope.padded_size) for every width A <= 8, not 20% over
DEFAULT_CHUNK_ROWS = 65_472


def chunk_count(rows: int, chunk_rows: int) -> int:
    """How many chunks of `chunk_rows` rows hold `rows` rows: one at least (an empty query or
    intersection still travels as one empty chunk)."""
    return max(1, -(-rows // chunk_rows))


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
    `query`: every query customer is a row (zero where the leader holds none), so the other
    institutions do not learn which query customers the leader holds from the tokens. The
    published `holders` column still tells every participant how many institutions hold each
    row (with two participants, exactly who)."""

    INTERSECTION = "intersection"
    QUERY = "query"


class MaskMode(StrEnum):
    """`dealt`: the patent's masks, drawn by the coordinator (coordinator and leader together
    can unmask everyone). `pairwise`: each pair of institutions derives a shared seed from an
    authenticated X25519 agreement, and the masks cancel without anyone dealing them."""

    DEALT = "dealt"
    PAIRWISE = "pairwise"


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


def _check_bytes(value: bytes, size: int, what: str) -> None:
    if len(value) != size:
        raise ValueError(f"{what} has {len(value)} bytes, expected {size}")


def _check_deadline(deadline_ms: int) -> None:
    if not 0 < deadline_ms < 1 << 53:
        raise ValueError("deadline_ms must be a positive epoch time in milliseconds")


MAX_TOKEN_EPOCH = 2**32 - 1


def _check_token_epoch(epoch: int) -> None:
    if not 0 <= epoch <= MAX_TOKEN_EPOCH:
        raise ValueError(f"token_epoch {epoch} is not in 0..{MAX_TOKEN_EPOCH}")


def _check_matrix(m: U64, what: str) -> None:
    if m.dtype != np.uint64 or m.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d uint64 matrix")


def _check_chunk(chunk: int) -> None:
    if not 0 <= chunk < MAX_CHUNKS:
        raise ValueError(f"chunk {chunk} is not in 0..{MAX_CHUNKS - 1}")


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
    query: TokenList  # the coordinator picks the leader at random: no request names it
    # the epoch of the consortium token key the query's tokens are under (0 before any
    # rotation; not on the wire then, so requests of before epochs read as epoch 0)
    token_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_token_epoch(self.token_epoch)
        _check_participants(self.participants)
        if self.requester not in self.participants:
            raise ValueError(f"requester {self.requester!r} is not among the participants")
        if len(self.attributes) > MAX_ATTRIBUTES or len(set(self.attributes)) != len(
                self.attributes):
            raise ValueError("attributes: at most 64, each once")
        _check_min_holders(self.min_holders, len(self.participants))
        _check_deadline(self.deadline_ms)
        if self.query.size > MAX_QUERY:
            raise ValueError(f"query: at most {MAX_QUERY} tokens")
        _check_tokens(self.query, "query")


@dataclass(frozen=True, eq=False)
class MaskAssignment(Message):
    """The round's parameters, the same for every participant, and this participant's mask.

    `digest()` (codec.assignment_digest) covers every field but `mask` and `attestation`: it
    names the round's whole assignment, every seed and mask of the round is derived from it,
    and every share and contribution carries it. `attestation` is the coordinator's signature
    over that digest, which the leader forwards so that the others can prove equivocation.
    `query_chunks` is the digest of each chunk of the query (codec.query_chunk_digests), so
    the leader checks every chunk as it arrives; `query_digest` is the digest of that list.
    """

    KIND: ClassVar[MessageKind] = MessageKind.MASK_ASSIGNMENT
    requester: str
    participants: tuple[str, ...]
    leader: str
    attributes: tuple[AttributeSpec, ...]
    scope: Scope
    min_holders: int
    deadline_ms: int
    query_size: int
    query_digest: Digest
    chunk_rows: int
    query_chunks: DigestList
    masks: MaskMode
    mask: Vector  # all zeros in pairwise mode: the coordinator deals nothing
    attestation: Signature
    token_epoch: int = 0  # the request's: every participant joins under the same token key

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_token_epoch(self.token_epoch)
        _check_participants(self.participants)
        for who, name in (("leader", self.leader), ("requester", self.requester)):
            if name not in self.participants:
                raise ValueError(f"{who} {name!r} is not among the participants")
        if len(self.attributes) > MAX_ATTRIBUTES:
            raise ValueError(f"attributes: at most {MAX_ATTRIBUTES}")
        if len({a.name for a in self.attributes}) != len(self.attributes):
            raise ValueError("attributes: each at most once")
        if self.mask.dtype != np.uint64 or self.mask.shape != (1 + len(self.attributes),):
            raise ValueError(f"mask: expected {1 + len(self.attributes)} uint64 values")
        if self.masks is MaskMode.PAIRWISE and self.mask.any():
            raise ValueError("mask: the coordinator deals no mask in pairwise mode")
        _check_min_holders(self.min_holders, len(self.participants))
        _check_deadline(self.deadline_ms)
        if not 0 <= self.query_size <= MAX_QUERY:
            raise ValueError(f"query_size {self.query_size} is not in 0..{MAX_QUERY}")
        _check_bytes(self.query_digest, DIGEST_BYTES, "query_digest")
        _check_bytes(self.attestation, SIGNATURE_BYTES, "attestation")
        if not 1 <= self.chunk_rows <= MAX_CHUNK_ROWS:
            raise ValueError(f"chunk_rows {self.chunk_rows} is not in 1..{MAX_CHUNK_ROWS}")
        if self.chunks > MAX_CHUNKS:
            raise ValueError(f"{self.chunks} query chunks; at most {MAX_CHUNKS}")
        _check_bytes(self.query_chunks, DIGEST_BYTES * self.chunks, "query_chunks")

    @property
    def width(self) -> int:
        """A: the number of columns, `holders` included."""
        return 1 + len(self.attributes)

    @property
    def chunks(self) -> int:
        """The number of query chunks (and the most chunks I can have)."""
        return chunk_count(self.query_size, self.chunk_rows)

    def query_rows(self, chunk: int) -> range:
        """The rows of Q in query chunk `chunk`."""
        start = chunk * self.chunk_rows
        return range(start, min(start + self.chunk_rows, self.query_size))

    def chunk_digest(self, chunk: int) -> bytes:
        return self.query_chunks[chunk * DIGEST_BYTES:(chunk + 1) * DIGEST_BYTES]

    def chunk_problem(self, chunk: int, rows: int, last: bool) -> str:
        """What is wrong with the leader's statement that chunk `chunk` of I has `rows` rows
        and is (or is not) the last, or "": every chunk but the last is full, and I has at
        most |Q| rows (in `query` scope exactly Q's chunks). In `intersection` scope the last
        chunk may be empty: the leader sends a full chunk as soon as it has one, before it
        knows whether the rest of the query holds another row. Checked by every institution
        on each share chunk and by the coordinator on each share and contribution chunk."""
        c = self.chunk_rows
        if last:
            problem = "" if rows <= c else "a last chunk"
        else:
            problem = "" if rows == c else "a chunk before the last"
        if not problem and chunk * c + rows > self.query_size:
            problem = f"rows past the query's {self.query_size}, in a chunk"
        if not problem and self.scope is Scope.QUERY and (
                last != (chunk == self.chunks - 1) or rows != len(self.query_rows(chunk))):
            problem = f"in `query` scope (one row per query token, {self.chunks} chunks),"
        return f"{problem} of {rows} rows (chunk {chunk}, chunks of {c})" if problem else ""


@dataclass(frozen=True, eq=False)
class LeaderQuery(Message):
    """Query chunk `chunk`: rows chunk*chunk_rows .. of Q."""

    KIND: ClassVar[MessageKind] = MessageKind.LEADER_QUERY
    assignment: Digest
    query: TokenList
    chunk: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_chunk(self.chunk)
        _check_bytes(self.assignment, DIGEST_BYTES, "assignment")
        if self.query.size > MAX_QUERY:
            raise ValueError(f"query: at most {MAX_QUERY} tokens")
        _check_tokens(self.query, "query")


@dataclass(frozen=True, eq=False)
class LeaderShare(Message):
    """The leader's share for one institution: the tokens of I, a seed, and what binds them.

    `attestation` is the coordinator's signature over `assignment` (forwarded from the leader's
    MaskAssignment); `endorsement` is the leader's signature over (round, assignment, chunk,
    rows, last, rows digest) (codec.endorsement_statement), where the rows digest is
    H(salt || tokens) and `salt` is never shown to the coordinator (which knows Q and could
    otherwise test guesses of I against it). One message per chunk of I; `last` marks the
    final chunk, which only the leader knows when it sends it (in `intersection` scope |I| is
    known once the whole query is joined)."""

    KIND: ClassVar[MessageKind] = MessageKind.LEADER_SHARE
    assignment: Digest
    attestation: Signature
    salt: Seed
    endorsement: Signature
    tokens: TokenList
    seed: Seed
    chunk: int = 0
    last: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_chunk(self.chunk)
        _check_bytes(self.assignment, DIGEST_BYTES, "assignment")
        _check_bytes(self.attestation, SIGNATURE_BYTES, "attestation")
        _check_bytes(self.salt, SEED_BYTES, "salt")
        _check_bytes(self.endorsement, SIGNATURE_BYTES, "endorsement")
        if self.tokens.size > MAX_QUERY:
            raise ValueError(f"tokens: at most {MAX_QUERY}")
        _check_tokens(self.tokens, "tokens")
        _check_bytes(self.seed, SEED_BYTES, "seed")


@dataclass(frozen=True, eq=False)
class CoordinatorShare(Message):
    """Chunk `chunk` of E_S, over the same rows (`rows_digest`) as the institutions' chunk."""

    KIND: ClassVar[MessageKind] = MessageKind.COORDINATOR_SHARE
    assignment: Digest
    rows_digest: Digest
    share: Matrix
    chunk: int = 0
    last: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_chunk(self.chunk)
        _check_bytes(self.assignment, DIGEST_BYTES, "assignment")
        _check_bytes(self.rows_digest, DIGEST_BYTES, "rows_digest")
        _check_matrix(self.share, "share")


@dataclass(frozen=True, eq=False)
class Contribution(Message):
    """Chunk `chunk` of Y_j, with the assignment and rows digest it was computed on and the
    leader's endorsement of that chunk (so the coordinator can tell who sent a different I)."""

    KIND: ClassVar[MessageKind] = MessageKind.CONTRIBUTION
    assignment: Digest
    rows_digest: Digest
    endorsement: Signature
    values: Matrix
    chunk: int = 0
    last: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_chunk(self.chunk)
        _check_bytes(self.assignment, DIGEST_BYTES, "assignment")
        _check_bytes(self.rows_digest, DIGEST_BYTES, "rows_digest")
        _check_bytes(self.endorsement, SIGNATURE_BYTES, "endorsement")
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
        if self.rows > MAX_QUERY:
            raise ValueError(f"rows: at most {MAX_QUERY}")
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
        if len(self.culprits) > MAX_PARTICIPANTS:
            raise ValueError(f"culprits: at most {MAX_PARTICIPANTS}")
        for c in self.culprits:
            check_party(c, "culprit")


Chunked = LeaderQuery | LeaderShare | CoordinatorShare | Contribution


def ends_elsewhere(last_known: int | None, chunks_known: Iterable[int], chunk: int,
                   last: bool) -> bool:
    """Whether chunk `chunk` (the last or not) contradicts what is known of I's chunks: the
    index of the last (if one came) and the indices that came. Only the leader says which
    chunk is the last; one that contradicts it is the leader's doing."""
    if last_known is not None:
        return chunk > last_known or (last and chunk != last_known)
    return last and max(chunks_known, default=-1) > chunk


def chunk_of(msg: Message) -> int:
    """The chunk a message is about (0 for the messages that are never chunked)."""
    return msg.chunk if isinstance(msg, Chunked) else 0


MESSAGE_TYPES: dict[MessageKind, type[Message]] = {
    cls.KIND: cls for cls in (RoundRequest, MaskAssignment, LeaderQuery, LeaderShare,
                              CoordinatorShare, Contribution, RoundResult, RoundAbort)
}


def pack_bitmap(mask: np.ndarray[tuple[int], np.dtype[np.bool_]]) -> bytes:
    return np.packbits(mask.astype(np.uint8), bitorder="little").tobytes()
