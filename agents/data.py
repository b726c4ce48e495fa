"""An institution's data file: CSV or Parquet with `customer_id` and one column per attribute.

Loaded into a `LocalTable` of tokens (identifiers are hashed at load and never kept) and int64
values at each attribute's scale. A bad file raises `DataFileError` naming file, row and column;
`Snapshot` keeps the last good table when a reload fails.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.errors import DataError, ValueRangeError
from protocol.fixedpoint import AttributeSpec, out_of_bounds
from protocol.tokens import LocalTable, Tokens, normalise_id, tokenize

ID_COLUMN = "customer_id"
log = logging.getLogger("zerosum.data")


class DataFileError(Exception):
    """A data or query file that cannot be used; the message names file, row and column."""


def load_table(path: Path, attributes: dict[str, AttributeSpec], key: bytes) -> LocalTable:
    """Read a CSV or Parquet file (by its suffix) into a table.

    Row numbers in errors: in a CSV the header is row 1; in Parquet the first record is row 1.
    """
    if path.suffix.lower() in (".parquet", ".pq"):
        return _load_parquet(path, attributes, key)
    try:
        fh = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open: {exc.strerror}") from exc
    with fh:
        reader = csv.reader(fh)
        first: list[str] | None = next(reader, None)
        if first is None:
            raise DataFileError(f"{path}: empty file (expected a header row)")
        return _build(path, [h.strip() for h in first], reader, attributes, key)


def _load_parquet(path: Path, attributes: dict[str, AttributeSpec], key: bytes) -> LocalTable:
    """Parquet: integer columns are taken whole (values in whole units, scaled here, bounds
    checked in numpy); text, decimal and float columns are parsed exactly, value by value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file: {exc}") from exc
    attrs = _columns(path, [str(n) for n in table.column_names], attributes, "header")
    ids = table.column(ID_COLUMN).to_pylist()
    empty = next((i for i, x in enumerate(ids) if x is None or not str(x).strip()), None)
    if empty is not None:
        raise DataFileError(f"{path}: row {empty + 1}, column {ID_COLUMN}: empty")
    values = np.empty((len(ids), len(attrs)), dtype=np.int64)
    for j, name in enumerate(attrs):
        spec, col = attributes[name], table.column(name)
        if col.null_count:
            row = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            raise DataFileError(f"{path}: row {row + 1}, column {name}: empty")
        if pa.types.is_integer(col.type):
            raw = col.to_numpy()
            unit = 10**spec.scale
            # an unsigned value past int64 must not wrap into a small negative one
            huge = (raw > 2**62 // unit) if raw.dtype.kind == "u" else np.zeros(
                raw.shape, dtype=np.bool_)
            whole = np.where(huge, 0, raw).astype(np.int64)
            # values too large to scale are out of bounds too; scaling them could wrap
            too_large = huge | (whole > 2**62 // unit) | (whole < -(2**62) // unit)
            scaled = np.where(too_large, 0, whole) * unit
            bad = np.flatnonzero(too_large | out_of_bounds(spec, scaled))
            if bad.size:
                r = int(bad[0])
                raise DataFileError(f"{path}: row {r + 1}, column {name}: {raw[r]} is outside "
                                    f"[{spec.format(spec.min)}, {spec.format(spec.max)}]")
            values[:, j] = scaled
            continue
        for i, v in enumerate(col.to_pylist()):
            try:
                values[i, j] = spec.parse(str(v))
            except ValueRangeError as exc:
                raise DataFileError(f"{path}: row {i + 1}, column {name}: {exc}") from exc
    try:
        return LocalTable.build(tokenize([str(x) for x in ids], key), values, tuple(attrs))
    except DataError as exc:  # "row N" of the table is row N + 1 of the file
        m = re.match(r"row (\d+): (.*)", str(exc))
        if m:
            raise DataFileError(f"{path}: row {int(m.group(1)) + 1}, column {ID_COLUMN}: "
                                f"{m.group(2)}") from exc
        raise DataFileError(f"{path}: {exc}") from exc


def _columns(path: Path, header: list[str], attributes: dict[str, AttributeSpec],
             where: str) -> list[str]:
    """The attribute columns of a header that has `customer_id` and only known attributes."""
    if ID_COLUMN not in header:
        raise DataFileError(f"{path}: {where}: no {ID_COLUMN!r} column")
    names = [h for h in header if h != ID_COLUMN]
    unknown = [h for h in names if h not in attributes]
    if unknown:
        raise DataFileError(f"{path}: {where}: column {unknown[0]!r} is not an attribute of "
                            f"the consortium ({', '.join(attributes)})")
    return names


def _first_time(path: Path, seen: dict[str, int], cid: str, row_no: int) -> None:
    """Record that customer `cid` (normalised) stands in row `row_no` of the file;
    DataFileError if an earlier row, kept in `seen`, holds the same customer."""
    norm = normalise_id(cid)
    if norm in seen:
        raise DataFileError(f"{path}: row {row_no}, column {ID_COLUMN}: the same "
                            f"customer as row {seen[norm]}")
    seen[norm] = row_no


def _build(path: Path, header: list[str], rows: Iterable[list[str]],
           attributes: dict[str, AttributeSpec], key: bytes) -> LocalTable:
    """A CSV's rows (the header is row 1) validated into a table."""
    names = _columns(path, header, attributes, "row 1")
    id_at = header.index(ID_COLUMN)
    cols = [(header.index(n), attributes[n]) for n in names]
    ids: list[str] = []
    values: list[list[int]] = []
    seen: dict[str, int] = {}
    for row_no, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataFileError(f"{path}: row {row_no}: {len(row)} fields, the header has "
                                f"{len(header)}")
        cid = row[id_at]
        if not normalise_id(cid):
            raise DataFileError(f"{path}: row {row_no}, column {ID_COLUMN}: empty")
        _first_time(path, seen, cid, row_no)
        vals = []
        for at, spec in cols:
            try:
                vals.append(spec.parse(row[at]))
            except ValueRangeError as exc:
                raise DataFileError(f"{path}: row {row_no}, column {spec.name}: "
                                    f"{exc}") from exc
        ids.append(cid)
        values.append(vals)
    arr = np.array(values, dtype=np.int64).reshape(len(values), len(names))
    return LocalTable.build(tokenize(ids, key), arr, tuple(names))


def load_query(path: Path, key: bytes) -> tuple[list[str], Tokens]:
    """A query file: a CSV whose `customer_id` column lists the customers to total."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or ID_COLUMN not in reader.fieldnames:
                raise DataFileError(f"{path}: row 1: no {ID_COLUMN!r} column")
            ids = []
            seen: dict[str, int] = {}
            for row_no, row in enumerate(reader, start=2):
                cid = (row.get(ID_COLUMN) or "").strip()
                if not cid:
                    continue
                _first_time(path, seen, cid, row_no)
                ids.append(cid)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open: {exc.strerror}") from exc
    return ids, tokenize(ids, key)


@dataclass
class Snapshot:
    """The data file as last loaded successfully; reloads when the file changes.

    `table` has its tokens under the token key of `epoch`; `earlier` holds the same data under
    the token keys of past epochs still held (`earlier_keys`), for rounds asked under them."""

    path: Path
    attributes: dict[str, AttributeSpec]
    key: bytes = field(repr=False)
    table: LocalTable | None = None
    stamp: tuple[int, int] | None = None
    loads: int = 0  # files loaded, and files refused, since start (for the metrics)
    errors: int = 0
    epoch: int = 0
    earlier_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    earlier: dict[int, LocalTable] = field(default_factory=dict, repr=False)

    def refresh(self) -> LocalTable:
        """Reload if the file changed; on a bad file keep (and return) the last good table."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            if self.table is None:
                raise DataFileError(f"{self.path}: cannot read: {exc.strerror}") from exc
            log.error("data file %s is unreadable (%s); keeping the last good snapshot",
                      self.path, exc.strerror)
            self.errors += 1
            return self.table
        if stamp == self.stamp and self.table is not None:
            return self.table
        try:
            table, earlier = self._load(self.key, self.earlier_keys)
        except DataFileError as exc:
            if self.table is None:
                raise
            log.error("%s; keeping the last good snapshot (%d customers)", exc, len(self.table))
            self.stamp = stamp
            self.errors += 1
            return self.table
        self.table, self.earlier, self.stamp = table, earlier, stamp
        self.loads += 1
        log.info("loaded %d customers from %s", len(table), self.path)
        return table

    def _load(self, key: bytes, earlier_keys: dict[int, bytes]
              ) -> tuple[LocalTable, dict[int, LocalTable]]:
        return (load_table(self.path, self.attributes, key),
                {e: load_table(self.path, self.attributes, k) for e, k in earlier_keys.items()})

    def rekey(self, epoch: int, key: bytes, earlier_keys: dict[int, bytes]) -> None:
        """The token keys rotated: load the data under them now. DataFileError (and nothing
        changed) when the file cannot be loaded: a table is never labelled with an epoch its
        tokens are not under."""
        table, earlier = self._load(key, earlier_keys)
        self.key, self.epoch, self.earlier_keys = key, epoch, dict(earlier_keys)
        self.table, self.earlier = table, earlier
        self.loads += 1
        log.info("token key epoch %d: loaded %d customers from %s", epoch, len(table),
                 self.path)
