"""Fixed-point attributes: exact parsing, bounds, and overflow detection on decode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import TotalOutOfRange, ValueRangeError
from protocol.fixedpoint import (
    AttributeSpec,
    check_column_bounds,
    decode_totals,
    encode_columns,
    format_decimal,
    parse_decimal,
)

SPEC = AttributeSpec("balance", 2, -10**6, 10**6)


@given(units=st.integers(-(2**63) + 1, 2**63 - 1), scale=st.integers(0, 18))
def test_format_then_parse_is_exact(units: int, scale: int) -> None:
    assert parse_decimal(format_decimal(units, scale), scale) == units


@pytest.mark.parametrize(("text", "scale", "units"), [
    ("12.34", 2, 1234), ("-0.05", 2, -5), ("7", 2, 700), (" 1.5 ", 1, 15), ("0", 0, 0),
    ("1e2", 0, 100), ("-12.30", 2, -1230)])
def test_parse_examples(text: str, scale: int, units: int) -> None:
    assert parse_decimal(text, scale) == units


@pytest.mark.parametrize(("text", "message"), [
    ("1.234", "more than 2 decimal places"), ("abc", "not a decimal"), ("", "not a decimal"),
    ("NaN", "not a finite"), ("inf", "not a finite")])
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueRangeError, match=message):
        parse_decimal(text, 2)


def test_bounds_are_checked_and_named() -> None:
    assert SPEC.parse("10000.00") == 10**6
    with pytest.raises(ValueRangeError, match=r"balance: 10000.01 is outside"):
        SPEC.parse("10000.01")
    with pytest.raises(ValueRangeError, match="row 2"):
        check_column_bounds(SPEC, np.array([0, 5, 10**7], dtype=np.int64))


@pytest.mark.parametrize("kwargs", [
    {"name": "holders", "scale": 0, "min": 0, "max": 1},
    {"name": "Bad Name", "scale": 0, "min": 0, "max": 1},
    {"name": "x", "scale": 19, "min": 0, "max": 1},
    {"name": "x", "scale": 0, "min": 2, "max": 1}])
def test_invalid_specs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="attribute"):
        AttributeSpec(**kwargs)  # type: ignore[arg-type]


def test_decode_totals_returns_signed_values_within_bounds() -> None:
    totals = encode_columns(np.array([[2, -2 * 10**6, 5], [1, 10**6, 0]], dtype=np.int64))
    spec2 = AttributeSpec("days", 0, 0, 10)
    out = decode_totals(totals, (SPEC, spec2), n=2)
    assert out.tolist() == [[2, -2 * 10**6, 5], [1, 10**6, 0]]


def test_a_wrapped_total_is_an_error_not_a_number() -> None:
    # 3 * 2^62 wraps past 2^63 into a negative int64: decode must refuse it
    big = AttributeSpec("big", 0, 0, 2**62)
    wrapped = (np.array([3 * 2**62], dtype=object) % 2**64).astype(np.uint64)
    totals = np.array([[3, int(wrapped[0])]], dtype=np.uint64)
    with pytest.raises(TotalOutOfRange):
        decode_totals(totals, (big,), n=3)


def test_holder_count_above_participants_is_refused() -> None:
    with pytest.raises(TotalOutOfRange, match="holders"):
        decode_totals(np.array([[4, 0]], dtype=np.uint64), (SPEC,), n=3)


def test_total_outside_n_times_bounds_is_refused() -> None:
    totals = encode_columns(np.array([[2, 2 * 10**6 + 1]], dtype=np.int64))
    with pytest.raises(TotalOutOfRange, match="balance"):
        decode_totals(totals, (SPEC,), n=2)
