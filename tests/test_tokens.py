"""Customer tokens and the numpy joins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import DataError
from protocol.tokens import LocalTable, normalise_id, tokenize, tokens_to_bytes

KEY = bytes(32)


def test_normalisation() -> None:
    assert normalise_id("  ABC  def\t") == "abc def"
    assert normalise_id("\uff21\uff22\uff23") == "abc"  # full-width letters, NFKC
    assert normalise_id("Straße") == normalise_id("STRASSE")


def test_tokens_are_16_bytes_keyed_and_normalised() -> None:
    t = tokenize(["Alice", " alice ", "Bob"], KEY)
    assert t.dtype.itemsize == 16
    assert bytes(t[0]) == bytes(t[1])
    assert bytes(t[0]) != bytes(t[2])
    other = tokenize(["Alice"], b"\x01" * 32)
    assert bytes(other[0]) != bytes(t[0])
    assert b"alice" not in tokens_to_bytes(t)


def test_duplicate_customer_names_its_row() -> None:
    t = tokenize(["a", "b", "A "], KEY)
    with pytest.raises(DataError, match="row 0"):
        LocalTable.build(t, np.zeros((3, 1), dtype=np.int64), ("x",))


@settings(max_examples=60, deadline=None)
@given(held=st.lists(st.integers(0, 300), unique=True, max_size=200),
       query=st.lists(st.integers(0, 400), unique=True, max_size=200))
def test_aligned_matches_a_dictionary_join(held: list[int], query: list[int]) -> None:
    values = np.array([[i * 3, -i] for i in held], dtype=np.int64).reshape(len(held), 2)
    table = LocalTable.build(tokenize([str(i) for i in held], KEY), values, ("a", "b"))
    x = table.aligned(tokenize([str(q) for q in query], KEY), ("b", "a")).view(np.int64)
    want = [[1, -q, q * 3] if q in held else [0, 0, 0] for q in query]
    assert x.tolist() == want


def test_aligned_names_a_missing_column() -> None:
    table = LocalTable.build(tokenize(["a"], KEY), np.zeros((1, 1), dtype=np.int64), ("x",))
    with pytest.raises(DataError, match="'y'"):
        table.aligned(tokenize(["a"], KEY), ("y",))
