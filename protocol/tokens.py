"""Customer tokens and the joins of a round, in numpy.

A raw identifier never leaves its institution: it is normalised and hashed with keyed BLAKE2b
under the consortium key (shared by institutions, unknown to the coordinator) into 16 bytes.
Tokens are numpy `V16` scalars, which sort and compare as raw bytes, so the joins below are a
sort plus `searchsorted`, with no Python loop per customer.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from protocol.errors import DataError

TOKEN_BYTES = 16
TOKEN_DTYPE = np.dtype(f"V{TOKEN_BYTES}")
CONSORTIUM_KEY_BYTES = 32
_PERSON = b"zerosum-token-v1"  # BLAKE2b personalisation: 16 bytes
_SPACE = re.compile(r"\s+")

Tokens = NDArray[np.void]


def normalise_id(raw: str) -> str:
    """NFKC, trimmed, case-folded, inner white space collapsed to one space."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", raw).strip()).casefold()


def tokenize(ids: Iterable[str], key: bytes) -> Tokens:
    """Tokens of customer identifiers under the consortium key (one hash per id, at load)."""
    if len(key) != CONSORTIUM_KEY_BYTES:
        raise ValueError(f"the consortium key has {CONSORTIUM_KEY_BYTES} bytes")
    joined = b"".join(
        hashlib.blake2b(normalise_id(i).encode(), digest_size=TOKEN_BYTES, key=key,
                        person=_PERSON).digest()
        for i in ids)
    return tokens_from_bytes(joined)


def tokens_from_bytes(data: bytes) -> Tokens:
    if len(data) % TOKEN_BYTES:
        raise ValueError(f"token bytes must be a multiple of {TOKEN_BYTES}")
    return np.frombuffer(data, dtype=TOKEN_DTYPE)


def tokens_to_bytes(tokens: Tokens) -> bytes:
    return np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()


def first_duplicate(tokens: Tokens) -> int | None:
    """Index of the first token that appears again later, or None when all are distinct."""
    if tokens.size < 2:
        return None
    order = np.argsort(tokens, kind="stable")
    s = tokens[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size == 0:
        return None
    return int(order[dup].min())


@dataclass(frozen=True, eq=False)
class LocalTable:
    """An institution's snapshot: tokens sorted as bytes, and int64 values per attribute."""

    tokens: Tokens
    values: NDArray[np.int64]
    columns: tuple[str, ...]

    @classmethod
    def build(cls, tokens: Tokens, values: NDArray[np.int64],
              columns: tuple[str, ...]) -> LocalTable:
        """Sort by token; a customer that appears twice is an error naming its input row."""
        if values.shape != (tokens.size, len(columns)):
            raise DataError(f"values have shape {values.shape}, expected "
                            f"({tokens.size}, {len(columns)})")
        dup = first_duplicate(tokens)
        if dup is not None:
            raise DataError(f"row {dup}: the same customer appears more than once")
        order = np.argsort(tokens, kind="stable")
        t = np.ascontiguousarray(tokens[order])
        v = np.ascontiguousarray(values[order], dtype=np.int64)
        t.setflags(write=False)
        v.setflags(write=False)
        return cls(t, v, columns)

    def __len__(self) -> int:
        return int(self.tokens.size)

    def locate(self, query: Tokens) -> tuple[NDArray[np.bool_], NDArray[np.intp]]:
        """For each query token: whether this table holds it, and its row here when it does."""
        if self.tokens.size == 0:
            return np.zeros(query.size, dtype=np.bool_), np.zeros(query.size, dtype=np.intp)
        idx = np.searchsorted(self.tokens, query)
        idx = np.minimum(idx, self.tokens.size - 1)
        return self.tokens[idx] == query, idx

    def aligned(self, tokens: Tokens, columns: tuple[str, ...]) -> NDArray[np.uint64]:
        """X aligned to `tokens`: column 0 is `holders` (1 if held), then `columns`; zero rows
        where the customer is not held. Values in Z_2^64 (int64 reinterpreted)."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(f"this data has no column {missing[0]!r}")
        found, idx = self.locate(tokens)
        out = np.zeros((tokens.size, 1 + len(columns)), dtype=np.int64)
        out[:, 0] = found
        cols = [self.columns.index(c) for c in columns]
        rows = idx[found]
        if rows.size and cols:
            out[np.flatnonzero(found)[:, None], np.arange(1, 1 + len(cols))[None, :]] = (
                self.values[rows[:, None], np.array(cols)[None, :]])
        return out.view(np.uint64)
