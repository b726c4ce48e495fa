"""An in-memory driver: whole rounds among a coordinator and n institutions, without Kafka.

Deliveries can be dropped, duplicated and reordered, driven by a `random.Random` the caller
seeds; deadlines fire only when the caller says time has run out. Every envelope goes through
the real codec, HPKE and signatures, so what passes here is what travels on the bus.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from protocol.envelope import KemKind, PrivateParty, PublicParty, kem_keys, private_party
from protocol.fixedpoint import AttributeSpec
from protocol.machine import Deadline, Ended, Outcome, Published, SetTimer
from protocol.party import CoordinatorParty, Event, InstitutionParty, Outgoing, Rejected
from protocol.policy import ConsortiumPolicy
from protocol.tokens import LocalTable

COORDINATOR = "coordinator"
CONSORTIUM = "test"


def _bytes(seed: bytes, label: str, n: int) -> bytes:
    return hashlib.shake_256(seed + b"/" + label.encode()).digest(n)


def keys_for(party_id: str, seed: bytes, kem: KemKind = KemKind.X25519,
             ) -> tuple[PrivateParty, PublicParty]:
    """Deterministic test keys for a party (never for production: `zerosum init` draws them)."""
    s = seed + party_id.encode()
    kem_priv = _bytes(s, "kem", 32 if kem is KemKind.X25519 else 96)
    priv = private_party(party_id, signing_seed=_bytes(s, "sign", 32), kem=kem,
                         kem_private=kem_priv, secret=_bytes(s, "secret", 32))
    _, kem_pub, _ = kem_keys(kem, kem_priv)
    pub = PublicParty(party_id, priv.signing_key.public_key(), kem, kem_pub,
                      f"zerosum.{CONSORTIUM}.{party_id}", priv.agreement().public_key())
    return priv, pub


@dataclass
class Network:
    """The parties and the envelopes in flight between them."""

    coordinator: CoordinatorParty
    institutions: dict[str, InstitutionParty]
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: bool = False
    in_flight: list[tuple[str, bytes, bool]] = field(default_factory=list)  # (to, wire, copy)
    events: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    timers: dict[tuple[str, bytes], int] = field(default_factory=dict)
    delivered: int = 0
    wire_log: list[bytes] = field(default_factory=list)
    topic_log: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, wire) as sent
    # every party's inputs in the order it took them: what a replay of its inbox feeds it
    inputs: dict[str, list[bytes | Deadline]] = field(default_factory=lambda: defaultdict(list))

    def party(self, name: str) -> CoordinatorParty | InstitutionParty:
        return self.coordinator if name == self.coordinator.me.party_id else \
            self.institutions[name]

    def take(self, who: str, events: list[Event]) -> None:
        """Queue what `who` emitted; remember everything else it said."""
        for e in events:
            if isinstance(e, Outgoing):
                for w in e.wires:
                    self.in_flight.append((e.recipient, w, False))
                    self.wire_log.append(w)
                    self.topic_log.append((e.topic, w))
            elif isinstance(e, SetTimer):
                self.timers[(who, e.round_id)] = e.at_ms
            self.events[who].append(e)

    def run(self, max_steps: int = 1_000_000) -> None:
        """Deliver until nothing is in flight."""
        for _ in range(max_steps):
            if not self.in_flight:
                return
            i = self.rng.randrange(len(self.in_flight)) if self.reorder else 0
            recipient, wire, is_copy = self.in_flight.pop(i)
            if self.drop and self.rng.random() < self.drop:
                continue
            # an original is delivered one to three extra times; copies are not copied again
            if not is_copy and self.duplicate and self.rng.random() < self.duplicate:
                for _ in range(self.rng.randint(1, 3)):
                    self.in_flight.insert(self.rng.randrange(len(self.in_flight) + 1),
                                          (recipient, wire, True))
            self.deliver(recipient, wire)
        raise RuntimeError("the network did not settle")

    def deliver(self, recipient: str, wire: bytes) -> None:
        """One envelope into `recipient`'s inbox, now."""
        self.delivered += 1
        self.inputs[recipient].append(wire)
        self.take(recipient, self.party(recipient).receive(wire))

    def expire(self, now_ms: int) -> None:
        """Time moves to `now_ms`: every timer due by then fires, then deliveries run."""
        due = sorted((at, who, rid) for (who, rid), at in self.timers.items() if at <= now_ms)
        for _, who, rid in due:
            del self.timers[(who, rid)]
            self.inputs[who].append(Deadline(rid))
            self.take(who, self.party(who).deadline(rid))
        self.run()

    def of(self, who: str, kind: type) -> list[Event]:
        return [e for e in self.events[who] if isinstance(e, kind)]

    def outcomes(self, who: str) -> list[Outcome]:
        return [e for e in self.events[who] if isinstance(e, Outcome)]

    def ended(self, who: str) -> list[Ended]:
        return [e for e in self.events[who] if isinstance(e, Ended)]

    def published(self) -> list[Published]:
        return [e for e in self.events[self.coordinator.me.party_id]
                if isinstance(e, Published)]

    def rejected(self, who: str) -> list[Rejected]:
        return [e for e in self.events[who] if isinstance(e, Rejected)]


def build_network(tables: dict[str, LocalTable], specs: tuple[AttributeSpec, ...], *,
                  seed: bytes = b"zerosum-test", kem: KemKind = KemKind.X25519,
                  rng: random.Random | None = None, **policy: Any) -> Network:
    """A coordinator and one institution per table, keys derived from `seed`; `policy`
    fields (allow_subsets, min_holders, ...) for every party's copy of the policy."""
    names = [COORDINATOR, *tables]
    keys = {n: keys_for(n, seed, kem) for n in names}
    registry = {n: pub for n, (_, pub) in keys.items()}
    attrs = {s.name: s for s in specs}
    pol = ConsortiumPolicy(frozenset(tables), attrs, **policy)
    coordinator = CoordinatorParty(keys[COORDINATOR][0], registry, CONSORTIUM, pol)
    institutions = {
        n: InstitutionParty(keys[n][0], registry, CONSORTIUM, coordinator=COORDINATOR,
                            table=t, policy=pol)
        for n, t in tables.items()}
    return Network(coordinator, institutions, rng=rng or random.Random(0))
