"""The bench's peers at a tiny size: MPyC (a process per party over TLS on localhost) and
TenSEAL BFV must reproduce the plaintext sums exactly, on the data a zerosum round is given.

mpyc and tenseal are in the dev extra, so these run in `make test`; without them they fail
(ModuleNotFoundError), they are never skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agents.bench import SPECS, write_data
from agents.bench_peers import (
    BFV_DEGREE,
    aligned_inputs,
    bfv_modulus_bits,
    exact,
    peers,
    plaintext_totals,
)
from agents.init import init_consortium


def test_peers_are_given_the_rounds_data_aligned(tmp_path: Path) -> None:
    init_consortium(tmp_path, institutions=3, customers=1, bootstrap="127.0.0.1:1",
                    attributes=SPECS)
    expected = write_data(tmp_path, 3, 400, SPECS, hold=0.7, seed=5)
    inputs = aligned_inputs(3, 400, SPECS, hold=0.7, seed=5)
    assert [m.shape for m in inputs] == [(400, 1 + len(SPECS))] * 3
    np.testing.assert_array_equal(plaintext_totals(inputs), expected)
    assert {int(v) for m in inputs for v in np.unique(m[:, 0])} == {0, 1}  # holder flags


def test_exact_rejects_a_total_one_off_or_a_row_missing() -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.integers(-10**9, 10**9, (30, 5), dtype=np.int64) for _ in range(3)]
    got = plaintext_totals(inputs).astype(object)  # MPyC opens Python ints
    assert exact(got, inputs)
    got[17, 3] += 1
    assert not exact(got, inputs)
    assert not exact(plaintext_totals(inputs)[:-1], inputs)


async def test_both_peers_sum_exactly_and_report_their_speedup() -> None:
    # more values than one ciphertext holds, and sums near the largest the data can give
    rng = np.random.default_rng(9)
    customers = BFV_DEGREE // 5 + 300
    inputs = [rng.integers(-10**11, 10**11, (customers, 5), dtype=np.int64) for _ in range(3)]
    inputs[0][0, :] = 10**11
    inputs[1][0, :] = 10**11
    said: list[str] = []
    out = await peers(inputs, 0.25, said.append)
    assert (out["customers"], out["columns"], out["institutions"]) == (customers, 5, 3)
    assert out["mpyc"]["correct"] is True
    assert out["mpyc"]["parties"] == 3
    assert out["mpyc"]["tls"] is True
    assert out["tenseal"]["correct"] is True
    assert out["tenseal"]["ciphertexts_per_institution"] == 2
    assert out["tenseal"]["plain_modulus_bits"] == bfv_modulus_bits(inputs)
    for name in ("mpyc", "tenseal"):
        assert out[name]["seconds"] > 0
        assert out[name]["speedup"] == out[name]["seconds"] / 0.25
    assert sum("equal" in line for line in said) == 2
