"""Fixed-point attributes: exact decimals with a declared scale and bounds, as int64 in Z_2^64.

An attribute value v with scale s is the integer round-free v * 10^s; a file value with more
than s decimals is an error, never rounded. Per institution a value lies in [min, max]; a row
held by h of n institutions totals within [h*min, h*max], and `n * max(|min|, |max|) < 2^63` is
required, so an honest total never wraps. A total outside that range is reported, never
returned wrapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, Inexact, InvalidOperation, localcontext

import numpy as np
from numpy.typing import NDArray

from protocol.errors import TotalOutOfRange, ValueRangeError

HOLDERS = "holders"
MAX_SCALE = 18
MAX_DECIMAL_CHARS = 64
INT64_MAX = (1 << 63) - 1
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute column: its name, decimal scale, and per-institution bounds in scaled units."""

    name: str
    scale: int
    min: int
    max: int

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == HOLDERS:
            raise ValueError(f"attribute name {self.name!r}: lower-case letters, digits and _, "
                             f"starting with a letter, not {HOLDERS!r}")
        if not 0 <= self.scale <= MAX_SCALE:
            raise ValueError(f"attribute {self.name}: scale must be 0..{MAX_SCALE}")
        if not -INT64_MAX <= self.min <= self.max <= INT64_MAX:
            raise ValueError(f"attribute {self.name}: need -(2^63-1) <= min <= max <= 2^63-1")

    def max_participants(self) -> int:
        """The largest n for which n honest values within bounds add up without wrapping."""
        bound = max(abs(self.min), abs(self.max), 1)
        return INT64_MAX // bound

    def parse(self, text: str) -> int:
        """A decimal string as scaled integer units, checked against the bounds."""
        return check_bounds(self, parse_decimal(text, self.scale))

    def format(self, units: int) -> str:
        return format_decimal(units, self.scale)


def parse_decimal(text: str, scale: int) -> int:
    """'12.34' at scale 2 -> 1234. Exact: more decimals than `scale` is an error."""
    if len(text) > MAX_DECIMAL_CHARS:
        raise ValueRangeError(f"a number of {len(text)} characters is too long")
    try:
        d = Decimal(text.strip())
    except InvalidOperation as exc:
        raise ValueRangeError(f"not a decimal number: {text!r}") from exc
    if not d.is_finite():
        raise ValueRangeError(f"not a finite number: {text!r}")
    if d and d.adjusted() > 40:  # far beyond any int64 bound: refuse before scaling
        raise ValueRangeError(f"{text!r} is out of range")
    # exact: the default context (28 digits) would round a longer number silently
    with localcontext() as ctx:
        ctx.prec = MAX_DECIMAL_CHARS + MAX_SCALE + 2
        ctx.traps[Inexact] = True
        try:
            scaled = d.scaleb(scale)
        except Inexact as exc:
            raise ValueRangeError(f"{text!r} cannot be represented exactly") from exc
    if scaled != scaled.to_integral_value():
        raise ValueRangeError(f"{text!r} has more than {scale} decimal places")
    return int(scaled)


def format_decimal(units: int, scale: int) -> str:
    """1234 at scale 2 -> '12.34'; -5 at scale 2 -> '-0.05'."""
    if scale == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    q, r = divmod(abs(units), 10**scale)
    return f"{sign}{q}.{r:0{scale}d}"


def check_bounds(spec: AttributeSpec, units: int) -> int:
    if not spec.min <= units <= spec.max:
        raise ValueRangeError(f"{spec.name}: {spec.format(units)} is outside "
                              f"[{spec.format(spec.min)}, {spec.format(spec.max)}]")
    return units


def out_of_bounds(spec: AttributeSpec, column: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Which values of a column (scaled units) lie outside the spec's bounds."""
    return (column < spec.min) | (column > spec.max)


def check_column_bounds(spec: AttributeSpec, column: NDArray[np.int64]) -> None:
    """Every value of a column within the spec's bounds; names the first offending row."""
    bad = np.flatnonzero(out_of_bounds(spec, column))
    if bad.size:
        row = int(bad[0])
        raise ValueRangeError(f"{spec.name}: row {row}: {spec.format(int(column[row]))} is "
                              f"outside [{spec.format(spec.min)}, {spec.format(spec.max)}]")


def encode_columns(values: NDArray[np.int64]) -> NDArray[np.uint64]:
    """int64 two's complement -> Z_2^64 (a reinterpretation, no arithmetic)."""
    return np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)


def decode_totals(totals: NDArray[np.uint64], specs: tuple[AttributeSpec, ...],
                  n: int) -> NDArray[np.int64]:
    """Published totals (holders first, then `specs`) back to signed integers, checked per row.

    A row with h holders (0 <= h <= n) must total within [h*min, h*max] for every attribute:
    non-holders contribute 0, so bounds that exclude 0 are no problem. Raises TotalOutOfRange
    otherwise: such a number can only come from a wrapped or tampered sum, or a member that
    sent values outside the bounds.
    """
    if totals.ndim != 2 or totals.shape[1] != 1 + len(specs):
        raise TotalOutOfRange(f"totals have shape {totals.shape}, expected (*, {1 + len(specs)})")
    signed = totals.view(np.int64)
    holders = totals[:, 0]
    if holders.size and int(holders.max()) > n:
        raise TotalOutOfRange(f"{HOLDERS}: a count exceeds the {n} participants")
    h = holders.astype(np.int64)
    for j, spec in enumerate(specs, start=1):
        if n > spec.max_participants():
            raise TotalOutOfRange(f"{spec.name}: {n} participants could overflow its bounds")
        col = signed[:, j]
        # h <= n and n * max(|min|, |max|) < 2^63: these products never wrap
        bad = np.flatnonzero((col < h * spec.min) | (col > h * spec.max))
        if bad.size:
            r = int(bad[0])
            raise TotalOutOfRange(
                f"{spec.name}: row {r} with {int(h[r])} holders totals outside "
                f"[{spec.format(int(h[r]) * spec.min)}, {spec.format(int(h[r]) * spec.max)}]")
    return np.array(signed, dtype=np.int64, copy=True)
