"""A restart from a snapshot is the full replay (issue 16, restart in time independent of
history).

A scenario of honest rounds (reordered, duplicated, dropped, over participant subsets the
differencing guard judges), deadlines, duplicate envelopes, re-sealed copies of earlier
messages, hostile early shares, lone parts of chunked messages and messages for wrong rounds
runs among a coordinator and three institutions. One party's inputs, in the order it took
them, are then replayed into a fresh party with a snapshot taken at every quiescent point; a
party restored from each snapshot, fed the rest of the inputs, must give the very same outputs
(events; envelopes by header, chain and plaintext, their ciphertexts being randomised) and end
in the same state as the full replay.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import protocol.envelope as envelope_module
import protocol.party as party_module
import protocol.snapshot as snapshot_module
from protocol.codec import encode
from protocol.driver import CONSORTIUM, COORDINATOR, Network
from protocol.envelope import ZERO_HASH, open_sealed, seal, unpad, verify
from protocol.errors import (
    AbortReason,
    EarlyExpired,
    NotQuiescent,
    PartialExpired,
    SnapshotError,
)
from protocol.machine import Deadline, Outcome
from protocol.messages import MaskAssignment, Message, MessageKind, Scope
from protocol.party import CoordinatorParty, Event, InstitutionParty, Outgoing, Rejected
from protocol.snapshot import VERSION, PartySnapshot
from protocol.snapshot import decode as decode_snapshot
from tests.helpers import DEADLINE, SPECS, World, make_world
from tests.samples import transcript

CHUNK_ROWS = 2  # rows of a chunk: a query of 6 travels in 3 chunks, I in up to 3
EXPIRE = 6  # inbox positions a held message lives: small, so that scenarios see it happen
INSTITUTIONS = ("bank-0", "bank-1", "bank-2")
SUBSETS = (INSTITUTIONS, ("bank-0", "bank-1"), ("bank-1", "bank-2"), ("bank-0", "bank-2"))
KINDS = ("round", "round", "round", "deadline", "dup", "replay", "early", "lone", "wrong")
LATER = 10**14  # a time past every deadline of a scenario
Party = CoordinatorParty | InstitutionParty
Step = tuple[str, int, int, int]


@functools.cache
def _samples() -> tuple[Message, Message]:
    t = transcript()
    return t.leader_shares["bank-a"], t.contributions["bank-a"]


@contextmanager
def chunks_of(size: int) -> Iterator[None]:
    """Envelopes carry `size` plaintext bytes each: small ones make most messages chunked."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(envelope_module, "CHUNK_BYTES", size)
        yield


def world(seed: int) -> World:
    return make_world(3, universe=12, hold=0.7, query=6, seed=seed, allow_subsets=True,
                      min_participants=2, expire_after=EXPIRE, chunk_rows=CHUNK_ROWS,
                      max_query=1000)


def _send(net: Network, sender: str, recipient: str, kind: MessageKind, rid: bytes,
          body: bytes) -> list[bytes]:
    src = net.party(sender)
    return seal(body, sender=src.me, recipient=net.coordinator.registry[recipient],
                consortium=CONSORTIUM, round_id=rid, kind=kind, chain=src.chain)


def play(w: World, subject: str, steps: list[Step]) -> None:
    """Run `steps` in `w.net`; what reaches `subject` is in `w.net.inputs[subject]`."""
    net = w.net
    rng = net.rng
    rids: list[bytes] = []
    share, contribution = _samples()
    for kind, a, b, c in steps:
        if kind == "round":
            participants = SUBSETS[b % len(SUBSETS)]
            requester = participants[a % len(participants)]
            rid = rng.randbytes(16)
            rids.append(rid)
            net.reorder, net.duplicate, net.drop = bool(c & 1), 0.3 * bool(c & 2), \
                0.2 * bool(c & 4)
            net.take(requester, net.institutions[requester].request(
                rid, w.tokens(w.query_ids), participants=participants,
                attributes=tuple(s.name for s in SPECS), deadline_ms=DEADLINE,
                scope=Scope.INTERSECTION, min_holders=1))
        elif kind == "deadline":
            net.reorder, net.duplicate, net.drop = False, 0.0, 0.0
            net.expire(LATER)
        elif kind == "dup":
            wires = [i for i in net.inputs[subject] if isinstance(i, bytes)]
            if wires:
                net.deliver(subject, wires[a % len(wires)])
        elif kind == "replay":  # an earlier message's content, sealed again by its sender
            me = net.party(subject).me
            whole = [v for v in (verify(i, net.coordinator.registry, CONSORTIUM)
                                 for i in net.inputs[subject] if isinstance(i, bytes))
                     if v.header.parts == 1]
            if whole:
                v = whole[a % len(whole)]
                h = v.header
                for wire in _send(net, h.sender, subject, h.kind, h.round_id,
                                  unpad(open_sealed(me, v))):
                    net.deliver(subject, wire)
        elif kind in ("early", "wrong"):
            sender = INSTITUTIONS[a % 3]
            rid = rids[b % len(rids)] if rids and c % 2 else rng.randbytes(16)
            msg = replace(share if kind == "early" else contribution, round_id=rid)
            for wire in _send(net, sender, subject, msg.KIND, rid, encode(msg)):
                net.deliver(subject, wire)
        elif kind == "lone":  # some parts of a chunked message, never all of them
            size = 3 * envelope_module.CHUNK_BYTES
            wires = _send(net, INSTITUTIONS[a % 3], subject, MessageKind.LEADER_SHARE,
                          rng.randbytes(16), rng.randbytes(size))
            for wire in wires[:1 + b % (len(wires) - 1)]:
                net.deliver(subject, wire)
        net.run()
        net.reorder, net.duplicate, net.drop = False, 0.0, 0.0


def fresh(live: Party) -> Party:
    """A party as the agent builds it at a restart: same keys, policy and data."""
    if isinstance(live, CoordinatorParty):
        return CoordinatorParty(live.me, live.registry, live.consortium, live.policy)
    return InstitutionParty(live.me, live.registry, live.consortium,
                            coordinator=live.coordinator, table=live.table, policy=live.policy,
                            grace_ms=live.grace_ms)


def state(p: Party, *, chain: bool = True, marks: bool = True) -> dict[str, Any]:
    """What a party holds that later inputs depend on, read from the party itself (without
    its chain, or without the inbox positions in its ledger)."""
    early = [(peer, [(rid, at) for rid, _, at in q]) for peer, q in p._early.items()] \
        if isinstance(p, InstitutionParty) else []
    return {
        "last_position": p.last_position,
        "chain": (p.chain.next_seq, p.chain.prev) if chain else None,
        "sequences": p.inbox.sequences(),
        "partial": p.inbox.partial(),
        "early": early,
        "guard": p.guard.sets(),
        "ledger": dict(p.ledger) if marks else {rid: e for rid, (_, e) in p.ledger.items()},
        "rounds": [(rid, m.state, m.senders(), m.seen_digests(), m.evidence, m.dropped)
                   for rid, m in p.rounds.items()],
    }


@dataclass
class Canon:
    """Outputs in a form two runs can be compared in: an envelope by its header, whether it
    follows the run's previous one in the chain, and its plaintext."""

    net: Network
    last: bytes  # digest of the run's previous envelope

    def __call__(self, events: list[Event]) -> list[Any]:
        out: list[Any] = []
        for e in events:
            if isinstance(e, Outgoing):
                parts = []
                for wire in e.wires:
                    v = verify(wire, self.net.coordinator.registry, CONSORTIUM)
                    h = v.header
                    parts.append((replace(h, prev=b""), h.prev == self.last,
                                  open_sealed(self.net.party(e.recipient).me, v)))
                    self.last = v.digest
                out.append((e.recipient, e.topic, e.round_id, parts))
            elif isinstance(e, Rejected):
                out.append((type(e.error).__name__, str(e.error)))
            elif isinstance(e, Outcome):
                out.append((e.round_id, e.tokens.tobytes(), e.totals.tobytes(), e.withheld,
                            e.requester, e.attributes))
            else:
                out.append(e)
        return out


def feed(p: Party, inp: bytes | Deadline, position: int) -> list[Event]:
    return p.deadline(inp.round_id) if isinstance(inp, Deadline) else p.receive(inp, position)


def check(net: Network, subject: str, *, restores: int = 6, compare_state: bool = True) -> int:
    """Replay `subject`'s inputs in full, snapshot at every quiescent point, and check that a
    restore from (up to `restores` of) them plus the rest gives the same outputs and state.
    Returns how many quiescent points there were."""
    log = net.inputs[subject]
    live = net.party(subject)
    full = fresh(live)
    canon = Canon(net, ZERO_HASH)
    outs, nexts, points = [], [], []
    position = 0
    for i, inp in enumerate(log):
        outs.append(canon(feed(full, inp, position)))
        position += isinstance(inp, bytes)
        nexts.append(position)
        if full.quiescent():
            points.append((i, full.snapshot(), dict(full.ledger), state(full)))
        else:
            with pytest.raises(NotQuiescent):
                full.snapshot()
    # the recorded inputs are all the live party took (aside from its chain, it also
    # requested, and the ledger's positions, the driver gives none)
    assert state(full, chain=False, marks=False) == state(live, chain=False, marks=False)
    final = state(full, chain=False)
    step = max(1, len(points) // restores)
    for n, (i, data, ledger, then) in enumerate(points):
        restored = fresh(live)
        restored.ledger = ledger
        assert restored.restore(data) == nexts[i]
        if compare_state:
            assert state(restored) == then, f"restored at input {i}: another state"
        if n % step and n != len(points) - 1:
            continue
        canon = Canon(net, then["chain"][1])
        for j in range(i + 1, len(log)):
            got = canon(feed(restored, log[j], nexts[j] - isinstance(log[j], bytes)))
            assert got == outs[j], f"input {j} after a restore at input {i}"
        if compare_state:
            assert state(restored, chain=False) == final, f"restored at input {i}: end state"
    return len(points)


STEPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 999), st.integers(0, 999),
                           st.integers(0, 7)), min_size=3, max_size=16)


@pytest.mark.parametrize("subject", [COORDINATOR, "bank-1"])
@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([300, 1500, 100_000]),
       steps=STEPS)
def test_a_restore_plus_the_rest_is_the_full_replay(subject: str, seed: int, chunk: int,
                                                    steps: list[Step]) -> None:
    w = world(seed)
    with chunks_of(chunk):
        play(w, subject, steps)
        points = check(w.net, subject)
    # what the examples covered (pytest --hypothesis-show-statistics)
    event(f"quiescent points: {min(points, 10)}{'+' if points >= 10 else ''}")
    for r in w.net.rejected(subject):
        event(f"rejected: {type(r.error).__name__}")
    for end in w.net.ended(subject):
        event(f"ended: {end.reason.name}")
    event(f"outcomes: {len(w.net.outcomes('bank-1'))}")
    # never a wrong total: every outcome anywhere is the plaintext sum
    for name in INSTITUTIONS:
        for o in w.net.outcomes(name):
            a = getattr(w.net.institutions[name].rounds[o.round_id], "assignment", None)
            assert isinstance(a, MaskAssignment)
            assert_exact(w, o, a.participants)


def assert_exact(w: World, o: Outcome, participants: tuple[str, ...]) -> None:
    by_token = {bytes(w.tokens([c])[0]): c for c in w.ids + w.query_ids}
    for token, row in zip(o.tokens, o.totals, strict=True):
        customer = by_token[bytes(token)]
        held = [w.holdings[p][customer] for p in participants if customer in w.holdings[p]]
        assert int(row[0]) == len(held)
        assert [int(x) for x in row[1:]] == [int(x) for x in np.sum(held, axis=0)]


# -- the property can fail: a snapshot missing one field gives other outputs -----------------
# before the snapshot point: rounds over every institution and a deadline; after it, inputs
# whose handling depends on each field (a duplicate envelope, a re-sealed copy of a message to
# an ended round, a round the guard refuses after the full-set round, a sent envelope's chain)
BREAKING: list[Step] = [("round", 0, 0, 0), ("round", 1, 0, 0), ("deadline", 0, 0, 0),
                        ("dup", 3, 0, 0), ("replay", 5, 0, 0), ("round", 2, 1, 0),
                        ("dup", 1, 0, 0), ("replay", 2, 0, 0)]


def _broken(field: str) -> Callable[[PartySnapshot], bytes]:
    real = snapshot_module.encode

    def encode_without(s: PartySnapshot) -> bytes:
        empty: Any = {"chain": (s.chain[0], ZERO_HASH), "sequences": {}, "guard": [],
                      "rounds": []}[field]
        return real(replace(s, **{field: empty}))
    return encode_without


@pytest.mark.parametrize("field", ["sequences", "guard", "rounds", "chain"])
def test_a_snapshot_missing_a_field_is_caught(field: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    w = world(7)
    play(w, COORDINATOR, BREAKING)
    assert check(w.net, COORDINATOR, restores=100) > 2  # as it is, the snapshot is whole
    monkeypatch.setattr(party_module, "encode_snapshot", _broken(field))
    with pytest.raises(AssertionError, match="after a restore"):  # by outputs alone
        check(w.net, COORDINATOR, restores=100, compare_state=False)


# -- what a hostile member can hold open expires, and what that does to an honest round ------
def test_an_early_share_whose_round_never_opens_expires() -> None:
    w = world(1)
    play(w, "bank-1", [("early", 0, 0, 0)])
    bank = w.net.institutions["bank-1"]
    assert not bank.quiescent()
    with pytest.raises(NotQuiescent):
        bank.snapshot()
    dup = next(i for i in w.net.inputs["bank-1"] if isinstance(i, bytes))
    events = [e for _ in range(EXPIRE + 1) for e in bank.receive(dup)]
    expired = [e.error for e in events if isinstance(e, Rejected)
               and isinstance(e.error, EarlyExpired)]
    assert len(expired) == 1
    assert expired[0].sender == "bank-0"
    assert bank.quiescent()
    assert decode_snapshot(bank.snapshot()).last_position == EXPIRE + 1


def test_a_lone_part_expires() -> None:
    w = world(2)
    with chunks_of(300):
        play(w, COORDINATOR, [("lone", 2, 0, 0)])
    coordinator = w.net.coordinator
    assert coordinator.inbox.partial()
    assert not coordinator.quiescent()
    part = next(i for i in w.net.inputs[COORDINATOR] if isinstance(i, bytes))
    events = [e for _ in range(EXPIRE + 1) for e in coordinator.receive(part)]
    assert [type(e.error).__name__ for e in events if isinstance(e, Rejected)].count(
        "PartialExpired") == 1
    assert coordinator.quiescent()


@pytest.mark.parametrize("chunk", [100_000, 300])
def test_an_honest_round_whose_held_share_expired_aborts_typed(chunk: int) -> None:
    """The assignment reaches one institution only after more than `expire_after` other
    inputs, its leader's share long before (whole, or one part of it): the share expires, the
    institution never contributes, and the round ends TIMEOUT everywhere, never a total."""
    w = world(3)
    net = w.net
    rid = bytes(range(16))
    with chunks_of(chunk):
        net.take("bank-0", net.institutions["bank-0"].request(
            rid, w.tokens(w.query_ids), participants=INSTITUTIONS,
            attributes=tuple(s.name for s in SPECS), deadline_ms=DEADLINE))
        request, net.in_flight = net.in_flight, []
        for to, wire, _ in request:
            net.deliver(to, wire)  # the coordinator's assignments and query are in flight
        leader = _leader(net, rid)
        victim = next(n for n in INSTITUTIONS if n != leader)
        held = [f for f in net.in_flight if f[0] == victim]
        net.in_flight = [f for f in net.in_flight if f[0] != victim]
        parts: list[bytes] = []
        while net.in_flight:  # the leader shares; one part of the victim's share gets there
            to, wire, _ = net.in_flight.pop(0)
            if to == victim:
                parts.append(wire)
                if len(parts) > 1:
                    continue
            net.deliver(to, wire)
        for _ in range(EXPIRE + 1):  # other traffic: a copy of what it has
            net.deliver(victim, parts[0])
        expired = [e for e in net.rejected(victim)
                   if isinstance(e.error, EarlyExpired | PartialExpired)]
        assert len(expired) == 1
        for to, wire, _ in held:
            net.deliver(to, wire)
        for wire in parts[1:]:  # the rest of a chunked share, too late
            net.deliver(victim, wire)
        net.run()
        assert net.published() == []
        net.expire(LATER)
    assert not [o for n in INSTITUTIONS for o in net.outcomes(n)]
    ends = {n: [e.reason for e in net.ended(n) if e.round_id == rid]
            for n in (COORDINATOR, *INSTITUTIONS)}
    assert ends == {key: [AbortReason.TIMEOUT] for key in ends}
    for _ in range(EXPIRE + 1):  # a late part, if any, expires too
        net.deliver(victim, parts[0])
    assert all(net.party(n).quiescent() for n in (COORDINATOR, *INSTITUTIONS))


def _leader(net: Network, rid: bytes) -> str:
    for to, wire, _ in net.in_flight:
        v = verify(wire, net.coordinator.registry, CONSORTIUM)
        if v.header.kind is MessageKind.LEADER_QUERY:
            return to
    raise AssertionError(f"no query for round {rid.hex()} in flight")


# -- a bad snapshot is a typed error, never a wrong state -----------------------------------
def _snapshotted() -> tuple[World, bytes]:
    w = world(4)
    play(w, "bank-2", [("round", 0, 0, 0), ("round", 2, 0, 0)])
    bank = w.net.institutions["bank-2"]
    assert bank.quiescent()
    return w, bank.snapshot()


def test_corrupt_or_foreign_snapshots_are_typed_errors() -> None:
    w, data = _snapshotted()
    bank = w.net.institutions["bank-2"]
    rng = random.Random(5)
    for cut in range(0, len(data), max(1, len(data) // 50)):
        with pytest.raises(SnapshotError):
            decode_snapshot(data[:cut])
    for _ in range(300):  # flips: a snapshot or a SnapshotError, nothing else
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        with suppress(SnapshotError):
            decode_snapshot(bytes(b))
    other = fresh(w.net.institutions["bank-0"])
    other.ledger = dict(bank.ledger)
    with pytest.raises(SnapshotError, match="bank-2"):
        other.restore(data)
    lacking = fresh(bank)
    with pytest.raises(SnapshotError, match="ledger"):
        lacking.restore(data)  # its ledger file lost the rounds the snapshot holds
    assert lacking.rounds == {}
    assert lacking.last_position == -1
    newer = bytearray(data)
    newer[newer.index(b"version") + len(b"version")] = VERSION + 1
    with pytest.raises(SnapshotError, match=f"version {VERSION + 1}"):
        decode_snapshot(bytes(newer))
    wider = fresh(bank)
    wider.ledger = dict(bank.ledger)
    wider.guard = type(bank.guard)(bank.guard.window + 1)
    with pytest.raises(SnapshotError, match="difference window"):
        wider.restore(data)
    restored = fresh(bank)
    restored.ledger = dict(bank.ledger)
    assert restored.restore(data) == bank.last_position + 1
    with pytest.raises(ValueError, match="handled no input"):
        restored.restore(data)


def test_a_round_in_flight_is_not_quiescent() -> None:
    w = world(6)
    net = w.net
    net.take("bank-0", net.institutions["bank-0"].request(
        bytes(16), w.tokens(w.query_ids), participants=INSTITUTIONS,
        attributes=tuple(s.name for s in SPECS), deadline_ms=DEADLINE))
    request, net.in_flight = net.in_flight, []
    for to, wire, _ in request:
        net.deliver(to, wire)
    net.in_flight.clear()  # no assignment gets through: the round waits for its deadline
    assert net.coordinator.running() == [bytes(16)]
    assert not net.coordinator.quiescent()
    with pytest.raises(NotQuiescent, match="1 rounds running"):
        net.coordinator.snapshot()
    net.expire(LATER)
    assert net.coordinator.quiescent()
    assert decode_snapshot(net.coordinator.snapshot()).rounds[0].state.name == "ABORTED"
