"""The consortium's policy: the floors every round must keep, whoever asks for it.

PROTOCOL.md, "A hostile member": the consortium, not the request, sets the minimum holders per
published row, the minimum participants and whether a round may use a subset of the
institutions (default: every institution in every round). A request may raise a floor, never
lower it. The coordinator enforces the policy, and every institution checks each assignment
against its own copy, so a coordinator cannot waive it.

`DifferencingGuard`: where subsets are allowed, rounds over different participant sets can be
combined into one institution's values ((r,b,c) - (r,c) = b). Each party keeps the participant
sets of its last `window` rounds and refuses a round that would put an institution's values in
the span of the published totals.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from protocol.fixedpoint import AttributeSpec
from protocol.messages import (
    DEFAULT_CHUNK_ROWS,
    MAX_CHUNK_ROWS,
    MAX_CHUNKS,
    MaskMode,
    chunk_count,
)

DEFAULT_MAX_QUERY = 10_000_000
DEFAULT_DIFFERENCE_WINDOW = 10_000
# inbox positions after which a message held outside any round (an early leader share, the
# parts of an unfinished chunked message) is dropped, so every party reaches a quiescent state
DEFAULT_EXPIRE_AFTER = 10_000


@dataclass(frozen=True)
class ConsortiumPolicy:
    """What every party of a consortium holds: institutions, attribute specs and the floors.

    `min_participants` 0 means every institution; with `allow_subsets` false (the default) a
    round must include every institution whatever its request says. `chunk_rows`: the rows of
    each chunk a round's query, shares and contributions travel in (messages.py)."""

    institutions: frozenset[str]
    attributes: dict[str, AttributeSpec] = field(default_factory=dict)
    min_participants: int = 0
    min_holders: int = 1
    allow_subsets: bool = False
    max_query: int = DEFAULT_MAX_QUERY
    difference_window: int = DEFAULT_DIFFERENCE_WINDOW
    masks: MaskMode = MaskMode.DEALT
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    expire_after: int = DEFAULT_EXPIRE_AFTER

    def __post_init__(self) -> None:
        if self.min_participants < 0 or self.min_holders < 1 or self.max_query < 1:
            raise ValueError("policy: min_participants >= 0, min_holders >= 1, max_query >= 1")
        if self.difference_window < 0:
            raise ValueError("policy: difference_window >= 0")
        if not 1 <= self.chunk_rows <= MAX_CHUNK_ROWS:
            raise ValueError(f"policy: chunk_rows in 1..{MAX_CHUNK_ROWS}")
        if chunk_count(self.max_query, self.chunk_rows) > MAX_CHUNKS:
            raise ValueError(f"policy: max_query / chunk_rows is at most {MAX_CHUNKS} chunks")
        if self.expire_after < 1:
            raise ValueError("policy: expire_after >= 1")

    @property
    def participants_floor(self) -> int:
        every = len(self.institutions)
        if not self.allow_subsets or self.min_participants == 0:
            return every
        return max(2, min(self.min_participants, every))

    def problem(self, participants: tuple[str, ...], min_holders: int, query_size: int,
                masks: MaskMode | None = None, chunk_rows: int | None = None) -> str:
        """Why a round with these parameters breaks the policy, or "" when it keeps it."""
        if masks is not None and masks is not self.masks:
            return f"the round's masks are {masks}; the consortium's are {self.masks}"
        if chunk_rows is not None and chunk_rows != self.chunk_rows:
            return (f"the round's chunks have {chunk_rows} rows; the consortium's have "
                    f"{self.chunk_rows}")
        if unknown := [p for p in participants if p not in self.institutions]:
            return f"participant {unknown[0]!r} is not an institution of this consortium"
        if not self.allow_subsets and set(participants) != self.institutions:
            absent = sorted(self.institutions - set(participants))
            return (f"the policy has every institution in every round; {', '.join(absent)} "
                    "missing (subsets are not allowed)")
        if len(participants) < self.participants_floor:
            return (f"{len(participants)} participants; the policy needs at least "
                    f"{self.participants_floor}")
        if min_holders < self.min_holders:
            return (f"min_holders {min_holders} is below the consortium's floor of "
                    f"{self.min_holders}")
        if query_size > self.max_query:
            return f"a query of {query_size} customers exceeds the limit of {self.max_query}"
        return ""


class Signer(Protocol):
    """A party's signing key and the registry's verifying keys, for statements inside
    messages (the envelope signature covers transport; these can be forwarded)."""

    def sign(self, statement: bytes) -> bytes: ...

    def verify(self, party: str, signature: bytes, statement: bytes) -> bool: ...

    def agree(self, party: str) -> bytes:
        """The X25519 shared secret with `party` (static registry keys), for pairwise masks."""
        ...


class DifferencingGuard:
    """The participant sets of the last `window` rounds a party took part in (or, at the
    coordinator, of every round it assigned).

    A round is refused when, with it, some institution's values become a linear combination of
    published totals: when that institution's indicator vector enters the span of the
    participant sets. (r,b,c) - (r,c) = b is the simplest case; {t,a,b} + {t,c,d} - {a,b,c,d} =
    2t another. The check ignores which customers the rounds covered, so it refuses some rounds
    that would be harmless: it errs on the side of the institutions."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._sets: deque[frozenset[str]] = deque(maxlen=max(window, 1))

    @staticmethod
    def _spanned(sets: list[frozenset[str]], names: list[str]) -> set[str]:
        """The institutions whose indicator vector lies in the span of `sets`."""
        if not sets:
            return set()
        m = np.array([[1.0 if n in s else 0.0 for n in names] for s in sets])
        _, sv, vt = np.linalg.svd(m, full_matrices=False)
        basis = vt[sv > 1e-9 * max(sv[0], 1.0)]
        reach = (basis * basis).sum(axis=0)  # |projection of e_n onto the span|^2
        return {n for n, r in zip(names, reach, strict=True) if r > 1 - 1e-6}

    def problem(self, participants: tuple[str, ...]) -> str:
        if self.window == 0:
            return ""
        mine = frozenset(participants)
        earlier = list(dict.fromkeys(self._sets))  # distinct sets, oldest first
        if mine in earlier:
            return ""  # the same participants again add nothing to the span
        names = sorted(mine.union(*earlier))
        exposed = self._spanned([*earlier, mine], names) - self._spanned(earlier, names)
        if not exposed:
            return ""
        who = sorted(exposed)
        return (f"with the earlier rounds over {'; '.join(', '.join(sorted(s)) for s in earlier)}"
                f", its totals would combine into the values of {', '.join(who)} alone")

    def record(self, participants: tuple[str, ...]) -> None:
        if self.window:
            self._sets.append(frozenset(participants))

    def sets(self) -> list[frozenset[str]]:
        """The participant sets held, oldest first (for a snapshot)."""
        return list(self._sets)

    def restore(self, sets: list[frozenset[str]]) -> None:
        """Hold exactly `sets` (a snapshot's, oldest first) instead of what is held."""
        self._sets.clear()
        if self.window:
            self._sets.extend(sets)
