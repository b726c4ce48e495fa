"""The local API's fields: [api] of a party's TOML and the policy's max_in_flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.config import ConfigError, load_party
from agents.init import init_consortium
from agents.security import write_credentials


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


def test_the_app_bus_fields_of_a_party_file(tmp_path: Path) -> None:
    cfg = load_party(_party_with(tmp_path, ""))
    assert cfg.app is None  # no [app]: no application bus
    cred = tmp_path / "app.kafka"
    write_credentials(cred, "bank-1-app", "p" * 40)
    cfg = load_party(_party_with(tmp_path / "b", '[app]\nbootstrap = "10.0.0.1:9093"\n'
                                 'requests_topic = "zs-requests"\nresults_topic = "zs-results"\n'
                                 f'security = "SASL_SSL"\ncredentials = "{cred}"\n'
                                 'ca = "ca.pem"\nmax_pending = 9\n'))
    assert cfg.app is not None
    assert (cfg.app.requests_topic, cfg.app.results_topic, cfg.app.group,
            cfg.app.max_pending, cfg.app.results_queue) == ("zs-requests", "zs-results",
                                                            "zerosum-app.bank-1", 9, 1024)
    assert (cfg.app.kafka.bootstrap, cfg.app.kafka.username, cfg.app.kafka.password,
            cfg.app.kafka.cafile) == ("10.0.0.1:9093", "bank-1-app", "p" * 40,
                                      (tmp_path / "b" / "c" / "ca.pem").resolve())
    assert "p" * 40 not in repr(cfg)
    # the consortium's broker is another matter: the app bus never changes cfg.kafka
    assert cfg.kafka.bootstrap == "127.0.0.1:1"
    cfg = load_party(_party_with(tmp_path / "c", '[app]\nbootstrap = "h:1"\ngroup = "g"\n'
                                 'requests_topic = "a"\nresults_topic = "b"\n'))
    assert cfg.app is not None
    assert (cfg.app.group, cfg.app.kafka.secure) == ("g", False)


_APP = '[app]\nbootstrap = "h:1"\nrequests_topic = "a"\nresults_topic = "b"\n'


@pytest.mark.parametrize(("app", "message"), [
    ("[app]\nrequests_topic = 'a'\nresults_topic = 'b'\n",
     r"\[app\]: missing field 'bootstrap'"),
    ("[app]\nbootstrap = 'h:1'\nresults_topic = 'b'\n",
     r"\[app\]: missing field 'requests_topic'"),
    (_APP + "topic = 'x'\n", r"\[app\]: unknown field 'topic'"),
    (_APP.replace('"b"', '"a"'), r"field 'results_topic' must differ"),
    (_APP.replace('"h:1"', "5"), r"\[app\]: field 'bootstrap' must be str"),
    (_APP.replace('"a"', '" "'), r"\[app\]: field 'requests_topic' is empty"),
    (_APP + "max_pending = 0\n", r"field 'max_pending' must be at least 1"),
    (_APP + "security = 'SASL'\n", r"field 'security' must be one of"),
    (_APP + "security = 'SASL_SSL'\n", r"field 'credentials' is missing"),
    (_APP + "security = 'SSL'\ncertificate = 'c.pem'\n", r"field 'key' is missing"),
    (_APP + "credentials = 'x.kafka'\n", r"field 'credentials' needs security"),
    (_APP + "security = 'SASL_SSL'\ncredentials = 'nowhere.kafka'\n",
     r"\[app\]: .*nowhere.kafka: no such file"),
])
def test_bad_app_bus_fields_are_named(tmp_path: Path, app: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_party(_party_with(tmp_path, app))
