"""Z_2^64 arithmetic and per-round randomness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ring import (
    add_mask,
    coordinator_share,
    derive_seed,
    pairwise_mask,
    permutation,
    prg,
    prg_matrix,
    prg_rows,
    sum_matrices,
    uniform_below,
    zero_sum_masks,
)

SECRET = b"s" * 32


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 40), width=st.integers(1, 12), rid=st.binary(min_size=16, max_size=16))
def test_masks_sum_to_zero(n: int, width: int, rid: bytes) -> None:
    masks = zero_sum_masks(derive_seed(SECRET, "masks", rid), n, width)
    assert masks.shape == (n, width)
    assert not masks.sum(axis=0, dtype=np.uint64).any()


def test_no_two_rounds_share_a_mask_or_seed() -> None:
    rows: set[bytes] = set()
    seeds: set[bytes] = set()
    for r in range(200):
        rid = r.to_bytes(16, "big")
        for label in ("masks", "order", "leader"):
            seeds.add(derive_seed(SECRET, label, rid))
        for j in range(5):
            seeds.add(derive_seed(SECRET, "share", rid, j))
        for m in zero_sum_masks(derive_seed(SECRET, "masks", rid), 5, 3):
            rows.add(m.tobytes())
    assert len(seeds) == 200 * 8
    assert len(rows) == 200 * 5


def test_derivation_depends_on_every_input() -> None:
    rid = bytes(16)
    base = derive_seed(SECRET, "share", rid, 1)
    assert base != derive_seed(b"t" * 32, "share", rid, 1)
    assert base != derive_seed(SECRET, "shard", rid, 1)
    assert base != derive_seed(SECRET, "share", b"\x01" + bytes(15), 1)
    assert base != derive_seed(SECRET, "share", rid, 2)
    assert base == derive_seed(SECRET, "share", rid, 1)  # a restart derives the same
    with pytest.raises(ValueError, match="32 bytes"):
        derive_seed(b"short", "x", rid)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 300), cols=st.integers(1, 6), k=st.integers(1, 11),
       seed=st.integers(0, 2**32 - 1))
def test_shares_sum_to_values_plus_mask(rows: int, cols: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64, (rows, cols), dtype=np.uint64, endpoint=False)
    mask = rng.integers(0, 2**64, cols, dtype=np.uint64, endpoint=False)
    seeds = [rng.bytes(32) for _ in range(k)]
    y = add_mask(values, mask)
    e_s = coordinator_share(y, seeds)
    total = sum_matrices([e_s, *(prg_matrix(s, rows, cols) for s in seeds)])
    np.testing.assert_array_equal(total, y)


def test_prg_is_deterministic_little_endian_and_seed_dependent() -> None:
    a = prg(b"\x00" * 32, 1000)
    assert a.dtype == np.uint64
    assert a.shape == (1000,)
    np.testing.assert_array_equal(a, prg(b"\x00" * 32, 1000))
    assert not np.array_equal(a, prg(b"\x01" + b"\x00" * 31, 1000))
    np.testing.assert_array_equal(prg(b"\x00" * 32, 10), a[:10])  # a prefix of the stream
    with pytest.raises(ValueError, match="32 bytes"):
        prg(b"x", 1)


def test_permutation_and_uniform_below() -> None:
    for i in range(50):
        s = derive_seed(SECRET, "p", bytes(16), i)
        p = permutation(s, 9)
        assert sorted(p) == list(range(9))
        assert all(0 <= v < 7 for v in uniform_below(s, 7, 100))
    firsts = {permutation(derive_seed(SECRET, "p", bytes(16), i), 4)[0] for i in range(200)}
    assert firsts == {0, 1, 2, 3}


@settings(max_examples=60, deadline=None)
@given(total=st.integers(0, 200), cols=st.integers(1, 9), data=st.data())
def test_expanding_a_row_range_equals_slicing_the_whole_expansion(
        total: int, cols: int, data: st.DataObject) -> None:
    """A chunk's PRG rows (AES-CTR started at the chunk's counter block) are exactly the rows
    of the whole matrix's expansion, whatever the start row and width (odd widths start in
    the middle of an AES block)."""
    seed = data.draw(st.binary(min_size=32, max_size=32))
    start = data.draw(st.integers(0, total))
    rows = data.draw(st.integers(0, total - start))
    whole = prg_matrix(seed, total, cols)
    np.testing.assert_array_equal(prg_rows(seed, start, rows, cols),
                                  whole[start:start + rows])


def test_chunks_of_a_pairwise_mask_and_of_a_share_are_slices_of_the_whole() -> None:
    rng = np.random.default_rng(5)
    seeds = {j: rng.bytes(32) for j in (0, 2, 3)}
    whole = pairwise_mask(1, seeds, 100, 5)
    parts = [pairwise_mask(1, seeds, 7, 5, start=s) for s in range(0, 98, 7)]
    np.testing.assert_array_equal(np.concatenate(parts), whole[:98])
    y = rng.integers(0, 2**64, (100, 5), dtype=np.uint64, endpoint=False)
    share_seeds = list(seeds.values())
    e_s = coordinator_share(y, share_seeds)
    np.testing.assert_array_equal(coordinator_share(y[30:61], share_seeds, start=30),
                                  e_s[30:61])
