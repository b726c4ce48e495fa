"""PROTOCOL.md's invariants, checked over whole rounds on the in-memory driver.

Published totals equal the plaintext per-customer sums exactly; `holders` equals the true holder
count; withheld rows are exactly those below the threshold; every participant gets the same
result; a round ends in exactly one outcome.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.coordinator import CoordinatorRound
from protocol.messages import Scope
from tests.helpers import expected, make_world, outcome_of, run_round, token_ids

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(n=st.integers(2, 12), universe=st.integers(0, 2500),
       hold=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]), query_frac=st.floats(0.0, 1.2),
       scope=st.sampled_from(list(Scope)), min_holders=st.integers(1, 4),
       one_customer=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_published_totals_equal_plaintext_sums(n: int, universe: int, hold: float,
                                               query_frac: float, scope: Scope,
                                               min_holders: int, one_customer: bool,
                                               seed: int) -> None:
    min_holders = min(min_holders, n)
    world = make_world(n, universe=universe, hold=hold, query=int(universe * query_frac),
                       seed=seed, one_customer=one_customer)
    names = list(world.net.institutions)
    requester = names[seed % n]
    rid = run_round(world, requester=requester, scope=scope, min_holders=min_holders)

    machine = world.net.coordinator.rounds[rid]
    assert isinstance(machine, CoordinatorRound)
    assert len(world.net.published()) == 1
    ids, totals, withheld = expected(world, machine.leader, scope, min_holders)
    for who in names:
        out = outcome_of(world, who, rid)
        assert token_ids(world, out) == ids
        np.testing.assert_array_equal(out.totals, totals)
        assert out.withheld == withheld
        assert world.net.ended(who) == []

