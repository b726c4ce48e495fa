"""Random consortia and their plaintext answers, for tests that check the round against them."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from protocol.driver import Network, build_network
from protocol.fixedpoint import AttributeSpec
from protocol.machine import Outcome
from protocol.messages import Scope
from protocol.tokens import LocalTable, Tokens, tokenize, tokens_to_bytes

KEY = bytes(range(32))
SPECS = (AttributeSpec("balance", 2, -10**12, 10**12), AttributeSpec("overdue_days", 0, 0, 3650))
DEADLINE = 10**13  # far future, epoch ms; tests move time by calling Network.expire


@dataclass
class World:
    ids: list[str]
    holdings: dict[str, dict[str, NDArray[np.int64]]]  # institution -> customer id -> values
    query_ids: list[str]
    net: Network

    def tokens(self, ids: list[str]) -> Tokens:
        return tokenize(ids, KEY)


def make_world(n: int, *, universe: int, hold: float, query: int, seed: int,
               one_customer: bool = False, **policy: Any) -> World:
    rng = np.random.default_rng(seed)
    ids = [f"Customer {i:06d}" for i in range(universe)]
    names = [f"bank-{i}" for i in range(n)]
    holdings: dict[str, dict[str, NDArray[np.int64]]] = {}
    tables = {}
    for name in names:
        if one_customer:
            held = [0] if universe else []
        else:
            held = [i for i in range(universe) if rng.random() < hold]
        vals = np.stack([rng.integers(SPECS[0].min, SPECS[0].max, len(held), endpoint=True),
                         rng.integers(0, 3650, len(held), endpoint=True)], axis=1
                        ).astype(np.int64).reshape(len(held), 2)
        holdings[name] = {ids[i]: vals[k] for k, i in enumerate(held)}
        tables[name] = LocalTable.build(tokenize([ids[i] for i in held], KEY), vals,
                                        ("balance", "overdue_days"))
    extra = [f"Nobody {i}" for i in range(max(1, query // 10))]
    pool = ids + extra
    q = [pool[i] for i in rng.permutation(len(pool))[:query]]
    return World(ids, holdings, q, build_network(tables, SPECS, rng=random.Random(seed),
                                                 **policy))


def expected(world: World, leader: str, scope: Scope,
             min_holders: int) -> tuple[list[str], NDArray[np.int64], int]:
    """Plaintext answer: kept ids in row order, their totals (holders first), withheld count."""
    rows = [c for c in world.query_ids
            if scope is Scope.QUERY or c in world.holdings[leader]]
    totals = np.zeros((len(rows), 3), dtype=np.int64)
    for r, c in enumerate(rows):
        for held in world.holdings.values():
            if c in held:
                totals[r, 0] += 1
                totals[r, 1:] += held[c]
    kept = totals[:, 0] >= min_holders
    return [c for c, k in zip(rows, kept, strict=True) if k], totals[kept], int((~kept).sum())


def run_round(world: World, *, requester: str, scope: Scope, min_holders: int,
              round_id: bytes | None = None) -> bytes:
    rid = round_id or os.urandom(16)
    net = world.net
    participants = tuple(net.institutions)
    net.take(requester, net.institutions[requester].request(
        rid, world.tokens(world.query_ids), participants=participants,
        attributes=tuple(s.name for s in SPECS), deadline_ms=DEADLINE, scope=scope,
        min_holders=min_holders))
    net.run()
    return rid


def outcome_of(world: World, who: str, rid: bytes) -> Outcome:
    found = [o for o in world.net.outcomes(who) if o.round_id == rid]
    assert len(found) == 1, f"{who} has {len(found)} outcomes for the round"
    return found[0]


def token_ids(world: World, outcome: Outcome) -> list[str]:
    """Map an outcome's tokens back to customer ids, as the requester does."""
    lookup = {tokens_to_bytes(world.tokens([c])): c for c in world.ids + world.query_ids}
    return [lookup[bytes(t)] for t in outcome.tokens]
