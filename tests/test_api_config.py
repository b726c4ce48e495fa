"""The local API's fields: [api] of a party's TOML and the policy's max_in_flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.config import ConfigError, load_party
from agents.init import init_consortium


def _party_with(tmp_path: Path, api: str, policy_line: str = "") -> Path:
    init_consortium(tmp_path / "c", institutions=2, customers=5, bootstrap="127.0.0.1:1")
    party = tmp_path / "c" / "bank-1.toml"
    party.write_text(party.read_text() + api)
    if policy_line:
        cons = tmp_path / "c" / "consortium.toml"
        cons.write_text(cons.read_text().replace("[policy]\n", f"[policy]\n{policy_line}\n"))
    return party


def test_the_api_fields_of_a_party_file(tmp_path: Path) -> None:
    cfg = load_party(_party_with(tmp_path, "", "max_in_flight = 5"))
    assert cfg.api_socket == cfg.state_dir / "api.sock"
    assert (cfg.api.tcp_port, cfg.api.token) == (None, None)
    assert cfg.consortium.policy.max_in_flight == 5
    token = tmp_path / "token"
    token.write_text("s" * 40 + "\n")
    token.chmod(0o600)
    cfg = load_party(_party_with(tmp_path / "b", f'[api]\nsocket = "/tmp/zs-b1.sock"\n'
                                 f'tcp_port = 0\ntoken_file = "{token}"\n'))
    assert (cfg.api_socket, cfg.api.tcp_port, cfg.api.token) == (Path("/tmp/zs-b1.sock"), 0,
                                                                 "s" * 40)
    assert "s" * 40 not in repr(cfg.api)


@pytest.mark.parametrize(("api", "message"), [
    ("[api]\nsockets = 'x'\n", r"\[api\]: unknown field 'sockets'"),
    ("[api]\nsocket = 5\n", r"\[api\]: field 'socket' must be str"),
    (f"[api]\nsocket = '/tmp/{'x' * 120}'\n", r"\[api\]: field 'socket' .* longer than"),
    ("[api]\ntcp_port = 8080\n", r"\[api\]: field 'tcp_port' needs field 'token_file'"),
    ("[api]\ntcp_port = 70000\ntoken_file = 't'\n", r"field 'tcp_port' must be 0..65535"),
    ("[api]\ntoken_file = 'nowhere'\n", r"nowhere: no such file"),
])
def test_bad_api_fields_are_named(tmp_path: Path, api: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_party(_party_with(tmp_path, api))


def test_max_in_flight_has_a_floor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[policy\]: field 'max_in_flight' must be at least"):
        load_party(_party_with(tmp_path, "", "max_in_flight = 0"))
