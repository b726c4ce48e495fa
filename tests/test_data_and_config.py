"""Bad data files and configuration: clear errors naming file, row, column or field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents.cli import main
from agents.config import ConfigError, load_consortium, load_party
from agents.data import DataFileError, Snapshot, load_table
from agents.init import DEFAULT_ATTRIBUTES, init_consortium

ATTRS = {a.name: a for a in DEFAULT_ATTRIBUTES}
KEY = bytes(32)


def _csv(tmp: Path, text: str) -> Path:
    p = tmp / "d.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "where"), [
    ("id,balance\n", "row 1: no 'customer_id'"),
    ("customer_id,salary\n", "row 1: column 'salary'"),
    ("customer_id,balance\na,12.345\n", "row 2, column balance: .*more than 2 decimal"),
    ("customer_id,balance\na,1\nb,x\n", "row 3, column balance: not a decimal"),
    ("customer_id,balance\na,1\nA ,2\n", "row 3, column customer_id: the same customer as row 2"),
    ("customer_id,balance\na,1,2\n", "row 2: 3 fields"),
    ("customer_id,overdue_days\na,-1\n", "row 2, column overdue_days: .*outside"),
    ("", "empty file"),
])
def test_bad_files_are_named_precisely(tmp_path: Path, text: str, where: str) -> None:
    p = _csv(tmp_path, text)
    with pytest.raises(DataFileError, match=f"{p}: {where}"):
        load_table(p, ATTRS, KEY)


def test_snapshot_keeps_the_last_good_table(tmp_path: Path) -> None:
    p = _csv(tmp_path, "customer_id,balance\na,1.00\nb,2.50\n")
    snap = Snapshot(p, ATTRS, KEY)
    first = snap.refresh()
    assert len(first) == 2
    p.write_text("customer_id,balance\na,oops\n")
    os.utime(p, ns=(1, 1))
    assert snap.refresh() is first
    p.write_text("customer_id,balance\na,1.00\nb,2.50\nc,3\n")
    assert len(snap.refresh()) == 3


def test_init_writes_a_consortium_that_loads(tmp_path: Path) -> None:
    init_consortium(tmp_path / "c", institutions=3, customers=20, bootstrap="127.0.0.1:1")
    cfg = load_party(tmp_path / "c" / "bank-2.toml")
    assert cfg.consortium.institutions == ("bank-1", "bank-2", "bank-3")
    assert cfg.topic == f"zerosum.{cfg.consortium.id}.bank-2"
    for key in (tmp_path / "c" / "keys").rglob("*"):
        assert key.stat().st_mode & 0o077 == 0, key
    # each party's secrets in a directory of its own: no consortium key beside the
    # coordinator's key
    assert sorted(p.name for p in (tmp_path / "c" / "keys" / "coordinator").iterdir()) == [
        "coordinator.key"]
    assert sorted(p.name for p in (tmp_path / "c" / "keys" / "bank-1").iterdir()) == [
        "bank-1.key", "consortium.key"]
    with pytest.raises(FileExistsError):
        init_consortium(tmp_path / "c", institutions=3, customers=20, bootstrap="x")


def test_a_readable_key_file_is_refused(tmp_path: Path) -> None:
    init_consortium(tmp_path, institutions=2, customers=5, bootstrap="127.0.0.1:1")
    (tmp_path / "keys" / "bank-1" / "bank-1.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable only by its owner"):
        load_party(tmp_path / "bank-1.toml")


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    init_consortium(tmp_path, institutions=2, customers=5, bootstrap="127.0.0.1:1")
    c = tmp_path / "consortium.toml"
    c.write_text(c.read_text().replace('scale = 2', 'scale = "two"'))
    with pytest.raises(ConfigError, match=r"consortium.toml \[\[attributes\]\] #1: field 'scale'"):
        load_consortium(c)
    with pytest.raises(ConfigError, match="no such file"):
        load_party(tmp_path / "missing.toml")


@pytest.mark.parametrize(("rows", "ok"), [(1, False), (1023, False), (1024, True)])
def test_chunk_rows_has_a_floor(tmp_path: Path, rows: int, ok: bool) -> None:
    """Chunks of a handful of rows would tell the timing of single rows: at least 1,024."""
    init_consortium(tmp_path, institutions=2, customers=5, bootstrap="127.0.0.1:1")
    c = tmp_path / "consortium.toml"
    c.write_text(c.read_text().replace("[policy]", f"[policy]\nchunk_rows = {rows}", 1))
    if ok:
        assert load_consortium(c).policy.chunk_rows == rows
    else:
        with pytest.raises(ConfigError, match="'chunk_rows' must be at least 1024"):
            load_consortium(c)


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["institution", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err
    init_consortium(tmp_path / "c", institutions=2, customers=5, bootstrap="127.0.0.1:1")
    assert main(["coordinator", "--config", str(tmp_path / "c" / "bank-1.toml")]) == 2
    assert "use `zerosum institution`" in capsys.readouterr().err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["--help"], ["broker", "start", "--help"], ["init", "--help"],
                ["coordinator", "--help"], ["institution", "--help"], ["round", "--help"],
                ["demo", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(cmd)
        assert info.value.code == 0
        assert "usage: zerosum" in capsys.readouterr().out


def test_parquet_data_loads_like_csv_and_errors_name_the_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from protocol.tokens import tokenize

    good = tmp_path / "d.parquet"
    pq.write_table(pa.table({"customer_id": ["a", "b"], "balance": ["1.50", "-2"],
                             "overdue_days": [3, 0]}), good)
    table = load_table(good, ATTRS, KEY)
    x = table.aligned(tokenize(["b", "a", "c"], KEY), ("balance", "overdue_days"))
    assert x.view("int64").tolist() == [[1, -200, 0], [1, 150, 3], [0, 0, 0]]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"customer_id": ["a", "b"], "balance": [1.5, 1.234]}), bad)
    with pytest.raises(DataFileError, match=r"bad.parquet: row 2, column balance"):
        load_table(bad, ATTRS, KEY)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        load_table(junk, ATTRS, KEY)


def test_parquet_integer_columns_are_whole_units_checked_in_bulk(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from protocol.tokens import tokenize

    p = tmp_path / "i.parquet"
    pq.write_table(pa.table({"customer_id": ["a", "b", "c"], "balance": [5, -7, 0]}), p)
    table = load_table(p, ATTRS, KEY)
    got = table.aligned(tokenize(["a", "b", "c"], KEY), ("balance",)).view("int64")
    assert got[:, 1].tolist() == [500, -700, 0]  # scale 2: whole units times 100
    pq.write_table(pa.table({"customer_id": ["a", "b"], "overdue_days": [3, 10**9]}), p)
    with pytest.raises(DataFileError, match=r"row 2, column overdue_days: .*outside"):
        load_table(p, ATTRS, KEY)
    pq.write_table(pa.table({"customer_id": ["a", "b", " A"], "balance": [1, 2, 3]}), p)
    with pytest.raises(DataFileError, match=r"row \d, column customer_id: the same customer"):
        load_table(p, ATTRS, KEY)


def test_init_from_the_cli_gives_each_consortium_its_own_topics(tmp_path: Path) -> None:
    ids = set()
    for name in ("a", "b"):
        assert main(["init", str(tmp_path / name), "--institutions", "2",
                     "--customers", "3"]) == 0
        ids.add(load_consortium(tmp_path / name / "consortium.toml").id)
    assert len(ids) == 2
    assert main(["init", str(tmp_path / "c"), "--institutions", "2", "--customers", "3",
                 "--consortium", "bank-club"]) == 0
    assert load_consortium(tmp_path / "c" / "consortium.toml").id == "bank-club"
