"""`Client`: an asyncio client of an institution agent's local API.

    async with Client("/var/lib/zerosum/bank-1/api.sock") as c:
        result = await c.round(["CUST-1", "CUST-2"], scope="query")
        for row in result.rows:
            print(row.customer_id, row.holders, row.totals["debt"])

Any number of `round()` calls may run at once on one client; the agent runs a bounded number
of them at a time and queues the rest. Nothing here polls: one task reads the connection and
wakes whoever waits for each answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncGenerator, Iterable
from types import TracebackType
from typing import Any, Literal

from zerosum import wire
from zerosum.errors import ApiError, ConnectionLost, RequestRefused, SubscriptionLagged
from zerosum.results import Delivery, RoundResult, parse_delivery
from zerosum.wire import CLIENT_MAX_FRAME_BYTES, VERSION, FrameType, Op

_FINAL = {
    Op.HELLO: {FrameType.WELCOME, FrameType.ERROR},
    Op.ROUND: {FrameType.RESULT, FrameType.ERROR},
    Op.SUBSCRIBE: {FrameType.SUBSCRIBED, FrameType.ERROR},
    Op.STATUS: {FrameType.STATUS, FrameType.ERROR},
}


class Client:
    """A connection to one agent: its Unix socket `path`, or `host`/`port` (127.0.0.1) with
    the agent's `token`. Use it as `async with`, or `connect()` and `close()`.

    `queue` bounds the deliveries read ahead of `results()`; a consumer slower than that
    slows the connection, and the agent then ends the subscription (`SubscriptionLagged`)
    rather than wait for it."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, host: str | None = None,
                 port: int | None = None, token: str | None = None,
                 max_frame_bytes: int = CLIENT_MAX_FRAME_BYTES, queue: int = 1024) -> None:
        if (path is None) == (port is None):
            raise ValueError("give the socket path, or a port (with a token)")
        self.path = path
        self.host = host or "127.0.0.1"
        self.port = port
        self._token = token
        self._max_frame = max_frame_bytes
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[asyncio.Future[dict[str, Any]], set[FrameType]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | ApiError] = asyncio.Queue(queue)
        self._subscription: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lost: ApiError | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection (and, over TCP, present the token)."""
        if self.path is not None:
            reader, self._writer = await asyncio.open_unix_connection(os.fspath(self.path))
        else:
            reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._reader_task = asyncio.create_task(self._read(wire.FrameReader(reader,
                                                                       self._max_frame)))
        if self.port is not None:
            await self._call(Op.HELLO, {"token": self._token or ""})

    async def close(self) -> None:
        """Close the connection. Rounds already accepted still run to their end in the agent,
        which delivers them to its subscribers."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._fail(ConnectionLost("the client was closed"))

    async def round(self, customer_ids: Iterable[str], *,
                    scope: Literal["intersection", "query"] = "intersection",
                    attributes: Iterable[str] | None = None, min_holders: int | None = None,
                    participants: Iterable[str] | None = None,
                    deadline_s: float | None = None) -> RoundResult:
        """Run one round over `customer_ids` and return its totals.

        `scope` is "intersection" (the query customers the leader holds) or "query" (every
        query customer). `attributes` (default: all), `min_holders` and `participants`
        (default: the consortium's) may only raise the consortium's floors; `deadline_s`
        (seconds, default: the consortium's) counts from when the round starts, not from
        when it was queued. Raises `RoundAborted` when the round ends without a result and
        `RequestRefused` when the agent will not run it."""
        if isinstance(customer_ids, str):
            raise TypeError("customer_ids is a collection of ids, not one string")
        frame: dict[str, Any] = {"customer_ids": list(customer_ids), "scope": scope}
        if attributes is not None:
            frame["attributes"] = list(attributes)
        if min_holders is not None:
            frame["min_holders"] = min_holders
        if participants is not None:
            frame["participants"] = list(participants)
        if deadline_s is not None:
            frame["deadline_s"] = deadline_s
        answer = await self._call(Op.ROUND, frame)
        delivery = parse_delivery(answer["delivery"])
        if delivery.aborted is not None:
            raise delivery.aborted
        assert delivery.result is not None
        return delivery.result

    async def results(self) -> AsyncGenerator[Delivery, None]:
        """Every round this institution takes part in, in any role, as each ends (and first
        those that ended while nobody subscribed). One subscription per client at a time,
        ended when the loop ends; it raises `SubscriptionLagged` if this consumer falls too
        far behind."""
        if self._subscription is not None:
            raise ApiError("this client is subscribed already")
        while not self._events.empty():  # left over from an earlier subscription
            self._events.get_nowait()
        await self._call(Op.SUBSCRIBE, {})
        try:
            while True:
                if self._events.empty() and self._lost is not None:
                    raise self._lost
                event = await self._events.get()
                if isinstance(event, ApiError):
                    raise event
                if event["type"] == FrameType.LAGGED:
                    raise SubscriptionLagged(int(event["dropped"]))
                yield parse_delivery(event["delivery"])
        finally:
            self._unsubscribe()

    def _unsubscribe(self) -> None:
        """End the subscription without waiting (this runs when a loop over `results()` is
        left, maybe from a finaliser): deliveries still on their way are dropped."""
        if self._subscription is None:
            return
        self._subscription = None
        while not self._events.empty():  # frees the reader if it waits to queue one
            self._events.get_nowait()
        if self._writer is not None and self._lost is None:
            self._writer.write(wire.encode_frame({"op": Op.UNSUBSCRIBE.value,
                                             "id": next(self._ids)}))

    async def status(self) -> dict[str, Any]:
        """The agent's and its API's figures (rounds in flight and queued, subscribers...)."""
        answer = await self._call(Op.STATUS, {})
        status: dict[str, Any] = answer["status"]
        return status

    # -- the connection ----------------------------------------------------------------------
    async def _call(self, op: Op, frame: dict[str, Any]) -> dict[str, Any]:
        if self._lost is not None:
            raise self._lost
        if self._writer is None:
            raise ApiError("not connected: use `async with Client(...)` or `connect()`")
        request_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[request_id] = (fut, _FINAL[op])
        if op is Op.SUBSCRIBE:
            self._subscription = request_id
        try:
            self._writer.write(wire.encode_frame({"op": op.value, "id": request_id, **frame}))
            await self._writer.drain()
            answer = await fut
        except ConnectionError as exc:
            raise ConnectionLost(f"the agent closed the connection: {exc}") from exc
        finally:
            self._calls.pop(request_id, None)
        if answer["type"] == FrameType.ERROR:
            if op is Op.SUBSCRIBE:
                self._subscription = None
            raise RequestRefused(str(answer["code"]), str(answer["detail"]), answer.get("field"))
        return answer

    async def _read(self, frames: wire.FrameReader) -> None:
        error: ApiError = ConnectionLost("the agent closed the connection")
        try:
            while (line := await frames.next()) is not None:
                frame = wire.decode_frame(line)
                if wire.version_of(frame) != VERSION:
                    error = ApiError(f"the agent speaks version {frame.get('v')!r}, "
                                     f"this client {VERSION}")
                    return
                await self._dispatch(frame)
        except (ValueError, wire.FrameTooLarge) as exc:
            error = ApiError(f"a bad frame from the agent: {exc}")
        except ConnectionError as exc:
            error = ConnectionLost(f"the connection broke: {exc}")
        finally:
            self._fail(error)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        try:
            kind = FrameType(str(frame.get("type")))
        except ValueError:
            return  # a newer agent's frame this client does not know
        request_id = frame.get("id")
        if kind in (FrameType.DELIVERY, FrameType.LAGGED) and request_id == self._subscription:
            await self._events.put(frame)  # a full queue slows the connection: backpressure
            return
        call = self._calls.get(request_id) if isinstance(request_id, int) else None
        if call is not None and kind in call[1] and not call[0].done():
            call[0].set_result(frame)

    def _fail(self, error: ApiError) -> None:
        if self._lost is None:
            self._lost = error
        for fut, _ in list(self._calls.values()):
            if not fut.done():
                fut.set_exception(error)
        if self._subscription is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(error)
