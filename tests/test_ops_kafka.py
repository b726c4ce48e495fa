"""What an operator sees of a running agent on the real broker: Prometheus metrics scraped over
HTTP, `zerosum status` on a live and a stopped agent, and logs that hold no customer id,
value or secret."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import logging
import tomllib
from pathlib import Path

import pytest

from agents.cli import main
from agents.config import PartyConfig
from agents.run import JsonFormatter, agents_in_process, party_configs
from agents.security import KafkaAccess
from tests.kafka_util import make_consortium
from tests.test_agents_kafka import query_ids
from tests.test_api_kafka import exact
from tests.test_metrics import scrape
from zerosum import Client

pytestmark = pytest.mark.kafka
WAIT_S = 120.0


def with_metrics(d: Path) -> list[PartyConfig]:
    return [dataclasses.replace(c, metrics_port=0) for c in party_configs(d)]


async def test_metrics_move_with_a_round_scraped_over_http(kafka_bootstrap: KafkaAccess,
                                                           tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=100)
    ids = query_ids(d, 30)
    async with agents_in_process(with_metrics(d), api=True) as agents:
        ports = {n: a.metrics.port for n, a in agents.items()}
        assert all(ports.values()), ports
        before = {n: await asyncio.to_thread(scrape, p) for n, p in ports.items() if p}
        async with Client(agents["bank-1"].cfg.api_socket) as c, asyncio.timeout(WAIT_S):
            exact(await c.round(ids), d, ids)
        after = {n: await asyncio.to_thread(scrape, p) for n, p in ports.items() if p}
    bank, coord = after["bank-1"], after["coordinator"]
    assert bank["zerosum_rounds_total{outcome=result,reason=}"] == 1
    assert coord["zerosum_rounds_total{outcome=published,reason=}"] == 1
    assert bank["zerosum_round_duration_seconds_count{outcome=result}"] == 1
    for name in ("bank-1", "bank-2", "coordinator"):
        for counter in ("zerosum_messages_received_total{}", "zerosum_messages_sent_total{}",
                        "zerosum_received_bytes_total{}", "zerosum_sent_bytes_total{}"):
            assert after[name][counter] > before[name].get(counter, 0), (name, counter)
        assert after[name]["zerosum_rounds_in_flight{}"] == 0
        assert after[name]["zerosum_outbox_pending_messages{}"] == 0
    assert bank["zerosum_data_snapshot_rows{}"] > 0
    assert bank["zerosum_agent_info{party=bank-1,role=institution,version=0.1.0}"] == 1
    stages = {k for k in coord if k.startswith("zerosum_stage_duration_seconds_count")}
    assert any("mask_assignment" in k for k in stages), stages
    # no label names a round or a customer
    assert not any(i in k for k in bank for i in ids)


async def test_status_of_a_live_and_a_stopped_agent(kafka_bootstrap: KafkaAccess,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 2, customers=50)
    config = str(d / "bank-1.toml")
    async with agents_in_process(party_configs(d), api=True):
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["status", "--config", config]) == 0
        live = json.loads(capsys.readouterr().out)
    assert live["running"] is True
    agent = live["agent"]
    assert agent["ready"] is True
    assert agent["kafka_available"] is True
    assert agent["inbox_lag"] in (None, 0)
    assert agent["data"]["rows"] > 0
    assert agent["data"]["load_errors"] == 0
    assert agent["version"] == "0.1.0"
    assert live["api"]["max_in_flight"] == 32
    assert await asyncio.to_thread(main, ["status", "--config", config]) == 3
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["running"] is False
    assert stopped["socket"].endswith("api.sock")
    assert stopped["error"]


async def test_no_customer_id_value_or_secret_in_any_log_line(kafka_bootstrap: KafkaAccess,
                                                              tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=100)
    secrets: set[str] = set()
    for f in (d / "data").glob("*.csv"):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                secrets.add(row["customer_id"])
                secrets.update(v for k, v in row.items()  # amounts like 12345.67
                               if k != "customer_id" and "." in v and len(v) >= 7)
    for f in (d / "keys").rglob("*"):  # private keys, the consortium key, passwords
        if f.is_file() and f.suffix != ".pem":
            with open(f, "rb") as key_file:
                secrets.update(str(v) for k, v in tomllib.load(key_file).items()
                               if k != "username" and isinstance(v, str) and len(v) >= 16)
    assert len(secrets) > 300
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    keep = Keep(logging.DEBUG)
    keep.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    try:
        ids = query_ids(d, 40)
        async with agents_in_process(party_configs(d), api=True) as agents, \
                Client(agents["bank-1"].cfg.api_socket) as c, asyncio.timeout(WAIT_S):
            exact(await c.round(ids), d, ids)
    finally:
        root.removeHandler(keep)
        root.setLevel(old_level)
    assert len(lines) > 20
    leaks = sorted({s for s in secrets for line in lines if s in line})
    assert leaks == [], leaks[:5]
