"""The application bus on a real Kafka (the suite's secured broker stands in for the
institution's own cluster), in front of the in-memory `RoundService` of `tests.api_fake`.
Every wait is on a record, an event or an answer, bounded by a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.api import RoundRequest, RoundScheduler
from agents.api.appbus import AppBridge
from agents.api.service import Delivery, Refused
from agents.config import AppConfig
from agents.security import KafkaAccess
from protocol.messages import Scope
from tests.api_fake import FakeRoundService
from tests.kafka_util import new_topic, produce, take_records
from tests.test_api import (
    BANKS,
    CUSTOMERS,
    check_exact,
    holdings,
    policy,
    running,
    serving,
)
from zerosum import Client, Role
from zerosum.results import parse_delivery
from zerosum.wire import ErrorCode

WAIT_S = 30.0
ID_KEY = bytes(range(32))


async def app_config(kafka: KafkaAccess, **bounds: Any) -> AppConfig:
    return AppConfig(kafka, await new_topic(kafka), await new_topic(kafka),
                     f"app-{uuid.uuid4().hex[:8]}", **bounds)


@contextlib.asynccontextmanager
async def bridging(scheduler: RoundScheduler, config: AppConfig) -> AsyncIterator[AppBridge]:
    async with running(AppBridge(scheduler, config, id_key=ID_KEY)) as bridge:
        yield bridge


@contextlib.asynccontextmanager
async def results(config: AppConfig) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(config.results_topic, **config.kafka.aiokafka_kwargs(),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def read(consumer: AIOKafkaConsumer, n: int) -> list[tuple[str | None, dict[str, Any]]]:
    """n records of the results topic: (key, value as JSON)."""
    return [(None if r.key is None else r.key.decode(), json.loads(r.value))
            for r in await take_records(consumer, n)]


def round_frame(ids: list[str], **fields: Any) -> bytes:
    return json.dumps({"v": 1, "op": "round", "customer_ids": ids, "scope": "query",
                       **fields}).encode()


async def committed(config: AppConfig) -> int | None:
    consumer = AIOKafkaConsumer(**config.kafka.aiokafka_kwargs(), group_id=config.group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(config.requests_topic, 0))
        return offset
    finally:
        await consumer.stop()


async def test_requests_on_the_internal_topic_come_back_exact(
        kafka_bootstrap: KafkaAccess) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    config = await app_config(kafka_bootstrap)
    rng = random.Random(5)
    queries = [rng.sample(CUSTOMERS, 25) for _ in range(20)]
    keys: list[bytes | None] = [f"req-{i}".encode() for i in range(19)] + [None]
    values = [round_frame(q) for q in queries[:19]] + [round_frame(queries[19], id=77)]
    async with bridging(RoundScheduler(service, 4), config) as bridge, \
            results(config) as out:
        await produce(kafka_bootstrap, config.requests_topic, values, keys)
        records = await read(out, 40)
    accepted = {v["request_id"]: (k, v) for k, v in records if v["type"] == "accepted"}
    delivered = {v["request_id"]: (k, v) for k, v in records if v["type"] == "delivery"}
    names: list[Any] = [f"req-{i}" for i in range(19)] + [77]  # the key, or else the id
    assert set(accepted) == set(delivered) == set(names)
    for name, q in zip(names, queries, strict=True):
        key, record = delivered[name]
        got = parse_delivery(record["delivery"])
        assert got.result is not None
        check_exact(got.result, h, q)
        assert got.roles == {Role.REQUESTER, Role.LEADER}
        assert key == got.round_id == accepted[name][1]["round_id"] == accepted[name][0]
        assert record["v"] == 1
    assert service.submitted == 20
    # each round was asked for once: its copy on deliveries() is not produced again
    assert bridge.status()["delivered"] == 20
    assert bridge.errors == {}
    assert await committed(config) == 20  # every request started: none is read again


class Ledger(FakeRoundService):
    """Refuses a round id it has run before, as the agent's ledger and the coordinator do."""

    seen: set[bytes]

    async def submit(self, round_id: bytes, request: RoundRequest) -> Delivery:
        if round_id in self.seen:
            raise Refused(ErrorCode.SERVICE_FAILED, f"round {round_id.hex()} is a replay")
        self.seen.add(round_id)
        return await super().submit(round_id, request)


async def test_a_request_read_again_does_not_run_again(kafka_bootstrap: KafkaAccess) -> None:
    h = holdings()
    service = Ledger(policy(), h)
    service.seen = set()
    config = await app_config(kafka_bootstrap)
    await produce(kafka_bootstrap, config.requests_topic,
                  [round_frame(CUSTOMERS[:5]), round_frame(CUSTOMERS[5:9])], [b"a", b"b"])
    async with results(config) as out:
        async with bridging(RoundScheduler(service, 4), config):
            first = await read(out, 4)
        # as after a crash before the commit: the same records, read from the start again
        again = AppConfig(config.kafka, config.requests_topic, config.results_topic,
                          config.group + "-again")
        async with bridging(RoundScheduler(service, 4), again):
            second = await read(out, 4)
    assert service.submitted == 2
    ran = {v["request_id"]: v["round_id"] for _, v in first if v["type"] == "accepted"}
    refused = {v["request_id"]: v["round_id"] for _, v in second if v["type"] == "error"}
    assert ran == refused  # the same round ids, refused as replays
    assert {v["type"] for _, v in second} == {"accepted", "error"}


async def test_a_malformed_request_is_a_typed_error_and_harms_nothing(
        kafka_bootstrap: KafkaAccess) -> None:
    h = holdings()
    service = FakeRoundService(policy(min_holders=2), h)
    config = await app_config(kafka_bootstrap)
    bad: list[tuple[bytes, str, str | None]] = [
        (b"{not json", "malformed_frame", None),
        (b"[1, 2]", "malformed_frame", None),
        (b'{"v": 2, "customer_ids": ["x"]}', "unknown_version", "v"),
        (b'{"v": 1, "op": "status"}', "unknown_op", "op"),
        (round_frame([]), "invalid_field", "customer_ids"),
        (round_frame(["x"], min_holders=1), "below_floor", "min_holders"),
        (round_frame(["x"], attributes=["salary"]), "unknown_attribute", "attributes"),
        (round_frame(["x"], participants=["bank-9"]), "unknown_participant", "participants"),
        (round_frame(["x"] * 1001), "query_too_large", "customer_ids"),
    ]
    values = [v for v, _, _ in bad] + [round_frame(CUSTOMERS[:30])]
    keys = [f"bad-{i}".encode() for i in range(len(bad))] + [b"good"]
    async with bridging(RoundScheduler(service, 4), config) as bridge, \
            results(config) as out:
        await produce(kafka_bootstrap, config.requests_topic, values, keys)
        records = await read(out, len(bad) + 2)
    errors = {k: v for k, v in records if v["type"] == "error"}
    assert [(errors[f"bad-{i}"]["code"], errors[f"bad-{i}"]["field"])
            for i in range(len(bad))] == [(code, field) for _, code, field in bad]
    assert all(errors[f"bad-{i}"]["request"] == {"topic": config.requests_topic,
                                                 "partition": 0, "offset": i}
               for i in range(len(bad)))
    [good] = [v for _, v in records if v["type"] == "delivery"]
    got = parse_delivery(good["delivery"])
    assert got.result is not None
    assert good["request_id"] == "good"
    check_exact(got.result, h, CUSTOMERS[:30], min_holders=2)
    assert service.submitted == 1  # refused before the agent saw them
    assert sum(bridge.errors.values()) == len(bad)
    assert await committed(config) == len(values)


async def test_two_hundred_requests_and_the_api_share_one_bound(
        kafka_bootstrap: KafkaAccess, tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    scheduler = RoundScheduler(service, 8)
    config = await app_config(kafka_bootstrap)
    rng = random.Random(11)
    queries = [rng.sample(CUSTOMERS, 10) for _ in range(200)]
    await produce(kafka_bootstrap, config.requests_topic, [round_frame(q) for q in queries],
                  [str(i).encode() for i in range(200)])
    api_queries = [rng.sample(CUSTOMERS, 10) for _ in range(50)]
    async with serving(service, tmp_path, scheduler) as server, \
            Client(tmp_path / "api.sock") as c, results(config) as out:
        async with bridging(scheduler, config):
            by_api = asyncio.gather(*(c.round(q, scope="query") for q in api_queries))
            # each bus request accepted and delivered; each API round delivered too
            records = await read(out, 450)
            async with asyncio.timeout(WAIT_S):
                by_client = await by_api
        for q, r in zip(api_queries, by_client, strict=True):
            check_exact(r, h, q)
        delivered = {int(v["request_id"]): parse_delivery(v["delivery"])
                     for _, v in records if v["type"] == "delivery" and v["request_id"]}
        assert sorted(delivered) == list(range(200))
        for i, q in enumerate(queries):
            result = delivered[i].result
            assert result is not None
            check_exact(result, h, q)
        others = {k for k, v in records if v["type"] == "delivery" and not v["request_id"]}
        assert others == {r.round_id for r in by_client}
        # both doors' rounds, never more than the bound at once, and the bound was reached
        assert service.submitted == 250
        assert service.peak == scheduler.peak_in_flight == server.peak_in_flight == 8


async def test_rounds_not_requested_here_are_delivered_with_their_role(
        kafka_bootstrap: KafkaAccess) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    config = await app_config(kafka_bootstrap)
    request = RoundRequest(tuple(CUSTOMERS[:40]), Scope.QUERY, ("debt",), 1, BANKS)
    async with bridging(RoundScheduler(service, 4), config) as bridge, \
            results(config) as out:
        led = service.contribute(b"\x01" * 16, request, Role.LEADER)
        helped = service.contribute(b"\x02" * 16, request, Role.CONTRIBUTOR)
        await produce(kafka_bootstrap, config.requests_topic, [round_frame(CUSTOMERS[:3])],
                      [b"mine"])
        records = await read(out, 4)
    others = {k: v for k, v in records if v["type"] == "delivery" and v["request_id"] is None}
    assert set(others) == {led.round_id.hex(), helped.round_id.hex()}
    for d, role in ((led, Role.LEADER), (helped, Role.CONTRIBUTOR)):
        got = parse_delivery(others[d.round_id.hex()]["delivery"])
        assert got.role is role
        assert got.roles == frozenset({role})
        assert got.result is not None
        # rows by token only: the ids are the requester's
        assert all(r.customer_id is None for r in got.result.rows)
        assert len(got.result.rows) == len(
            [c for c in CUSTOMERS[:40] if any(c in h[b] for b in BANKS)])
    mine = [v for _, v in records if v["request_id"] == "mine"]
    assert [v["type"] for v in mine] == ["accepted", "delivery"]
    assert bridge.status()["dropped"] == 0


async def test_a_slow_results_topic_drops_deliveries_and_never_stalls_the_agent() -> None:
    service = FakeRoundService(policy(), holdings())
    config = AppConfig(KafkaAccess("127.0.0.1:1"), "requests", "results", "g", results_queue=2)
    request = RoundRequest(tuple(CUSTOMERS), Scope.QUERY, ("debt", "loans"), 1, BANKS)
    bridge = AppBridge(RoundScheduler(service, 4), config, id_key=ID_KEY)
    # the bridge reads the agent's deliveries, and nothing takes them to the topic
    pump = asyncio.create_task(bridge._pump(service.deliveries()))
    try:
        for i in range(50):  # the agent publishes without waiting for anybody
            service.contribute(i.to_bytes(16, "big"), request, Role.CONTRIBUTOR)
        await asyncio.wait_for(service.handled(), WAIT_S)
        assert (bridge.dropped, bridge.status()["results_queued"]) == (48, 2)
    finally:
        pump.cancel()
