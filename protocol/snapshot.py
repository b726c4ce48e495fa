"""A quiescent party's state as bytes, so that a restart reads only the inbox after it.

A party is quiescent when no round runs, no message waits for its round (an early leader
share) and no chunked message is half read: then everything a replay of its inbox up to that
point would rebuild, and that later inputs depend on, is

- the position of the last inbox input it handled (a restart reads from the next one);
- its own hash chain (next seq, previous digest);
- the inbox's per-sender sequence state: the highest seq and the whole window of (seq,
  digest, prev) seen, in the order seen, which tells duplicates, forks, gaps and replays;
- the differencing guard's participant sets, oldest first;
- every round kept in memory, each ended: the few facts a late input to it still meets
  (`ClosedRound`);
- how many round ids the ledger held, a check of the ledger file it is restored beside (the
  ledger itself is the agent's durable `rounds.ledger`, not repeated here).

Encoding: a msgpack map, `format` and `version` first; `decode` checks every field's type and
size and raises `SnapshotError` (never anything else) on bytes that are not such a snapshot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

import msgpack

from protocol.coordinator import CoordinatorState
from protocol.envelope import SEQ_WINDOW
from protocol.errors import SnapshotError
from protocol.institution import InstitutionState
from protocol.machine import ENDED_DIGEST, Handler, RoundMachine, _Buffer
from protocol.messages import ROUND_ID_BYTES, MessageKind

FORMAT = "zerosum.party-snapshot"
VERSION = 2  # 2: digest prefixes, one per chunk taken
_SEEN = struct.Struct(">q32s32s")  # seq, digest, prev: one envelope of a sender's window
_DIGEST = 32
T = TypeVar("T")


class ClosedRound(RoundMachine):
    """A round that ended before a snapshot, as a later input meets it: who had a part in it,
    the digest of each message taken (a copy is dropped, another one is refused) and its end
    state. Nothing in it runs again."""

    TABLE: ClassVar[dict[tuple[object, type], Handler | _Buffer]] = {}
    TERMINAL: ClassVar[frozenset[Any]] = frozenset(
        {CoordinatorState.PUBLISHED, CoordinatorState.ABORTED,
         InstitutionState.DONE, InstitutionState.ABORTED})
    ABORTED: ClassVar[Any] = None  # never aborts: it has ended

    def __init__(self, round_id: bytes, state: Enum, allowed: frozenset[str] | None,
                 seen: dict[tuple[str, MessageKind], bytes],
                 evidence: list[tuple[str, bytes, bytes]], dropped: list[str]) -> None:
        super().__init__(round_id, state)
        self._allowed = allowed
        self._ended = seen  # an ended round never changes them
        self.evidence = evidence
        self.dropped = dropped

    def senders(self) -> frozenset[str] | None:
        return self._allowed


@dataclass(frozen=True)
class RoundState:
    """One ended round of a snapshot (see `ClosedRound`)."""

    round_id: bytes
    state: Enum
    senders: frozenset[str] | None
    seen: dict[tuple[str, MessageKind], bytes]
    evidence: list[tuple[str, bytes, bytes]]
    dropped: list[str]

    @classmethod
    def of(cls, m: RoundMachine) -> RoundState:
        if m.state not in m.TERMINAL:
            raise ValueError(f"round {m.round_id.hex()} is running ({m.state.name})")
        return cls(m.round_id, m.state, m.senders(), dict(m.seen_digests()),
                   list(m.evidence), list(m.dropped))

    def machine(self) -> ClosedRound:
        return ClosedRound(self.round_id, self.state, self.senders, self.seen, self.evidence,
                           self.dropped)


@dataclass(frozen=True)
class PartySnapshot:
    role: str  # "coordinator" or "institution"
    party: str
    consortium: str
    last_position: int  # of the last inbox input handled; -1: none
    chain: tuple[int, bytes]  # next seq, previous digest
    ledger_entries: int
    difference_window: int
    guard: list[frozenset[str]]  # oldest first
    sequences: dict[str, tuple[int, list[tuple[int, bytes, bytes]], int]]  # last, seen, epoch
    rounds: list[RoundState]  # in the party's order (the oldest is forgotten first)


# the end states a kept round can be in, by role: a round's state travels as its index here
ENDS: dict[str, tuple[Enum, ...]] = {
    "coordinator": (CoordinatorState.PUBLISHED, CoordinatorState.ABORTED),
    "institution": (InstitutionState.DONE, InstitutionState.ABORTED)}
_U32 = struct.Struct(">I")
# round index, sender (name index), kind, digest prefix: a (sender, kind) has one per chunk
_TAKEN = struct.Struct(f">IHB{ENDED_DIGEST}s")
_FIELDS = ("format", "version", "role", "party", "consortium", "last_position", "chain",
           "ledger_entries", "difference_window", "names", "groups", "guard", "sequences",
           "rounds")
_ROUND_FIELDS = ("ids", "states", "senders", "seen", "extras")


class _Tables:
    """Names and sets of names, each stored once and referred to by index."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}
        self.groups: dict[frozenset[str], int] = {}  # index from 1: 0 is "anyone" (None)

    def name(self, n: str) -> int:
        return self.names.setdefault(n, len(self.names))

    def group(self, g: frozenset[str] | None) -> int:
        if g is None:
            return 0
        if g not in self.groups:
            for n in sorted(g):
                self.name(n)
            self.groups[g] = len(self.groups) + 1
        return self.groups[g]


def encode(s: PartySnapshot) -> bytes:
    """The snapshot as msgpack: tables of fixed-size records in bytes fields, so that a
    snapshot of 100,000 kept rounds and full sequence windows decodes in one pass."""
    t = _Tables()
    ends = ENDS[s.role]
    guard = b"".join(_U32.pack(t.group(g)) for g in s.guard)
    senders = b"".join(_U32.pack(t.group(r.senders)) for r in s.rounds)
    seen = b"".join(_TAKEN.pack(i, t.name(who), int(kind), taken[at:at + ENDED_DIGEST])
                    for i, r in enumerate(s.rounds) for (who, kind), taken in r.seen.items()
                    for at in range(0, len(taken), ENDED_DIGEST))
    extras = [[i, [[t.name(who), a, b] for who, a, b in r.evidence],
               [t.name(who) for who in r.dropped]]
              for i, r in enumerate(s.rounds) if r.evidence or r.dropped]
    out: bytes = msgpack.packb({
        "format": FORMAT, "version": VERSION, "role": s.role, "party": s.party,
        "consortium": s.consortium, "last_position": s.last_position,
        "chain": [s.chain[0], s.chain[1]], "ledger_entries": s.ledger_entries,
        "difference_window": s.difference_window,
        "names": list(t.names), "groups": [sorted(t.names[n] for n in g) for g in t.groups],
        "guard": guard,
        "sequences": [[name, last, b"".join(_SEEN.pack(*e) for e in window), epoch]
                      for name, (last, window, epoch) in s.sequences.items()],
        "rounds": {"ids": b"".join(r.round_id for r in s.rounds),
                   "states": bytes(ends.index(r.state) for r in s.rounds),
                   "senders": senders, "seen": seen, "extras": extras},
    }, use_bin_type=True)
    return out


def _typed(value: Any, typ: type[T], path: str) -> T:
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise SnapshotError(f"snapshot field {path}: {type(value).__name__}, not {typ.__name__}")
    return value


def _int(value: Any, path: str, low: int = 0, high: int | None = None) -> int:
    n = _typed(value, int, path)
    if n < low or (high is not None and n > high):
        raise SnapshotError(f"snapshot field {path}: {n} outside {low}..{high}")
    return n


def _bytes(value: Any, path: str, size: int | None = None, unit: int = 1) -> bytes:
    b = _typed(value, bytes, path)
    if (size is not None and len(b) != size) or len(b) % unit:
        raise SnapshotError(f"snapshot field {path}: {len(b)} bytes, not "
                            f"{size if size is not None else f'a multiple of {unit}'}")
    return b


def _list(value: Any, path: str, size: int | None = None) -> list[Any]:
    items = _typed(value, list, path)
    if size is not None and len(items) != size:
        raise SnapshotError(f"snapshot field {path}: {len(items)} items, not {size}")
    return items


def _map(value: Any, path: str, fields: tuple[str, ...]) -> dict[str, Any]:
    m = _typed(value, dict, path)
    if sorted(m) != sorted(fields):
        raise SnapshotError(f"snapshot fields of {path}: {sorted(m)}, expected {sorted(fields)}")
    return m


def _indices(packed: bytes, path: str, below: int) -> list[int]:
    """u32 indices, each < `below`."""
    out = [i for (i,) in _U32.iter_unpack(_bytes(packed, path, unit=_U32.size))]
    if out and max(out) >= below:
        raise SnapshotError(f"snapshot field {path}: index {max(out)} of {below}")
    return out


def decode(data: bytes) -> PartySnapshot:
    """The snapshot in `data`; SnapshotError for anything else (torn, foreign, newer)."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise SnapshotError(f"not a msgpack snapshot: {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SnapshotError(f"not a party snapshot (no format field {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise SnapshotError(f"snapshot version {raw.get('version')!r}; this build reads "
                            f"version {VERSION}")
    _map(raw, "the snapshot", _FIELDS)
    role = _typed(raw["role"], str, "role")
    if role not in ENDS:
        raise SnapshotError(f"snapshot of a {role!r}: neither coordinator nor institution")
    names = [_typed(n, str, f"names[{i}]") for i, n in enumerate(_list(raw["names"], "names"))]
    groups: list[frozenset[str] | None] = [None]
    for i, g in enumerate(_list(raw["groups"], "groups")):
        members = [_int(n, f"groups[{i}]", 0, len(names) - 1) for n in _list(g, f"groups[{i}]")]
        groups.append(frozenset(names[n] for n in members))
    guard = [groups[i] for i in _indices(raw["guard"], "guard", len(groups))]
    if None in guard:
        raise SnapshotError("snapshot field guard: a set of anyone")
    chain = _list(raw["chain"], "chain", 2)
    return PartySnapshot(
        role, _typed(raw["party"], str, "party"), _typed(raw["consortium"], str, "consortium"),
        _int(raw["last_position"], "last_position", -1),
        (_int(chain[0], "chain[0]"), _bytes(chain[1], "chain[1]", _DIGEST)),
        _int(raw["ledger_entries"], "ledger_entries"),
        _int(raw["difference_window"], "difference_window"),
        [g for g in guard if g is not None],
        dict(_sequence(v, f"sequences[{i}]")
             for i, v in enumerate(_list(raw["sequences"], "sequences"))),
        _rounds(_map(raw["rounds"], "rounds", _ROUND_FIELDS), ENDS[role], names, groups))


def _sequence(value: Any,
              path: str) -> tuple[str, tuple[int, list[tuple[int, bytes, bytes]], int]]:
    name, last, packed, epoch = _list(value, path, 4)
    packed = _bytes(packed, f"{path}.seen", unit=_SEEN.size)
    if len(packed) // _SEEN.size > SEQ_WINDOW:
        raise SnapshotError(f"snapshot field {path}.seen: more than {SEQ_WINDOW} envelopes")
    seen: list[tuple[int, bytes, bytes]] = list(_SEEN.iter_unpack(packed))
    last = _int(last, f"{path}.last_seq", -1)
    if seen and not 0 <= min(seq for seq, _, _ in seen) <= max(seq for seq, _, _ in seen) <= last:
        raise SnapshotError(f"snapshot field {path}.seen: a seq outside 0..{last}")
    return _typed(name, str, f"{path}.name"), (last, seen,
                                               _int(epoch, f"{path}.epoch", 0, 2**32 - 1))


def _rounds(raw: dict[str, Any], ends: tuple[Enum, ...], names: list[str],
            groups: list[frozenset[str] | None]) -> list[RoundState]:
    packed = _bytes(raw["ids"], "rounds.ids", unit=ROUND_ID_BYTES)
    n = len(packed) // ROUND_ID_BYTES
    ids = [packed[i * ROUND_ID_BYTES:(i + 1) * ROUND_ID_BYTES] for i in range(n)]
    if len(set(ids)) != n:
        raise SnapshotError("snapshot field rounds.ids: a round id twice")
    states = _bytes(raw["states"], "rounds.states", n)
    if states and max(states) >= len(ends):
        raise SnapshotError(f"snapshot field rounds.states: {max(states)} is no end state")
    senders = _indices(raw["senders"], "rounds.senders", len(groups))
    if len(senders) != n:
        raise SnapshotError(f"snapshot field rounds.senders: {len(senders)} of {n} rounds")
    kinds = {int(k): k for k in MessageKind}
    seen: list[dict[tuple[str, MessageKind], bytes]] = [{} for _ in range(n)]
    for i, who, kind, d in _TAKEN.iter_unpack(_bytes(raw["seen"], "rounds.seen",
                                                     unit=_TAKEN.size)):
        if i >= n or who >= len(names) or kind not in kinds:
            raise SnapshotError(f"snapshot field rounds.seen: ({i}, {who}, {kind}) names no "
                                "round, party or message kind")
        seen[i][(names[who], kinds[kind])] = seen[i].get((names[who], kinds[kind]), b"") + d
    extras: dict[int, tuple[list[tuple[str, bytes, bytes]], list[str]]] = {}
    for k, e in enumerate(_list(raw["extras"], "rounds.extras")):
        path = f"rounds.extras[{k}]"
        i, evidence, dropped = _list(e, path, 3)
        proofs = []
        for proof in _list(evidence, f"{path}.evidence"):
            who, first, second = _list(proof, f"{path}.evidence", 3)
            proofs.append((names[_int(who, path, 0, len(names) - 1)],
                           _bytes(first, path, _DIGEST), _bytes(second, path, _DIGEST)))
        extras[_int(i, path, 0, n - 1)] = (proofs, [
            names[_int(who, f"{path}.dropped", 0, len(names) - 1)]
            for who in _list(dropped, f"{path}.dropped")])
    return [RoundState(ids[i], ends[states[i]], groups[senders[i]], seen[i],
                       *extras.get(i, ([], []))) for i in range(n)]


__all__ = ["ClosedRound", "PartySnapshot", "RoundState", "decode", "encode"]
