"""`zerosum init` writes its TOML with a TOML writer: a bootstrap, a directory or a credential
with quotes, backslashes or a newline comes back unchanged through tomllib."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agents.config import load_consortium, load_party
from agents.init import init_consortium
from agents.security import read_credentials, write_credentials

HOSTILE = 'broker"1\\:9092,\n[policy]\nallow_subsets = true # \'x\' \\u0041'


def _every_toml(directory: Path) -> list[Path]:
    return [*directory.glob("*.toml"), *directory.glob("keys/**/*.key"),
            *directory.glob("keys/*.kafka")]


@pytest.mark.parametrize("insecure", [False, True])
def test_a_bootstrap_and_a_directory_with_quotes_and_backslashes_round_trip(
        tmp_path: Path, insecure: bool) -> None:
    d = tmp_path / 'a "quoted" \\ dir'
    configs = init_consortium(d, institutions=2, customers=5, bootstrap=HOSTILE,
                              insecure=insecure)
    files = _every_toml(d)
    assert len(files) >= 7
    for f in files:
        with open(f, "rb") as fh:
            tomllib.load(fh)  # every file parses
    c = load_consortium(d / "consortium.toml")
    assert c.bootstrap == HOSTILE
    assert c.policy.allow_subsets is False  # the bootstrap did not smuggle in a setting
    assert [a.name for a in c.attributes.values()] == ["balance", "overdue_days"]
    for cfg_path in configs:
        cfg = load_party(cfg_path)
        assert cfg.bootstrap == HOSTILE
        assert cfg.state_dir == d.resolve() / "state" / cfg.party
    bank = load_party(d / "bank-1.toml")
    assert bank.consortium_key is not None


def test_a_credential_with_quotes_and_backslashes_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "x.kafka"
    write_credentials(path, 'user"\\name', 'pass"word\\\n"""')
    assert read_credentials(path) == ('user"\\name', 'pass"word\\\n"""')


def test_a_consortium_id_that_no_agent_would_load_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="consortium id"):
        init_consortium(tmp_path / "c", institutions=2, customers=5, bootstrap="h:1",
                        consortium='demo"\n[x]')
    assert not (tmp_path / "c" / "consortium.toml").exists()
