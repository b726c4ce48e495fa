"""Pairwise masks (issue 17, PROTOCOL.md "Pairwise mode"): nobody deals the masks, so the
coordinator and the leader together learn nothing about a third institution's values.

The collusion tests hand the test the coordinator's and the leader's keys and state, as
colluders would pool them, and try to unmask an honest institution's contribution."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.coordinator import CoordinatorRound
from protocol.driver import Network, build_network
from protocol.errors import AbortReason
from protocol.machine import Output
from protocol.messages import MaskMode, Scope
from protocol.party import Keyring
from protocol.ring import (
    U64,
    derive_seed,
    pairwise_mask,
    pairwise_seed,
    prg_matrix,
    sum_matrices,
)
from protocol.tokens import LocalTable, tokenize
from tests.helpers import KEY, SPECS, expected, make_world, outcome_of, run_round

NAMES = ("balance", "overdue_days")
CHI2_P_1E4 = 339  # chi-square over bytes, 255 degrees of freedom, p = 1e-4


def _chi2_bytes(m: U64) -> float:
    counts = np.bincount(np.frombuffer(m.tobytes(), dtype=np.uint8), minlength=256)
    expect = m.nbytes / 256
    return float(((counts - expect) ** 2 / expect).sum())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 12), universe=st.integers(0, 400),
       hold=st.sampled_from([0.0, 0.5, 1.0]), scope=st.sampled_from(list(Scope)),
       seed=st.integers(0, 2**32 - 1))
def test_pairwise_totals_are_exact(n: int, universe: int, hold: float, scope: Scope,
                                   seed: int) -> None:
    world = make_world(n, universe=universe, hold=hold, query=universe, seed=seed,
                       masks=MaskMode.PAIRWISE)
    rid = run_round(world, requester="bank-0", scope=scope, min_holders=1)
    m = world.net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    assert m.assignment is not None
    assert m.assignment.masks is MaskMode.PAIRWISE
    assert not m.assignment.mask.any()  # the coordinator dealt nothing
    _ids, totals, withheld = expected(world, m.leader, scope, 1)
    for who in world.net.institutions:
        out = outcome_of(world, who, rid)
        np.testing.assert_array_equal(out.totals, totals)
        assert out.withheld == withheld


@given(n=st.integers(2, 12), rows=st.integers(0, 50), seed=st.binary(min_size=8, max_size=8))
def test_pairwise_masks_cancel(n: int, rows: int, seed: bytes) -> None:
    shared = {(i, j): derive_seed(seed * 4, "pair", b"", i, j)
              for i in range(n) for j in range(i + 1, n)}
    masks = [pairwise_mask(i, {j: shared[min(i, j), max(i, j)] for j in range(n) if j != i},
                           rows, 3) for i in range(n)]
    assert not sum_matrices(masks).any()
    if rows and n > 1:
        assert masks[0].any()


def test_pairwise_seeds_differ_by_round_attempt_and_pair() -> None:
    s = os.urandom(32)
    seeds = {pairwise_seed(s, d, a, b, attempt)
             for d in (bytes(32), b"\x01" * 32) for attempt in (0, 1)
             for a, b in (("x", "y"), ("x", "z"))}
    assert len(seeds) == 8
    assert pairwise_seed(s, bytes(32), "x", "y") == pairwise_seed(s, bytes(32), "y", "x")


def test_a_mismatched_mask_mode_is_refused() -> None:
    """An institution configured for pairwise masks refuses a round with dealt masks."""
    world = make_world(3, universe=30, hold=1.0, query=30, seed=3)
    tables = {n: p.table for n, p in world.net.institutions.items()}
    net = build_network(tables, SPECS)  # the coordinator deals masks
    for p in net.institutions.values():
        p.policy = p.policy.__class__(**{**p.policy.__dict__, "masks": MaskMode.PAIRWISE})
    rid = os.urandom(16)
    net.take("bank-0", net.institutions["bank-0"].request(
        rid, tokenize(world.query_ids, KEY), participants=tuple(tables), attributes=NAMES,
        deadline_ms=10**13))
    net.run()
    ends = net.ended("coordinator")
    assert ends
    assert ends[0].reason is AbortReason.POLICY
    assert "masks" in ends[0].detail
    assert net.published() == []


# -- collusion ---------------------------------------------------------------------------------
def _round_kept(n: int, mode: MaskMode, rows: int = 3000) -> tuple[Network, bytes, dict[
        str, np.ndarray]]:
    """A QUERY-scope round whose coordinator keeps every contribution (as a colluder would);
    every institution holds every customer with structured values."""
    ids = [f"c{i}" for i in range(rows)]
    values = {f"bank-{k}": np.stack([np.arange(rows) * (k + 1) * 1000 + 7, np.full(rows, 3 + k)],
                                    axis=1).astype(np.int64) for k in range(n)}
    tables = {name: LocalTable.build(tokenize(ids, KEY), v, NAMES) for name, v in values.items()}
    net = build_network(tables, SPECS, masks=mode)
    kept: dict[str, U64] = {}
    rid = os.urandom(16)
    original = CoordinatorRound._take

    def keep(self: CoordinatorRound, sender: str, chunk: int, last: bool, rows_digest: bytes,
             m: U64) -> list[Output]:
        assert chunk == 0  # one chunk: the whole matrix
        assert last
        kept[sender] = m
        return original(self, sender, chunk, last, rows_digest, m)

    CoordinatorRound._take = keep  # type: ignore[method-assign]
    try:
        net.take("bank-0", net.institutions["bank-0"].request(
            rid, tokenize(ids, KEY), participants=tuple(tables), attributes=NAMES,
            deadline_ms=10**13, scope=Scope.QUERY))
        net.run()
    finally:
        CoordinatorRound._take = original  # type: ignore[method-assign]
    assert len(net.published()) == 1
    KEPT[rid] = kept
    return net, rid, values


KEPT: dict[bytes, dict[str, U64]] = {}  # round -> what its coordinator received, by sender


def _colluders_unmask(net: Network, rid: bytes, target: str, colluders: set[str]) -> U64:
    """What the coordinator, the leader and `colluders` recover of `target`'s X: Y - E - the
    part of its mask they can compute (the dealt mask, or their pairwise seeds with it)."""
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    a = m.assignment
    assert a is not None
    y = KEPT[rid][target]
    rows, width = y.shape
    leader = net.institutions[a.leader]
    e = prg_matrix(derive_seed(leader.me.secret, "share", m.digest, a.participants.index(target)),
                   rows, width)
    out = np.subtract(y, e, dtype=np.uint64)
    if a.masks is MaskMode.DEALT:
        assert m.masks is not None
        np.subtract(out, m.masks[a.participants.index(target)][np.newaxis, :], out=out)
        return out
    t = a.participants.index(target)
    for c in colluders | {a.leader}:
        k = a.participants.index(c)
        ring = Keyring(net.institutions[c].me, net.institutions[c].registry)
        seed = pairwise_seed(ring.agree(target), m.digest, c, target)
        part = pairwise_mask(t, {k: seed}, rows, width)
        np.subtract(out, part, out=out)
    return out


def _leader_and_target(net: Network, rid: bytes) -> tuple[str, str]:
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    return m.leader, next(p for p in m.participants if p != m.leader)


def test_dealt_masks_let_coordinator_and_leader_unmask_a_third_institution() -> None:
    """The patent's limit, documented: the negative control of the test below."""
    net, rid, values = _round_kept(3, MaskMode.DEALT)
    _, target = _leader_and_target(net, rid)
    got = _colluders_unmask(net, rid, target, set())
    np.testing.assert_array_equal(got[:, 1:].view(np.int64), values[target])
    assert got[:, 0].tolist() == [1] * got.shape[0]
    assert _chi2_bytes(got) > 10 * CHI2_P_1E4  # structured, far from uniform


def test_pairwise_masks_leave_coordinator_and_leader_a_uniform_matrix() -> None:
    net, rid, values = _round_kept(3, MaskMode.PAIRWISE)
    _, target = _leader_and_target(net, rid)
    got = _colluders_unmask(net, rid, target, set())
    assert _chi2_bytes(got) < CHI2_P_1E4
    bits = np.unpackbits(np.frombuffer(got.tobytes(), dtype=np.uint8))
    assert abs(bits.mean() - 0.5) < 0.005
    matches = (got[:, 1:].view(np.int64) == values[target]).mean()
    assert matches < 0.001  # unrelated to the true values
    # positive control: were the third institution a colluder too, the same computation
    # would unmask the target exactly; so the uniformity above is the honest pair's doing
    third = next(p for p in values if p not in (target, _leader_and_target(net, rid)[0]))
    exact = _colluders_unmask(net, rid, target, {third})
    np.testing.assert_array_equal(exact[:, 1:].view(np.int64), values[target])


@pytest.mark.parametrize("seed", [1, 2])
def test_three_colluders_of_five_learn_only_the_honest_sum(seed: int) -> None:
    net, rid, values = _round_kept(5, MaskMode.PAIRWISE, rows=2000)
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    leader = m.leader
    others = [p for p in m.participants if p != leader]
    rng = np.random.default_rng(seed)
    honest = sorted(rng.choice(others, size=2, replace=False).tolist())
    colluders = set(m.participants) - set(honest)  # the leader and two more, with the coordinator
    assert len(colluders) == 3
    got = {h: _colluders_unmask(net, rid, h, colluders) for h in honest}
    for h in honest:  # each honest institution alone: uniform
        assert _chi2_bytes(got[h]) < CHI2_P_1E4
    total = np.add(got[honest[0]], got[honest[1]], dtype=np.uint64)
    want = values[honest[0]] + values[honest[1]]
    np.testing.assert_array_equal(total[:, 1:].view(np.int64), want)  # their sum, exactly
    assert total[:, 0].tolist() == [2] * total.shape[0]
