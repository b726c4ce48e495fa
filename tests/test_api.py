"""The local API and `zerosum.Client` against an in-memory `RoundService`: no Kafka, and no
sleeping: every wait is on an event or an answer, bounded by a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import stat
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from agents.api import ApiServer, ApiSettings, Refused, RoundRequest, RoundScheduler
from agents.api.server import SocketPathError
from agents.api.service import roles
from protocol.messages import Scope
from protocol.policy import ConsortiumPolicy
from tests.api_fake import FakeRoundService, Holdings, attribute_specs
from zerosum import (
    Client,
    ConnectionLost,
    RequestRefused,
    Role,
    RoundAborted,
    RoundResult,
    SubscriptionLagged,
)
from zerosum.wire import ErrorCode, FrameReader, decode_frame, encode_frame

BANKS = ("bank-1", "bank-2", "bank-3")
CUSTOMERS = [f"CUST-{i:04d}" for i in range(400)]
WAIT_S = 20.0


def holdings(seed: int = 7) -> Holdings:
    rng = random.Random(seed)
    return {bank: {c: {"debt": Decimal(rng.randrange(0, 10**8)) / 100,
                       "loans": Decimal(rng.randrange(0, 20))}
                   for c in CUSTOMERS if rng.random() < 0.7}
            for bank in BANKS}


def policy(**floors: Any) -> ConsortiumPolicy:
    return ConsortiumPolicy(frozenset(BANKS), attribute_specs(), **{"max_query": 1000,
                                                                    **floors})


def expected(h: Holdings, ids: list[str], *, min_holders: int = 1) -> dict[str, tuple[int,
                                                                                       Decimal,
                                                                                       Decimal]]:
    """What a round over every bank with scope query must return, summed here in Decimal."""
    out = {}
    for c in ids:
        held = [h[b][c] for b in BANKS if c in h[b]]
        if len(held) >= min_holders:
            out[c] = (len(held), sum((x["debt"] for x in held), Decimal(0)),
                      sum((x["loans"] for x in held), Decimal(0)))
    return out


def check_exact(result: RoundResult, h: Holdings, ids: list[str], min_holders: int = 1) -> None:
    want = expected(h, ids, min_holders=min_holders)
    got = {cid: (r.holders, r.totals["debt"], r.totals["loans"])
           for cid, r in result.by_customer().items()}
    assert got == want
    assert result.withheld == len(ids) - len(want)
    assert all(isinstance(v, Decimal) for r in result.rows for v in r.totals.values())


@contextlib.asynccontextmanager
async def serving(service: FakeRoundService, tmp_path: Path,
                  scheduler: RoundScheduler | None = None,
                  **settings: Any) -> AsyncIterator[ApiServer]:
    if scheduler is None:
        scheduler = RoundScheduler(service, settings.pop("max_in_flight", 32))
    async with running(ApiServer(scheduler, ApiSettings(tmp_path / "api.sock",
                                                        **settings))) as server:
        yield server


class Runs(Protocol):
    """A server of the agent's: the API, or the app bus."""

    started: asyncio.Event

    async def run(self) -> None: ...

    def stop(self) -> None: ...


R = TypeVar("R", bound=Runs)


@contextlib.asynccontextmanager
async def running(server: R) -> AsyncIterator[R]:
    """`server.run()` in a task, from `started` (or its failure, raised here) to `stop()`."""
    task = asyncio.create_task(server.run())
    async with asyncio.timeout(WAIT_S):
        waiter = asyncio.create_task(server.started.wait())
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    try:
        yield server
    finally:
        server.stop()
        async with asyncio.timeout(WAIT_S):
            await task


class Raw:
    """A client that writes frames by hand and reads what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.frames = FrameReader(reader, 1 << 30)
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else encode_frame(data))
        await self.writer.drain()

    async def read(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            line = await self.frames.next()
        assert line is not None, "the server closed the connection"
        return decode_frame(line)


async def test_a_round_through_the_client(tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    ids = CUSTOMERS[:50]
    async with serving(service, tmp_path), Client(tmp_path / "api.sock") as c:
        result = await asyncio.wait_for(c.round(ids, scope="query"), WAIT_S)
        check_exact(result, h, ids)
        assert result.roles == {Role.REQUESTER, Role.LEADER}  # bank-1 leads: first of BANKS
        assert result.attributes == ("debt", "loans")
        assert len(result.rows[0].token) == 32
        # a floor raised by the request withholds rows below it
        result2 = await asyncio.wait_for(c.round(ids, scope="query", min_holders=3), WAIT_S)
        check_exact(result2, h, ids, min_holders=3)
        assert 0 < result2.withheld < len(ids)
        # only some attributes, and the intersection scope (rows the leader holds)
        result3 = await asyncio.wait_for(c.round(ids, attributes=["loans"]), WAIT_S)
        assert result3.attributes == ("loans",)
        assert {r.customer_id for r in result3.rows} == {i for i in ids if i in h["bank-1"]}
        status = await c.status()
        assert status["api"]["in_flight"] == 0
        assert status["agent"]["submitted"] == 3


async def test_a_thousand_rounds_at_once_run_with_a_bounded_number_in_flight(
        tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    rng = random.Random(3)
    queries = [rng.sample(CUSTOMERS, 20) for _ in range(1000)]
    async with serving(service, tmp_path, max_in_flight=8) as server, \
            Client(tmp_path / "api.sock") as c:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(c.round(q, scope="query") for q in queries))
        for q, r in zip(queries, results, strict=True):
            check_exact(r, h, q)
        assert len({r.round_id for r in results}) == 1000
        # queued, not refused; never more than the bound at once, and the bound was reached
        assert service.submitted == 1000
        assert service.peak == server.peak_in_flight == 8
        assert server.errors == {}


async def test_a_client_that_asks_too_fast_is_read_no_faster_than_it_is_answered(
        tmp_path: Path) -> None:
    h = holdings()
    gate = asyncio.Event()
    service = FakeRoundService(policy(), h, gate=gate)
    async with serving(service, tmp_path, max_in_flight=4, max_pending=10) as server, \
            Client(tmp_path / "api.sock") as c:
        service.probe = lambda: server.queued + server.in_flight
        asking = asyncio.gather(*(c.round([cid], scope="query") for cid in CUSTOMERS[:100]))
        async with asyncio.timeout(WAIT_S):
            for _ in range(4):
                await service.entered.get()
            gate.set()
            results = await asking
        assert [r.rows[0].customer_id for r in results if r.rows] == [
            cid for cid in CUSTOMERS[:100] if any(cid in h[b] for b in BANKS)]
        assert service.peak == 4
        # accepted and not yet answered: never more than max_pending, which was reached
        assert max(service.probed) == 10


async def test_two_clients_on_one_server(tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    async with serving(service, tmp_path) as server, \
            Client(tmp_path / "api.sock") as a, Client(tmp_path / "api.sock") as b:
        async with asyncio.timeout(WAIT_S):
            ra, rb = await asyncio.gather(a.round(CUSTOMERS[:30], scope="query"),
                                          b.round(CUSTOMERS[30:90], scope="query"))
            check_exact(ra, h, CUSTOMERS[:30])
            check_exact(rb, h, CUSTOMERS[30:90])
            assert (await a.status())["api"]["connections"] == 2
        assert server.status()["errors"] == {}


async def test_a_round_outlives_its_client_and_reaches_the_next_subscriber(
        tmp_path: Path) -> None:
    h = holdings()
    gate = asyncio.Event()
    service = FakeRoundService(policy(), h, gate=gate)
    ids = CUSTOMERS[:40]
    async with serving(service, tmp_path):
        async with Client(tmp_path / "api.sock") as gone:
            pending = asyncio.create_task(gone.round(ids, scope="query"))
            async with asyncio.timeout(WAIT_S):
                round_id = await service.entered.get()  # the round runs in the agent
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(pending, WAIT_S)
        gate.set()  # the round ends after its client has gone
        async with Client(tmp_path / "api.sock") as nxt:
            async with asyncio.timeout(WAIT_S):
                delivery = await anext(aiter(nxt.results()))
            assert delivery.round_id == round_id.hex()
            assert delivery.role is Role.REQUESTER
            assert delivery.aborted is None
            assert delivery.result is not None
            check_exact(delivery.result, h, ids)


async def test_every_round_reaches_the_subscribers_with_this_institutions_role(
        tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h, me="bank-2")
    async with serving(service, tmp_path), Client(tmp_path / "api.sock") as c:
        events = aiter(c.results())
        first = asyncio.create_task(_take(events, 1))
        async with asyncio.timeout(WAIT_S):
            await c.status()  # the subscription is in place once an answer after it came
            request = RoundRequest(tuple(CUSTOMERS[:10]), Scope.QUERY, ("debt",), 1, BANKS)
            service.contribute(b"\1" * 16, request, Role.CONTRIBUTOR)
            (contributed,) = await first
            service.contribute(b"\2" * 16, request, Role.LEADER)
            led = await anext(events)
            mine = await c.round(CUSTOMERS[:5], scope="query")
            asked = await anext(events)
        assert (contributed.round_id, contributed.role) == ("01" * 16, Role.CONTRIBUTOR)
        assert (led.round_id, led.role) == ("02" * 16, Role.LEADER)
        assert contributed.result is not None
        # another's round: rows by token only, the totals as exact as the requester's
        assert all(r.customer_id is None for r in contributed.result.rows)
        want = expected(h, CUSTOMERS[:10])
        assert sorted(r.totals["debt"] for r in contributed.result.rows) == sorted(
            w[1] for w in want.values())
        assert (asked.round_id, asked.role) == (mine.round_id, Role.REQUESTER)


async def test_deliveries_kept_for_a_subscriber_are_bounded_in_bytes(tmp_path: Path) -> None:
    from agents.api.codec import delivery_json

    h = holdings()
    service = FakeRoundService(policy(), h, me="bank-2")
    request = RoundRequest(tuple(CUSTOMERS[:10]), Scope.QUERY, ("debt",), 1, BANKS)
    size = len(delivery_json(service.contribute(b"\0" * 16, request, Role.CONTRIBUTOR)))
    async with serving(service, tmp_path, retained_bytes=int(size * 2.5)) as server:
        for k in range(1, 6):  # nobody subscribes: the server keeps the last two
            service.contribute(bytes([k]) * 16, request, Role.CONTRIBUTOR)
        async with asyncio.timeout(WAIT_S):
            await service.handled()
        assert server.status()["retained"] == 2
        assert server.status()["dropped"] == 3  # of the five that came in while serving
        async with Client(tmp_path / "api.sock") as c, asyncio.timeout(WAIT_S):
            events = aiter(c.results())
            got = [await anext(events), await anext(events)]
    assert [d.round_id for d in got] == ["04" * 16, "05" * 16]


async def test_bad_frames_get_typed_errors_and_the_connection_survives(tmp_path: Path) -> None:
    service = FakeRoundService(policy(), holdings())
    async with serving(service, tmp_path, max_frame_bytes=4096) as server:
        raw = await Raw.open(tmp_path / "api.sock")
        await raw.send(b"this is not json\n")
        err = await raw.read()
        assert (err["type"], err["code"], err["id"]) == ("error", "malformed_frame", None)
        await raw.send(b"[1, 2]\n")
        assert (await raw.read())["code"] == "malformed_frame"
        await raw.send(b'{"v": 2, "op": "status", "id": 5}\n')
        err = await raw.read()
        assert (err["code"], err["field"], err["id"]) == ("unknown_version", "v", 5)
        await raw.send(b'{"op": "status", "id": 6}\n')
        assert (await raw.read())["code"] == "unknown_version"
        await raw.send(b'{"v": 1, "op": "x' + b"y" * 10_000 + b'", "id": 7}\n')
        assert (await raw.read())["code"] == "frame_too_large"
        await raw.send({"op": "launch", "id": 8})
        err = await raw.read()
        assert (err["code"], err["field"], err["id"]) == ("unknown_op", "op", 8)
        await raw.send({"op": "round", "id": 9, "customer_ids": "CUST-1"})
        err = await raw.read()
        assert (err["code"], err["field"]) == ("invalid_field", "customer_ids")
        await raw.send(b'{"v": true, "op": "status", "id": "\\ud800"}\n')  # true is not 1
        err = await raw.read()
        assert (err["code"], err["id"]) == ("unknown_version", "\ud800")
        await raw.send(b'{"v": 1, "op": "round", "id": 11, "customer_ids": ["a\\ud800"]}\n')
        err = await raw.read()
        assert (err["code"], err["field"], err["id"]) == ("invalid_field", "customer_ids", 11)
        await raw.send({"op": "status", "id": 10})
        ok = await raw.read()  # the same connection, after nine bad frames
        assert (ok["type"], ok["id"]) == ("status", 10)
        assert ok["status"]["api"]["errors"]["malformed_frame"] == 2
        assert ok["status"]["api"]["errors"]["unknown_version"] == 3
        raw.writer.close()
        # half a frame and then the end: nothing breaks
        raw = await Raw.open(tmp_path / "api.sock")
        await raw.send(b'{"v": 1, "op": "sta')
        raw.writer.close()
        async with Client(tmp_path / "api.sock") as c:
            assert (await asyncio.wait_for(c.status(), WAIT_S))["api"]["connections"] == 1
        assert not server.started.is_set() or server.status()["in_flight"] == 0


@pytest.mark.parametrize(("call", "code", "field"), [
    ({"customer_ids": [f"C{i}" for i in range(1001)]}, "query_too_large", "customer_ids"),
    ({"min_holders": 1}, "below_floor", "min_holders"),
    ({"participants": ["bank-1", "bank-2"]}, "below_floor", "participants"),
    ({"participants": ["bank-1", "bank-9"]}, "unknown_participant", "participants"),
    ({"attributes": ["salary"]}, "unknown_attribute", "attributes"),
    ({"scope": "everything"}, "invalid_field", "scope"),
    ({"deadline_s": -1}, "invalid_field", "deadline_s"),
    ({"customer_ids": []}, "invalid_field", "customer_ids"),
])
async def test_refused_rounds_are_typed_errors(tmp_path: Path, call: dict[str, Any], code: str,
                                               field: str) -> None:
    h = holdings()
    service = FakeRoundService(policy(min_holders=2), h)
    async with serving(service, tmp_path), Client(tmp_path / "api.sock") as c:
        kwargs = {"customer_ids": CUSTOMERS[:5], **call}
        with pytest.raises(RequestRefused) as caught:
            await asyncio.wait_for(c.round(**kwargs), WAIT_S)
        assert (caught.value.code, caught.value.field) == (code, field)
        assert service.submitted == 0  # refused before it reached the agent
        # the client and the server carry on
        ok = await asyncio.wait_for(c.round(CUSTOMERS[:5], scope="query"), WAIT_S)
        check_exact(ok, h, CUSTOMERS[:5], min_holders=2)


async def test_an_abort_is_a_typed_exception(tmp_path: Path) -> None:
    from protocol.errors import AbortReason
    from protocol.machine import Ended

    class Aborting(FakeRoundService):
        async def submit(self, round_id: bytes, request: RoundRequest) -> Any:
            d = await super().submit(round_id, request)
            return type(d)(round_id, d.roles, Ended(round_id, AbortReason.TIMEOUT,
                                                    "bank-3 did not answer", ("bank-3",)))

    async with serving(Aborting(policy(), holdings()), tmp_path), \
            Client(tmp_path / "api.sock") as c:
        with pytest.raises(RoundAborted) as caught:
            await asyncio.wait_for(c.round(CUSTOMERS[:3]), WAIT_S)
        assert (caught.value.reason, caught.value.culprits) == ("TIMEOUT", ("bank-3",))
        assert caught.value.detail == "bank-3 did not answer"


async def test_an_agent_that_fails_or_refuses_a_round_harms_nothing(tmp_path: Path) -> None:
    class Failing(FakeRoundService):
        async def submit(self, round_id: bytes, request: RoundRequest) -> Any:
            if request.customer_ids[0] == "BOOM":
                raise RuntimeError("the agent's bug")
            if request.customer_ids[0] == "NOPE":
                raise Refused(ErrorCode.BELOW_FLOOR, "the differencing guard says no",
                              "participants")
            return await super().submit(round_id, request)

    h = holdings()
    async with serving(Failing(policy(), h), tmp_path) as server, \
            Client(tmp_path / "api.sock") as c:
        with pytest.raises(RequestRefused) as caught:
            await asyncio.wait_for(c.round(["BOOM"]), WAIT_S)
        assert caught.value.code == "service_failed"
        assert "the agent's bug" in caught.value.detail
        with pytest.raises(RequestRefused) as caught:
            await asyncio.wait_for(c.round(["NOPE"]), WAIT_S)
        assert (caught.value.code, caught.value.field) == ("below_floor", "participants")
        check_exact(await asyncio.wait_for(c.round(CUSTOMERS[:3], scope="query"), WAIT_S), h,
                    CUSTOMERS[:3])
        assert server.errors == {"service_failed": 1, "below_floor": 1}


async def test_a_slow_subscriber_stalls_nobody(tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    rounds = 120
    # a burst of results is at most max_in_flight long: a queue of 8 bursts keeps up with a
    # subscriber that reads, and not with one that does not (the socket holds a few hundred
    # kB, some ten deliveries of 400 rows)
    async with serving(service, tmp_path, max_in_flight=4, subscriber_queue=32) as server:
        slow = await Raw.open(tmp_path / "api.sock")  # subscribes, then reads nothing
        await slow.send({"op": "subscribe", "id": "s"})
        assert (await slow.read())["type"] == "subscribed"
        async with Client(tmp_path / "api.sock") as fast, \
                Client(tmp_path / "api.sock") as asker:
            events = aiter(fast.results())
            await fast.status()
            async with asyncio.timeout(60):
                got = asyncio.create_task(_take(events, rounds))
                results = await asyncio.gather(*(asker.round(CUSTOMERS, scope="query")
                                                 for _ in range(rounds)))
                deliveries = await got
        assert {d.round_id for d in deliveries} == {r.round_id for r in results}
        check_exact(results[-1], h, CUSTOMERS)
        assert server.lagged == 1
        # the slow one, reading at last, finds its subscription ended with a typed event
        async with asyncio.timeout(WAIT_S):
            kinds: list[dict[str, Any]] = []
            while not kinds or kinds[-1]["type"] == "delivery":
                kinds.append(await slow.read())
        assert kinds[-1]["type"] == "lagged"
        assert (kinds[-1]["id"], kinds[-1]["dropped"] >= 1) == ("s", True)
        assert len(kinds) - 1 < rounds


async def _take(events: AsyncIterator[Any], n: int) -> list[Any]:
    return [await anext(events) for _ in range(n)]


async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


async def test_a_client_too_slow_for_its_subscription_gets_lagged(tmp_path: Path) -> None:
    service = FakeRoundService(policy(), holdings())
    async with serving(service, tmp_path, subscriber_queue=2) as server, \
            Client(tmp_path / "api.sock", queue=1) as c:
        events = aiter(c.results())
        first = asyncio.create_task(_take(events, 1))
        request = RoundRequest(tuple(CUSTOMERS), Scope.QUERY, ("debt", "loans"), 1, BANKS)
        await c.status()  # the subscription is in place once an answer after it came
        service.contribute(bytes(16), request, Role.CONTRIBUTOR)
        await asyncio.wait_for(first, WAIT_S)
        for i in range(1, 200):  # far more than the socket and both queues hold
            service.contribute(i.to_bytes(16, "big"), request, Role.CONTRIBUTOR)
        await asyncio.wait_for(service.handled(), WAIT_S)  # fanned out while nobody read
        assert server.lagged == 1
        with pytest.raises(SubscriptionLagged):
            await asyncio.wait_for(_drain(events), WAIT_S)
        assert server.lagged == 1


async def test_leaving_the_results_loop_ends_the_subscription(tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    async with serving(service, tmp_path) as server, \
            Client(tmp_path / "api.sock", queue=1) as c:
        events = c.results()
        first = asyncio.create_task(_take(events, 1))
        async with asyncio.timeout(WAIT_S):
            await c.status()
            mine = await c.round(CUSTOMERS[:4], scope="query")
            assert (await first)[0].round_id == mine.round_id
            await events.aclose()  # what leaving `async for` does, once finalised
            # answered after the unsubscribe frame, which went first on the same connection
            assert (await c.status())["api"]["subscribers"] == 0
            request = RoundRequest(tuple(CUSTOMERS), Scope.QUERY, ("debt",), 1, BANKS)
            for i in range(50):  # would fill the client's queue of 1 and stall its reader
                service.contribute(i.to_bytes(16, "big"), request, Role.CONTRIBUTOR)
            later = await c.round(CUSTOMERS[:7], scope="query")
            check_exact(later, h, CUSTOMERS[:7])
            assert server.lagged == 0
            # one may subscribe again, and gets first what ended while nobody subscribed
            again = c.results()
            took = asyncio.create_task(_take(again, 52))
            await c.status()
            service.contribute(b"\xff" * 16, request, Role.LEADER)
            got = [d.round_id for d in await took]
        assert got == [i.to_bytes(16, "big").hex() for i in range(50)] + [later.round_id,
                                                                          "ff" * 16]


async def test_the_socket_is_private_and_not_taken_twice(tmp_path: Path) -> None:
    service = FakeRoundService(policy(), holdings())
    path = tmp_path / "api.sock"
    path.parent.mkdir(exist_ok=True)
    async with serving(service, tmp_path) as server:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        second = ApiServer(RoundScheduler(service), ApiSettings(path))
        with pytest.raises(SocketPathError, match="another agent"):
            await asyncio.wait_for(second.run(), WAIT_S)
        assert server.status()["connections"] == 0
    assert not path.exists()  # removed on stop
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # an agent that died
    stale.bind(str(path))
    stale.close()
    async with serving(service, tmp_path), Client(path) as c:
        assert (await asyncio.wait_for(c.status(), WAIT_S))["api"]["connections"] == 1
    path.write_text("not a socket")
    with pytest.raises(SocketPathError, match="not a socket"):
        await asyncio.wait_for(ApiServer(RoundScheduler(service), ApiSettings(path)).run(), WAIT_S)
    too_long = ApiServer(RoundScheduler(service), ApiSettings(tmp_path / ("x" * 120)))
    with pytest.raises(SocketPathError, match=r"\[api\] socket"):
        await asyncio.wait_for(too_long.run(), WAIT_S)


async def test_tcp_needs_the_token(tmp_path: Path) -> None:
    h = holdings()
    service = FakeRoundService(policy(), h)
    token = "t" * 32
    async with serving(service, tmp_path, tcp_port=0, token=token) as server:
        assert server.tcp_address is not None
        _, port = server.tcp_address
        async with Client(port=port, token=token) as c:
            check_exact(await asyncio.wait_for(c.round(CUSTOMERS[:9], scope="query"), WAIT_S),
                        h, CUSTOMERS[:9])
        with pytest.raises(RequestRefused) as caught:
            async with Client(port=port, token="t" * 31 + "u"):
                pass
        assert (caught.value.code, caught.value.field) == ("unauthorized", "token")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame({"op": "status", "id": 1}))
        line = await asyncio.wait_for(reader.readline(), WAIT_S)
        assert json.loads(line)["code"] == "unauthorized"
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # and closed
        writer.close()



def test_roles_of_an_institution_in_a_round() -> None:
    assert roles("bank-1", "bank-1", "bank-1") == {Role.REQUESTER, Role.LEADER}
    assert roles("bank-1", "bank-1", "bank-2") == {Role.REQUESTER}
    assert roles("bank-2", "bank-1", "bank-2") == {Role.LEADER}
    assert roles("bank-3", "bank-1", "bank-2") == {Role.CONTRIBUTOR}
    assert roles("bank-3", "bank-1", None) == {Role.CONTRIBUTOR}
