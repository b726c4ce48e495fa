"""An institution's data file: CSV with `customer_id` and one column per attribute.

Loaded into a `LocalTable` of tokens (identifiers are hashed at load and never kept) and int64
values at each attribute's scale. A bad file raises `DataFileError` naming file, row and column;
`Snapshot` keeps the last good table when a reload fails.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.errors import ValueRangeError
from protocol.fixedpoint import AttributeSpec
from protocol.tokens import LocalTable, Tokens, normalise_id, tokenize

ID_COLUMN = "customer_id"
log = logging.getLogger("zerosum.data")


class DataFileError(Exception):
    """A data or query file that cannot be used; the message names file, row and column."""


def load_table(path: Path, attributes: dict[str, AttributeSpec], key: bytes) -> LocalTable:
    """Read a CSV into a table. Row numbers in errors count the header as row 1."""
    try:
        fh = open(path, newline="", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open: {exc.strerror}") from exc
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataFileError(f"{path}: empty file (expected a header row)")
        header = [h.strip() for h in header]
        if ID_COLUMN not in header:
            raise DataFileError(f"{path}: row 1: no {ID_COLUMN!r} column")
        names = [h for h in header if h != ID_COLUMN]
        unknown = [h for h in names if h not in attributes]
        if unknown:
            raise DataFileError(f"{path}: row 1: column {unknown[0]!r} is not an attribute of "
                                f"the consortium ({', '.join(attributes)})")
        id_at = header.index(ID_COLUMN)
        cols = [(header.index(n), attributes[n]) for n in names]
        ids: list[str] = []
        values: list[list[int]] = []
        first_row: dict[str, int] = {}
        for row_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataFileError(f"{path}: row {row_no}: {len(row)} fields, the header has "
                                    f"{len(header)}")
            cid = row[id_at]
            norm = normalise_id(cid)
            if not norm:
                raise DataFileError(f"{path}: row {row_no}, column {ID_COLUMN}: empty")
            if norm in first_row:
                raise DataFileError(f"{path}: row {row_no}, column {ID_COLUMN}: the same "
                                    f"customer as row {first_row[norm]}")
            first_row[norm] = row_no
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
                norm = normalise_id(cid)
                if norm in seen:
                    raise DataFileError(f"{path}: row {row_no}, column {ID_COLUMN}: the same "
                                        f"customer as row {seen[norm]}")
                seen[norm] = row_no
                ids.append(cid)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot open: {exc.strerror}") from exc
    return ids, tokenize(ids, key)


@dataclass
class Snapshot:
    """The data file as last loaded successfully; reloads when the file changes."""

    path: Path
    attributes: dict[str, AttributeSpec]
    key: bytes
    table: LocalTable | None = None
    stamp: tuple[int, int] | None = None

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
            return self.table
        if stamp == self.stamp and self.table is not None:
            return self.table
        try:
            table = load_table(self.path, self.attributes, self.key)
        except DataFileError as exc:
            if self.table is None:
                raise
            log.error("%s; keeping the last good snapshot (%d customers)", exc, len(self.table))
            self.stamp = stamp
            return self.table
        self.table, self.stamp = table, stamp
        log.info("loaded %d customers from %s", len(table), self.path)
        return table
