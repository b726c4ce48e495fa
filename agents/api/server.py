"""The local API server: frames in (`zerosum.wire`), a `RoundService` behind.

Backpressure, without polling anywhere:
- at most `max_in_flight` rounds run at once (the consortium's policy figure), counted with
  those of the application bus by their shared `RoundScheduler`; the others wait in FIFO order,
  accepted and not refused;
- each connection has at most `max_pending` rounds accepted and not yet answered; past that the
  server stops reading it, so the client's writes block in the socket;
- each subscriber has a queue of `subscriber_queue` deliveries; one that falls behind gets a
  `lagged` frame and its subscription ends. The agent's side (`_fan_out`) never waits.

A round outlives the connection that asked for it: it runs to its end and is delivered to the
subscribers, or, while there are none, kept (the last `retained`) for the next subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import stat
import weakref
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.api.codec import delivery_json, parse_round
from agents.api.scheduler import RoundScheduler
from agents.api.service import Delivery, Refused, RoundRequest, RoundService
from zerosum.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    VERSION,
    ErrorCode,
    FrameReader,
    FrameTooLarge,
    FrameType,
    Op,
    decode_frame,
    encode_frame,
    version_of,
)

MAX_UNIX_PATH = 107  # sun_path is 108 bytes with its NUL


class SocketPathError(Exception):
    """The configured socket cannot be used (too long, or another agent listens on it)."""


@dataclass(frozen=True)
class ApiSettings:
    """Where the API listens and its bounds. `socket` is `[api] socket` of the party's TOML.
    (The bound on rounds in flight is the `RoundScheduler`'s, shared with the app bus.)"""

    socket: Path
    max_pending: int = 4096  # per connection: accepted rounds not yet answered
    subscriber_queue: int = 1024  # deliveries waiting for one subscriber
    retained: int = 1024  # deliveries kept while nobody subscribes
    retained_bytes: int = 256 * 1024 * 1024  # and their JSON, at most (a 1M-row round: ~70 MB)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    tcp_port: int | None = None  # 127.0.0.1 only, and only with a token (0: any free port)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if min(self.max_pending, self.subscriber_queue) < 1:
            raise ValueError("max_pending and subscriber_queue are at least 1")
        if self.tcp_port is not None and not self.token:
            raise ValueError("the TCP listener needs a token")


class _Lagged:
    """Queue marker: the subscriber fell behind by `dropped` deliveries."""

    def __init__(self, dropped: int) -> None:
        self.dropped = dropped


class _Connection:
    """One client: a writer shared by the answers to its requests and its subscription."""

    def __init__(self, writer: asyncio.StreamWriter, *, trusted: bool, max_pending: int) -> None:
        self.writer = writer
        self.trusted = trusted  # the Unix socket (its mode is the access control)
        self.pending = asyncio.Semaphore(max_pending)
        self.subscription: _Subscriber | None = None
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, frame: dict[str, Any], **encoded: bytes) -> bool:
        """Write one frame; whether it was written (quietly not once the client has gone)."""
        if self.closed:
            return False
        async with self._lock:
            try:
                self.writer.write(encode_frame(frame, **encoded))
                await self.writer.drain()
            except (ConnectionError, RuntimeError):  # RuntimeError: the transport closed
                self.closed = True
                return False
        return True


class _Subscriber:
    def __init__(self, conn: _Connection, request_id: Any, size: int) -> None:
        self.conn = conn
        self.request_id = request_id
        self.queue: asyncio.Queue[tuple[Delivery, bytes] | _Lagged] = asyncio.Queue(size)
        self.task: asyncio.Task[None] | None = None


class ApiServer:
    """Serve a `RoundService`, through its `RoundScheduler`, on a Unix socket (mode 600) and
    optionally on 127.0.0.1.

    `await server.run()` until `stop()`; `started` is set once it listens. Errors in one
    connection or one round are answered and logged, never raised out of `run()`."""

    def __init__(self, scheduler: RoundScheduler, settings: ApiSettings,
                 log: logging.Logger | None = None) -> None:
        self.scheduler = scheduler
        self.service: RoundService = scheduler.service
        self.settings = settings
        self.log = log or logging.getLogger("zerosum.api")
        self.started = asyncio.Event()
        self.tcp_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self._subscribers: set[_Subscriber] = set()
        self._retained: deque[tuple[Delivery, bytes]] = deque()
        self._retained_bytes = 0
        self.dropped = 0  # retained deliveries dropped past the bounds (a round asked here
        # stays in the agent's results record until a client has it)
        # a delivery as JSON, made once for its requester and every subscriber
        self._bodies: weakref.WeakKeyDictionary[Delivery, bytes] = weakref.WeakKeyDictionary()
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.queued = 0  # accepted here, waiting for the scheduler
        self.lagged = 0
        self.errors: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        """Rounds running in the agent, from either door."""
        return self.scheduler.in_flight

    @property
    def peak_in_flight(self) -> int:
        return self.scheduler.peak_in_flight

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Listen until `stop()`. A socket that cannot be used raises `SocketPathError` (or
        OSError for the TCP port) before anything is served."""
        path = self.settings.socket
        socks = [self._bind_unix(path)]
        try:
            if self.settings.tcp_port is not None:
                socks.append(socket.create_server(("127.0.0.1", self.settings.tcp_port)))
        except BaseException:
            socks[0].close()
            path.unlink(missing_ok=True)
            raise
        servers: list[asyncio.Server] = []
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                servers.append(await asyncio.start_unix_server(
                    lambda r, w: self._accept(r, w, trusted=True), sock=socks[0]))
                if len(socks) > 1:
                    servers.append(await asyncio.start_server(
                        lambda r, w: self._accept(r, w, trusted=False), sock=socks[1]))
                    self.tcp_address = socks[1].getsockname()[:2]
                self._spawn(self._pump(self.service.deliveries()))
                self.started.set()
                self.log.info("API listening on %s%s", path, f" and {self.tcp_address}"
                              if self.tcp_address else "")
                await self._stop.wait()
                self._shut(servers)
        finally:
            self._shut(servers)
            for sock in socks:
                sock.close()
            path.unlink(missing_ok=True)

    def _shut(self, servers: list[asyncio.Server]) -> None:
        """Stop listening, close every connection, cancel the rounds still running."""
        for s in servers:
            s.close()
        for conn in self._connections:
            conn.closed = True
            conn.writer.close()
        for t in self._tasks:
            t.cancel()

    def _bind_unix(self, path: Path) -> socket.socket:
        """A listening socket at `path`, mode 600 from the moment it has that name: bound
        under a random name beside it, chmod'ed, then renamed over `path`."""
        # the temporary name is no longer than "api.sock": a path that fits, fits both ways
        tmp = path.with_name(f".{secrets.token_hex(3)}")
        if max(len(os.fsencode(path)), len(os.fsencode(tmp))) > MAX_UNIX_PATH:
            raise SocketPathError(f"{path}: a Unix socket path has at most {MAX_UNIX_PATH} "
                                  "bytes; set [api] socket to a shorter path")
        if path.exists():
            if not stat.S_ISSOCK(path.stat().st_mode):
                raise SocketPathError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                pass  # stale: left by an agent that died
            else:
                raise SocketPathError(f"{path}: another agent's API listens there")
            finally:
                probe.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return sock

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tg is not None
        task = self._tg.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task of the server's group: its failure is logged, never ends the server."""
        try:
            await coro
        except Exception:
            self.log.exception("API task failed")

    def status(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "queued": self.queued,
                "peak_in_flight": self.peak_in_flight,
                "max_in_flight": self.scheduler.max_in_flight,
                "connections": len(self._connections), "subscribers": len(self._subscribers),
                "retained": len(self._retained), "retained_bytes": self._retained_bytes,
                "dropped": self.dropped, "lagged": self.lagged,
                "errors": dict(self.errors)}

    # -- connections -------------------------------------------------------------------------
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                trusted: bool) -> None:
        conn = _Connection(writer, trusted=trusted, max_pending=self.settings.max_pending)
        self._connections.add(conn)
        self._spawn(self._serve(conn, FrameReader(reader, self.settings.max_frame_bytes)))

    async def _serve(self, conn: _Connection, frames: FrameReader) -> None:
        try:
            while not conn.closed:
                try:
                    line = await frames.next()
                except FrameTooLarge as exc:
                    await self._error(conn, None, ErrorCode.FRAME_TOO_LARGE, str(exc))
                    continue
                if line is None:
                    return
                if line.strip():
                    await self._frame(conn, line)
        except ConnectionError:
            pass
        finally:
            conn.closed = True
            self._connections.discard(conn)
            self._unsubscribe(conn)
            conn.writer.close()

    def _error_frame(self, request_id: Any, code: ErrorCode, detail: str,
                     field: str | None = None) -> dict[str, Any]:
        self.errors[code.value] = self.errors.get(code.value, 0) + 1
        return {"type": FrameType.ERROR.value, "id": request_id, "code": code.value,
                "field": field, "detail": detail[:1024]}

    async def _error(self, conn: _Connection, request_id: Any, code: ErrorCode, detail: str,
                     field: str | None = None) -> None:
        await conn.send(self._error_frame(request_id, code, detail, field))

    async def _frame(self, conn: _Connection, line: bytes) -> None:
        try:
            frame = decode_frame(line)
        except ValueError as exc:
            await self._error(conn, None, ErrorCode.MALFORMED_FRAME, str(exc))
            return
        rid = frame.get("id")
        if isinstance(rid, dict | list):
            rid = None  # ids are echoed: scalars only
        if version_of(frame) != VERSION:
            await self._error(conn, rid, ErrorCode.UNKNOWN_VERSION,
                              f"version {frame.get('v')!r}; this agent speaks {VERSION}", "v")
            return
        op = frame.get("op")
        if not conn.trusted and op != Op.HELLO:
            await self._error(conn, rid, ErrorCode.UNAUTHORIZED, "send hello with the token "
                              "first")
            conn.closed = True
            return
        try:
            if op == Op.HELLO:
                await self._hello(conn, rid, frame)
            elif op == Op.ROUND:
                await self._round(conn, rid, frame)
            elif op == Op.SUBSCRIBE:
                await self._subscribe(conn, rid)
            elif op == Op.UNSUBSCRIBE:
                self._unsubscribe(conn)
                await conn.send({"type": FrameType.UNSUBSCRIBED.value, "id": rid})
            elif op == Op.STATUS:
                await conn.send({"type": FrameType.STATUS.value, "id": rid, "status": {
                    "api": self.status(), "agent": dict(self.service.status())}})
            else:
                await self._error(conn, rid, ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; one of "
                                  f"{', '.join(o.value for o in Op)}", "op")
        except Refused as exc:
            await self._error(conn, rid, exc.code, exc.detail, exc.field)
        except Exception as exc:  # a bug here ends neither the connection nor the server
            self.log.exception("API request %r failed", op)
            await self._error(conn, rid, ErrorCode.SERVICE_FAILED, f"{type(exc).__name__}: {exc}")

    async def _hello(self, conn: _Connection, rid: Any, frame: dict[str, Any]) -> None:
        token = frame.get("token")
        expected = self.settings.token
        if conn.trusted:
            await conn.send({"type": FrameType.WELCOME.value, "id": rid})
            return
        if (not isinstance(token, str) or expected is None
                or not hmac.compare_digest(token.encode(), expected.encode())):
            await self._error(conn, rid, ErrorCode.UNAUTHORIZED, "wrong token", "token")
            conn.closed = True
            return
        conn.trusted = True
        await conn.send({"type": FrameType.WELCOME.value, "id": rid})

    # -- rounds ------------------------------------------------------------------------------
    async def _round(self, conn: _Connection, rid: Any, frame: dict[str, Any]) -> None:
        request = parse_round(frame, self.service.policy())
        await conn.pending.acquire()  # past max_pending, this connection is not read
        if conn.closed:  # gone while it waited: never accepted, so not run
            conn.pending.release()
            return
        round_id = os.urandom(16)
        self.queued += 1
        await conn.send({"type": FrameType.ACCEPTED.value, "id": rid,
                         "round_id": round_id.hex(), "queued": self.queued})
        self._spawn(self._run_round(conn, rid, round_id, request))

    async def _run_round(self, conn: _Connection, rid: Any, round_id: bytes,
                         request: RoundRequest) -> None:
        try:
            answer: dict[str, Any]
            delivery: Delivery | None = None
            body: dict[str, bytes] = {}
            started = False

            def start() -> None:
                nonlocal started
                started = True
                self.queued -= 1

            try:
                delivery = await self.scheduler.run(round_id, request, on_start=start)
            except Refused as exc:
                answer = self._error_frame(rid, exc.code, exc.detail, exc.field)
            except Exception as exc:
                self.log.exception("round %s failed in the agent", round_id.hex())
                answer = self._error_frame(rid, ErrorCode.SERVICE_FAILED,
                                           f"{type(exc).__name__}: {exc}")
            finally:
                if not started:  # cancelled while it waited
                    self.queued -= 1
            if delivery is not None:  # the slot is free before the rows are formatted
                try:
                    body["delivery"] = await self._encoded(delivery)
                    answer = {"type": FrameType.RESULT.value, "id": rid}
                except Exception as exc:
                    self.log.exception("round %s: its result cannot be encoded",
                                       round_id.hex())
                    answer = self._error_frame(rid, ErrorCode.SERVICE_FAILED,
                                               f"{type(exc).__name__}: {exc}")
            if await conn.send(answer, **body) and delivery is not None:
                self.service.taken(delivery.round_id)
        finally:
            conn.pending.release()

    # -- subscriptions -----------------------------------------------------------------------
    async def _subscribe(self, conn: _Connection, rid: Any) -> None:
        if conn.subscription is not None:
            raise Refused(ErrorCode.INVALID_FIELD, "this connection is subscribed already",
                          "op")
        sub = _Subscriber(conn, rid, self.settings.subscriber_queue)
        retained = list(self._retained)[-self.settings.subscriber_queue:]
        if len(self._retained) > len(retained):
            self.log.warning("%d retained deliveries dropped: more than a subscriber's queue",
                             len(self._retained) - len(retained))
        self._retained.clear()
        self._retained_bytes = 0
        for d in retained:
            sub.queue.put_nowait(d)
        conn.subscription = sub
        self._subscribers.add(sub)
        await conn.send({"type": FrameType.SUBSCRIBED.value, "id": rid,
                         "retained": len(retained)})
        sub.task = self._spawn(self._feed(sub))

    def _unsubscribe(self, conn: _Connection) -> None:
        sub, conn.subscription = conn.subscription, None
        if sub is not None:
            self._subscribers.discard(sub)
            if sub.task is not None:
                sub.task.cancel()

    async def _feed(self, sub: _Subscriber) -> None:
        while not sub.conn.closed:
            item = await sub.queue.get()
            if isinstance(item, _Lagged):
                await sub.conn.send({"type": FrameType.LAGGED.value, "id": sub.request_id,
                                     "dropped": item.dropped})
                sub.conn.subscription = None
                return
            if await sub.conn.send({"type": FrameType.DELIVERY.value, "id": sub.request_id},
                                   delivery=item[1]):
                self.service.taken(item[0].round_id)

    async def _encoded(self, delivery: Delivery) -> bytes:
        """The delivery as JSON, made in a thread: a large round's rows take seconds to
        format, and the agent's loop carries on meanwhile."""
        body = self._bodies.get(delivery)
        if body is None:
            body = self._bodies[delivery] = await asyncio.to_thread(delivery_json, delivery)
        return body

    async def _pump(self, deliveries: AsyncIterator[Delivery]) -> None:
        async for delivery in deliveries:
            try:
                body = await self._encoded(delivery)
            except Exception:
                self.log.exception("round %s: its delivery cannot be encoded; not delivered",
                                   delivery.round_id.hex())
                continue
            self._fan_out(delivery, body)

    def _retain(self, delivery: Delivery, body: bytes) -> None:
        """Keep it for the next subscriber, within `retained` deliveries and
        `retained_bytes`: the oldest go first."""
        self._retained.append((delivery, body))
        self._retained_bytes += len(body)
        while self._retained and (len(self._retained) > self.settings.retained
                                  or self._retained_bytes > self.settings.retained_bytes):
            _, old = self._retained.popleft()
            self._retained_bytes -= len(old)
            self.dropped += 1

    def _fan_out(self, delivery: Delivery, body: bytes) -> None:
        """To every subscriber's queue, without waiting: a full queue ends its subscription."""
        if not self._subscribers:
            self._retain(delivery, body)
            return
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait((delivery, body))
            except asyncio.QueueFull:
                dropped = sub.queue.qsize() + 1
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(_Lagged(dropped))
                self._subscribers.discard(sub)
                self.lagged += 1
                self.log.warning("API subscriber %r fell %d deliveries behind; its "
                                 "subscription ended", sub.request_id, dropped)
