"""The local API of real institution agents on the real broker: `zerosum.Client` in front,
the rounds' cryptography and Kafka behind. Every wait is on an answer, bounded."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tomllib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agents.agent import Agent
from agents.config import load_party
from agents.demo import plaintext
from agents.security import KafkaAccess
from protocol.tokens import normalise_id
from tests.kafka_util import make_consortium
from tests.test_agents_kafka import query_ids, running
from zerosum import Client, Delivery, Role, RoundResult
from zerosum.wire import FrameReader, decode_frame, encode_frame

pytestmark = pytest.mark.kafka
WAIT_S = 120.0


def set_policy(d: Path, **fields: int) -> None:
    """Set `fields` in the [policy] table of the consortium in `d` (before agents start)."""
    path = d / "consortium.toml"
    text = path.read_text()
    assert "\n[policy]\n" in text
    for key, value in fields.items():
        line = f"{key} = {value}"
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", line, text)
        if n == 0:
            text = text.replace("\n[policy]\n", f"\n[policy]\n{line}\n", 1)
    path.write_text(text)
    with open(path, "rb") as fh:
        assert all(tomllib.load(fh)["policy"][k] == v for k, v in fields.items())


def exact(result: RoundResult, d: Path, ids: list[str]) -> int:
    """Every row equals the plaintext sum of the consortium's data; returns the row count."""
    want = plaintext(d / "data")
    asked = {normalise_id(i) for i in ids}
    for row in result.rows:
        assert row.customer_id is not None
        exp = want[normalise_id(row.customer_id)]
        got = [Decimal(row.holders), row.totals["balance"], row.totals["overdue_days"]]
        assert got == exp, row.customer_id
        assert normalise_id(row.customer_id) in asked
    assert result.withheld == 0  # intersection scope, min_holders 1: the leader holds each
    return len(result.rows)


def socket(agents: dict[str, Agent], bank: str) -> Path:
    return agents[bank].cfg.api_socket


async def results_of(client: Client, n: int, into: list[Delivery]) -> None:
    """The first `n` deliveries of `client`'s subscription (a delivery that comes before
    the subscription is kept by the agent for its first subscriber)."""
    async for d in client.results():
        into.append(d)
        if len(into) == n:
            return


async def test_a_round_through_the_client_on_real_agents(kafka_bootstrap: KafkaAccess,
                                                         tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=200)
    ids = query_ids(d, 80)
    async with running(d, api=True) as agents, Client(socket(agents, "bank-1")) as client:
        async with asyncio.timeout(WAIT_S):
            result = await client.round(ids)
            assert exact(result, d, ids) > 0
            assert Role.REQUESTER in result.roles
            status = await client.status()
    assert status["agent"]["party"] == "bank-1"
    assert status["api"]["peak_in_flight"] == 1


async def test_a_thousand_rounds_at_once_with_a_bounded_number_in_flight(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=60)
    set_policy(d, max_in_flight=8)
    ids = query_ids(d, 3)
    async with running(d, api=True) as agents, Client(socket(agents, "bank-1")) as client:
        async with asyncio.timeout(600):
            results = await asyncio.gather(*(client.round(ids) for _ in range(1000)))
            status = await client.status()
    assert len({r.round_id for r in results}) == 1000
    for r in results:
        exact(r, d, ids)
    assert status["api"]["max_in_flight"] == 8
    assert status["api"]["peak_in_flight"] == 8  # the bound was reached, never passed


async def test_two_clients_on_one_agent(kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=100)
    ids = query_ids(d, 40)
    async with running(d, api=True) as agents:
        path = socket(agents, "bank-2")
        async with Client(path) as one, Client(path) as two, asyncio.timeout(WAIT_S):
            a, b = await asyncio.gather(one.round(ids[:20]), two.round(ids[20:]))
    assert a.round_id != b.round_id
    exact(a, d, ids[:20])
    exact(b, d, ids[20:])


async def test_every_participant_gets_the_round_with_its_role(kafka_bootstrap: KafkaAccess,
                                                               tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=100)
    ids = query_ids(d, 30)
    banks = ("bank-1", "bank-2", "bank-3")
    async with running(d, api=True) as agents:
        clients = [Client(socket(agents, b)) for b in banks]
        for c in clients:
            await c.connect()
        try:
            got: dict[str, list[Delivery]] = {b: [] for b in banks}
            readers = [asyncio.create_task(results_of(c, 1, got[b]))
                       for b, c in zip(banks, clients, strict=True)]
            async with asyncio.timeout(WAIT_S):
                result = await clients[0].round(ids)
                await asyncio.gather(*readers)
        finally:
            for c in clients:
                await c.close()
    leaders = [b for b in banks if Role.LEADER in got[b][0].roles]
    assert len(leaders) == 1
    for b in banks:
        [delivery] = got[b]
        assert delivery.round_id == result.round_id
        assert (Role.REQUESTER in delivery.roles) == (b == "bank-1")
        if b not in ("bank-1", leaders[0]):
            assert delivery.roles == {Role.CONTRIBUTOR}
        assert delivery.result is not None
        rows = {r.token: (r.holders, dict(r.totals)) for r in delivery.result.rows}
        assert rows == {r.token: (r.holders, dict(r.totals)) for r in result.rows}
        # only the requester knows which customers it asked about
        assert all((r.customer_id is not None) == (b == "bank-1")
                   for r in delivery.result.rows)


async def test_a_client_that_leaves_mid_round_the_round_reaches_the_next_subscriber(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=100)
    ids = query_ids(d, 30)
    async with running(d, api=True) as agents:
        path = socket(agents, "bank-1")
        coordinator = agents["coordinator"]
        seen = coordinator.stats.received
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(encode_frame({"op": "round", "id": 1, "customer_ids": ids}))
        await writer.drain()
        frames = FrameReader(reader, 1 << 20)
        async with asyncio.timeout(WAIT_S):
            line = await frames.next()
        assert line is not None
        accepted = decode_frame(line)
        assert accepted["type"] == "accepted"
        # the request has reached the coordinator: the round runs; its client leaves
        await coordinator.wait_until(lambda: coordinator.stats.received > seen, WAIT_S)
        writer.close()
        async with Client(path) as late, asyncio.timeout(WAIT_S):
            delivery = await anext(late.results())
    assert delivery.round_id == accepted["round_id"]
    assert delivery.result is not None
    assert Role.REQUESTER in delivery.roles
    exact(delivery.result, d, ids)


@pytest.mark.parametrize(("frame", "code", "field"), [
    (b"{not json\n", "malformed_frame", None),
    ({"v": 2, "op": "round", "customer_ids": ["x"]}, "unknown_version", "v"),
    ({"op": "round", "customer_ids": [f"C{i}" for i in range(1001)]}, "query_too_large",
     "customer_ids"),
    ({"op": "round", "customer_ids": ["x"], "min_holders": 1, "participants": ["bank-1",
                                                                              "bank-2"]},
     "below_floor", "participants"),
    ({"op": "round", "customer_ids": ["x"], "min_holders": 0}, "below_floor", "min_holders"),
    ({"op": "round", "customer_ids": ["CUST-1", " cust-1 "]}, "invalid_field", "customer_ids"),
    ({"op": "launch"}, "unknown_op", "op"),
    ({"op": "round", "customer_ids": ["x"], "min_holders": 4}, "invalid_field", "min_holders"),
    ({"op": "round", "customer_ids": ["x"], "participants": ["bank-1", "bank-2", "bank-3",
                                                             "bank-1"]},
     "invalid_field", "participants"),
    ({"op": "round", "customer_ids": ["x"], "deadline_s": 1e308}, "invalid_field",
     "deadline_s"),
])
async def test_bad_requests_are_typed_errors_and_the_agent_is_unharmed(
        agents_with_api: dict[str, Any], frame: bytes | dict[str, Any], code: str,
        field: str | None) -> None:
    agents, d = agents_with_api["agents"], agents_with_api["dir"]
    reader, writer = await asyncio.open_unix_connection(str(socket(agents, "bank-1")))
    try:
        if isinstance(frame, dict):
            frame = encode_frame({"id": 7, **frame}) if "v" not in frame else (
                json.dumps({"id": 7, **frame}).encode() + b"\n")
        writer.write(frame)
        await writer.drain()
        frames = FrameReader(reader, 1 << 20)
        async with asyncio.timeout(WAIT_S):
            while (answer := decode_frame(await frames.next() or b"{}"))["type"] == "accepted":
                pass  # refused once the agent tokenised it: the round's answer is the error
        assert (answer["type"], answer["code"], answer["field"]) == ("error", code, field)
        assert answer["detail"]
    finally:
        writer.close()
    ids = query_ids(d, 10)  # the agent still serves
    async with Client(socket(agents, "bank-1")) as client, asyncio.timeout(WAIT_S):
        exact(await client.round(ids), d, ids)


@pytest.fixture(scope="module")
async def agents_with_api(kafka_bootstrap: KafkaAccess,
                          tmp_path_factory: pytest.TempPathFactory
                          ) -> AsyncIterator[dict[str, Any]]:
    """One consortium with max_query 1000 and min_holders 1, its agents serving their API,
    shared by the bad-request cases."""
    d = make_consortium(tmp_path_factory.mktemp("bad"), kafka_bootstrap, 3, customers=60)
    set_policy(d, max_query=1000)
    async with running(d, api=True) as agents:
        yield {"agents": agents, "dir": d}


async def test_the_round_command_needs_a_running_agent(kafka_bootstrap: KafkaAccess,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from agents.cli import main

    d = make_consortium(tmp_path, kafka_bootstrap, 2, customers=20)
    q = tmp_path / "q.csv"
    q.write_text("customer_id\nCUST-1\n")
    assert await asyncio.to_thread(main, ["round", "--config", str(d / "bank-1.toml"),
                                          "--query", str(q)]) == 1
    err = capsys.readouterr().err
    cfg = load_party(d / "bank-1.toml")
    assert str(cfg.api_socket) in err
    assert re.search(r"is `zerosum institution --config .*bank-1.toml` running\?", err), err
    assert not os.path.exists(cfg.state_dir / "requests")  # no spool any more


async def test_rounds_through_the_application_bus_of_a_real_agent(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    """bank-2's [app] points at topics of its 'own' cluster (here the test broker, as its
    admin): requests produced there come back as exact deliveries on its results topic."""
    from agents.security import write_credentials
    from tests.kafka_util import new_topic, produce, take_records

    d = make_consortium(tmp_path, kafka_bootstrap, 3, customers=100)
    requests, results = await new_topic(kafka_bootstrap), await new_topic(kafka_bootstrap)
    assert kafka_bootstrap.username is not None
    assert kafka_bootstrap.password is not None
    write_credentials(d / "keys" / "app.kafka", kafka_bootstrap.username, kafka_bootstrap.password)
    with open(d / "bank-2.toml", "a") as fh:
        fh.write(f'\n[app]\nbootstrap = "{kafka_bootstrap.bootstrap}"\n'
                 f'requests_topic = "{requests}"\nresults_topic = "{results}"\n'
                 f'security = "SASL_SSL"\ncredentials = "keys/app.kafka"\n'
                 f'ca = "{kafka_bootstrap.cafile}"\n')
    queries = [query_ids(d, 60)[k::3] for k in range(3)]
    from aiokafka import AIOKafkaConsumer

    async with running(d) as agents:  # no API socket: the bus is the institution's door
        assert agents["bank-2"].cfg.app is not None
        await produce(kafka_bootstrap, requests, [encode_frame({"op": "round", "id": k,
                                                                "customer_ids": q})
                                                   for k, q in enumerate(queries)])
        consumer = AIOKafkaConsumer(results, **kafka_bootstrap.aiokafka_kwargs(),
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            records = [json.loads(r.value) for r in await take_records(consumer, 6)]
        finally:
            await consumer.stop()
    delivered = {r["request_id"]: r["delivery"] for r in records if r["type"] == "delivery"}
    assert sorted(delivered) == [0, 1, 2]
    want = plaintext(d / "data")
    for k, q in enumerate(queries):
        body = delivered[k]
        assert body["status"] == "published"
        assert "requester" in body["roles"]
        assert body["table"]
        for cid, _, holders, *totals in body["table"]:
            assert cid in q
            assert [Decimal(holders), *map(Decimal, totals)] == want[normalise_id(cid)]
