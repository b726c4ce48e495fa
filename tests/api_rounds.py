"""Rounds asked of an institution agent's local API by tests that kill and restart it.

`ApiRounds` keeps one connection, subscribed, to the agent's socket: `submit()` returns a
round's id once the agent accepted it; each round's end is taken from the answer on the
connection that asked or, after the agent restarted (`connect()` again), from the deliveries
of its results record. Nothing here polls: a reader task wakes whoever waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from protocol.tokens import normalise_id
from zerosum.wire import FrameReader, FrameType, Op, decode_frame, encode_frame

WAIT_S = 60.0


class NotAccepted(Exception):
    """The agent refused the request, or went away before accepting it."""


class ApiRounds:
    """Rounds this test asked for, by id (hex), and their ends as delivered (the JSON body
    of `agents.api.codec.delivery_body`)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.ends: dict[str, dict[str, Any]] = {}
        self.copies = 0  # ends delivered more than once (after a crash: at least once)
        self._ids = itertools.count(1)
        self._accepting: dict[int, asyncio.Future[str]] = {}
        self._changed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """(Again) a connection to the agent, subscribed to every round it delivers."""
        await self.close()
        async with asyncio.timeout(WAIT_S):
            reader, self._writer = await asyncio.open_unix_connection(str(self.socket))
        self._reader = asyncio.create_task(self._read(FrameReader(reader, 1 << 30)))
        self._writer.write(encode_frame({"op": Op.SUBSCRIBE.value, "id": 0}))
        await self._writer.drain()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def submit(self, ids: Iterable[str], **fields: Any) -> str:
        """Ask for a round; its id once the agent accepted it (NotAccepted otherwise)."""
        if self._writer is None:
            raise NotAccepted("not connected")
        rid = next(self._ids)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._accepting[rid] = fut
        try:
            self._writer.write(encode_frame({"op": Op.ROUND.value, "id": rid,
                                             "customer_ids": list(ids), **fields}))
            await self._writer.drain()
            async with asyncio.timeout(WAIT_S):
                return await fut
        except ConnectionError as exc:
            raise NotAccepted(f"connection lost: {exc}") from exc
        finally:
            self._accepting.pop(rid, None)

    async def wait_for(self, round_ids: Iterable[str], timeout_s: float) -> None:
        """Until every one of `round_ids` has ended (TimeoutError naming how many have not)."""
        wanted = set(round_ids)
        try:
            async with asyncio.timeout(timeout_s):
                while missing := wanted - self.ends.keys():
                    self._changed.clear()
                    if not wanted - self.ends.keys():
                        break
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{len(missing)} of {len(wanted)} rounds have not ended after "
                               f"{timeout_s:.0f} s") from None

    async def _read(self, frames: FrameReader) -> None:
        try:
            while (line := await frames.next()) is not None:
                self._take(decode_frame(line))
        except ConnectionError:
            pass
        finally:
            for fut in self._accepting.values():
                if not fut.done():
                    fut.set_exception(NotAccepted("the agent closed the connection"))

    def _take(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        fut = self._accepting.get(frame.get("id", -1))
        if kind == FrameType.ACCEPTED and fut is not None and not fut.done():
            fut.set_result(str(frame["round_id"]))
        elif kind == FrameType.ERROR and fut is not None and not fut.done():
            fut.set_exception(NotAccepted(f"{frame['code']}: {frame['detail']}"))
        elif kind in (FrameType.RESULT, FrameType.DELIVERY) and "delivery" in frame:
            body = frame["delivery"]
            if "requester" not in body["roles"]:
                return
            if body["round_id"] in self.ends:
                self.copies += 1
                assert same_end(self.ends[body["round_id"]], body), body["round_id"]
            else:
                self.ends[body["round_id"]] = body
            self._changed.set()


def same_end(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two deliveries of one round agree (rows by token: a copy from the results record
    after a restart has no customer ids)."""
    if a["status"] != b["status"]:
        return False
    if a["status"] != "published":
        return bool(a["reason"] == b["reason"])
    return [r[1:] for r in a["table"]] == [r[1:] for r in b["table"]]


def wrong_rows(body: dict[str, Any], want: dict[str, list[Decimal]],
               by_token: dict[str, str]) -> int:
    """Rows of a published delivery that differ from the plaintext totals `want` (by
    normalised id: holders, then each attribute)."""
    wrong = 0
    for row in body["table"]:
        expected = want[normalise_id(by_token[row[1]])]
        wrong += [Decimal(row[2]), *map(Decimal, row[3:])] != expected
    return wrong
