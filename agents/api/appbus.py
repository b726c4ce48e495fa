"""The application bus: round requests from the institution's own Kafka, results back to it.

`[app]` of an institution's TOML (`agents.config.AppConfig`) names a Kafka cluster of the
institution's own, never the consortium's: plaintext customer ids and totals travel on it.

Records (values are JSON objects, each with `"v": 1`; see `zerosum.wire`):
- on `requests_topic`: one `round` request as the local API takes it (`customer_ids`, `scope`,
  `attributes`, `min_holders`, `participants`, `deadline_s`; `op` may be left out). The
  record's key (UTF-8), or else the object's `id`, is the request id echoed in the answers.
- on `results_topic`, keyed by the round id (hex):
  `{"type": "accepted", "request_id", "round_id", "request": {topic, partition, offset}}` as a
  request is taken; `{"type": "delivery", "request_id", "delivery": {...}}` for every round
  this institution took part in, requested here (with its `request_id`) or not (`null`), the
  body as the API's `delivery` frame carries it (roles, status, table of decimal strings);
  `{"type": "error", "request_id", "round_id", "code", "field", "detail", "request"}` for a
  request refused (keyed by the request id, or by nothing), with the API's error codes.

Durability. A request's round id is derived from the record itself, an HMAC under the
agent's key of (topic, partition, offset, timestamp): consumed a second time (after a crash,
or when the group starts over from the earliest offset) it asks for the same round id, which
the agent's ledger and the coordinator refuse as a replay, so no request runs twice. Its
offset is committed once its round has started in the agent (the scheduler handed it a slot
and called `submit`), which is after its `accepted` record was sent, or once its error record
was sent (a record the results topic does not take is logged and counted in `failed`); only
a contiguous run of such offsets is committed. A crash therefore re-reads only the
requests not yet started, which then run once, and those started since the last commit,
which are refused as replays (an `error` record) while the round itself, the agent's, still
ends in a `delivery` record: the `accepted` record ties its round id to the request id.

Bounds. At most `max_pending` requests are taken and not yet ended; past that the bridge
reads no more. The agent's `deliveries()` go through a queue of `results_queue`: when the
results topic is slower than the rounds, deliveries not requested here are dropped, logged and
counted (`dropped`); the agent never waits for the results topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from agents.api.codec import delivery_json, parse_round
from agents.api.scheduler import RoundScheduler
from agents.api.service import Delivery, Refused, RoundRequest
from agents.config import AppConfig
from zerosum.wire import VERSION, ErrorCode, Op, decode_frame, encode_frame, version_of

ROUND_ID_DOMAIN = b"zerosum app-bus round id v1\x00"
ANSWERED_KEPT = 4096  # requested rounds whose copy on deliveries() may still come
MAX_RECORD_BYTES = 1 << 30  # the internal broker's message.max.bytes is the real limit


def round_id_for(key: bytes, record: ConsumerRecord[bytes, bytes]) -> bytes:
    """The round id of a request record: 16 bytes of HMAC-SHA256 under `key` (the agent's)
    of its topic, partition, offset and timestamp (ms). The same record always gives the
    same id; a topic deleted and made again gives others (new timestamps)."""
    msg = ROUND_ID_DOMAIN + record.topic.encode() + b"\x00" + struct.pack(
        ">iqq", record.partition, record.offset, record.timestamp)
    return hmac.new(key, msg, hashlib.sha256).digest()[:16]


class _Offsets:
    """Per partition, the offsets taken in order and whether each is done; what may be
    committed is the offset after the longest run of done ones from the start."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, dict[int, bool]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def take(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, {})[offset] = False

    def done(self, tp: TopicPartition, offset: int) -> None:
        taken = self._open[tp]
        taken[offset] = True
        while taken and taken[first := next(iter(taken))]:
            del taken[first]
            self._next[tp] = first + 1

    def to_commit(self) -> dict[TopicPartition, int]:
        return {tp: o for tp, o in self._next.items() if self._committed.get(tp) != o}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)


def _request_id(key: bytes | None, frame: dict[str, Any] | None) -> Any:
    if key is not None:
        return key.decode("utf-8", "backslashreplace")
    rid = None if frame is None else frame.get("id")
    return None if isinstance(rid, dict | list) else rid


class AppBridge:
    """Serve the scheduler's `RoundService` on the institution's own Kafka until `stop()`.

    `id_key` (at least 16 bytes, secret: the party's `keys.secret`) derives the round ids of
    requests. `started` is set once the clients run and `deliveries()` is being read."""

    def __init__(self, scheduler: RoundScheduler, config: AppConfig, *, id_key: bytes,
                 log: logging.Logger | None = None) -> None:
        if len(id_key) < 16:
            raise ValueError("id_key has at least 16 bytes")
        self.scheduler = scheduler
        self.service = scheduler.service
        self.config = config
        self._id_key = id_key
        self.log = log or logging.getLogger("zerosum.appbus")
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._pending = asyncio.Semaphore(config.max_pending)
        self._results: asyncio.Queue[Delivery] = asyncio.Queue(config.results_queue)
        self._offsets = _Offsets()
        self._commit = asyncio.Event()
        self._requested: dict[bytes, Any] = {}  # round id -> request id, until it ends
        self._answered: OrderedDict[bytes, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.requests = 0
        self.delivered = 0
        self.dropped = 0  # deliveries not requested here, dropped on a full results queue
        self.failed = 0  # records the results topic did not take
        self.errors: dict[str, int] = {}

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        return {"requests": self.requests, "running": len(self._requested),
                "delivered": self.delivered, "dropped": self.dropped, "failed": self.failed,
                "results_queued": self._results.qsize(), "errors": dict(self.errors)}

    async def run(self) -> None:
        """Consume, run and answer until `stop()`. Requests still waiting for a slot then
        are not committed and are read again by the next run."""
        kafka = self.config.kafka.aiokafka_kwargs()
        producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=True,
                                    max_request_size=MAX_RECORD_BYTES)
        consumer = AIOKafkaConsumer(self.config.requests_topic, **kafka,
                                    group_id=self.config.group, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        deliveries = self.service.deliveries()  # from now on: nothing ends unseen
        await producer.start()
        try:
            await consumer.start()
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    for coro in (self._consume(consumer, producer), self._pump(deliveries),
                                 self._forward(producer), self._committer(consumer)):
                        self._spawn(coro)
                    self.started.set()
                    self.log.info("app bus: requests from %s, results to %s on %s",
                                  self.config.requests_topic, self.config.results_topic,
                                  self.config.kafka.bootstrap)
                    await self._stop.wait()
                    for task in self._tasks:
                        task.cancel()
            finally:
                with contextlib.suppress(KafkaError):
                    await self._commit_now(consumer)
                await consumer.stop()
        finally:
            await producer.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        task = self._tg.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """A failure in one request or loop is logged; it never ends the bridge."""
        try:
            await coro
        except Exception:
            self.log.exception("app bus task failed")

    # -- requests ----------------------------------------------------------------------------
    async def _consume(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        while True:
            await self._pending.acquire()  # past max_pending, read nothing more
            try:
                record = await consumer.getone()
            except KafkaError as exc:
                self._pending.release()
                self.log.warning("app bus: reading %s failed: %s", self.config.requests_topic,
                                 exc)
                continue
            except BaseException:
                self._pending.release()
                raise
            tp = TopicPartition(record.topic, record.partition)
            self._offsets.take(tp, record.offset)
            self.requests += 1
            self._spawn(self._request(record, producer))

    async def _request(self, record: ConsumerRecord[bytes, bytes],
                       producer: AIOKafkaProducer) -> None:
        tp = TopicPartition(record.topic, record.partition)
        where = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        try:
            frame: dict[str, Any] | None = None
            try:
                try:
                    frame = decode_frame(record.value or b"")
                except ValueError as exc:
                    raise Refused(ErrorCode.MALFORMED_FRAME, str(exc)) from None
                if version_of(frame) != VERSION:
                    raise Refused(ErrorCode.UNKNOWN_VERSION, f"version {frame.get('v')!r}; "
                                  f"this agent speaks {VERSION}", "v")
                if frame.get("op", Op.ROUND.value) != Op.ROUND:
                    raise Refused(ErrorCode.UNKNOWN_OP, f"op {frame.get('op')!r}: the app "
                                  "bus takes round requests only", "op")
                request = parse_round(frame, self.service.policy())
            except Refused as exc:
                await self._error(producer, record.key, _request_id(record.key, frame), None,
                                  exc, where)
                self._done(tp, record.offset)
                return
            request_id = _request_id(record.key, frame)
            round_id = round_id_for(self._id_key, record)
            await self._round(producer, tp, record.offset, request_id, round_id, request, where)
        finally:
            self._pending.release()

    async def _round(self, producer: AIOKafkaProducer, tp: TopicPartition, offset: int,
                     request_id: Any, round_id: bytes, request: RoundRequest,
                     where: dict[str, Any]) -> None:
        key = round_id.hex().encode()
        self._requested[round_id] = request_id
        try:
            await self._send(producer, key, {"type": "accepted", "request_id": request_id,
                                             "round_id": round_id.hex(), "request": where})
            try:
                delivery = await self.scheduler.run(round_id, request,
                                                    on_start=lambda: self._done(tp, offset))
            finally:
                # its copy on deliveries() is skipped: this request's answer is the record
                self._requested.pop(round_id, None)
                self._answered[round_id] = None
                while len(self._answered) > ANSWERED_KEPT:
                    self._answered.popitem(last=False)
        except Refused as exc:
            await self._error(producer, key, request_id, round_id, exc, where)
            return
        except Exception as exc:
            self.log.exception("app bus: round %s failed in the agent", round_id.hex())
            await self._error(producer, key, request_id, round_id, Refused(
                ErrorCode.SERVICE_FAILED, f"{type(exc).__name__}: {exc}"), where)
            return
        await self._deliver(producer, delivery, request_id)

    def _done(self, tp: TopicPartition, offset: int) -> None:
        self._offsets.done(tp, offset)
        self._commit.set()

    # -- results -----------------------------------------------------------------------------
    async def _pump(self, deliveries: AsyncIterator[Delivery]) -> None:
        """The agent's deliveries into the bounded queue, never waiting on it."""
        async for delivery in deliveries:
            if delivery.round_id in self._requested:
                continue
            if delivery.round_id in self._answered:
                del self._answered[delivery.round_id]
                continue
            try:
                self._results.put_nowait(delivery)
            except asyncio.QueueFull:
                self.dropped += 1
                self.log.warning("app bus: round %s not delivered to %s: %d deliveries "
                                 "wait for it already (%d dropped so far)",
                                 delivery.round_id.hex(), self.config.results_topic,
                                 self._results.qsize(), self.dropped)

    async def _forward(self, producer: AIOKafkaProducer) -> None:
        while True:
            await self._deliver(producer, await self._results.get(), None)

    async def _deliver(self, producer: AIOKafkaProducer, delivery: Delivery,
                       request_id: Any) -> None:
        try:
            body = await asyncio.to_thread(delivery_json, delivery)
        except Exception:
            self.failed += 1
            self.log.exception("app bus: round %s cannot be encoded; not delivered",
                               delivery.round_id.hex())
            return
        if await self._send(producer, delivery.round_id.hex().encode(),
                            {"type": "delivery", "request_id": request_id}, delivery=body):
            self.delivered += 1
            self.service.taken(delivery.round_id)

    async def _error(self, producer: AIOKafkaProducer, key: bytes | None, request_id: Any,
                     round_id: bytes | None, exc: Refused, where: dict[str, Any]) -> None:
        self.errors[exc.code.value] = self.errors.get(exc.code.value, 0) + 1
        await self._send(producer, key, {
            "type": "error", "request_id": request_id,
            "round_id": None if round_id is None else round_id.hex(), "code": exc.code.value,
            "field": exc.field, "detail": exc.detail[:1024], "request": where})

    async def _send(self, producer: AIOKafkaProducer, key: bytes | None, frame: dict[str, Any],
                    **encoded: bytes) -> bool:
        """One record to the results topic, acknowledged (acks=all); False, logged and
        counted, when the topic did not take it."""
        try:
            await producer.send_and_wait(self.config.results_topic,
                                         encode_frame(frame, **encoded)[:-1], key=key)
        except KafkaError as exc:
            self.failed += 1
            self.log.warning("app bus: a %s record was not taken by %s: %s", frame["type"],
                             self.config.results_topic, exc)
            return False
        return True

    # -- offsets -----------------------------------------------------------------------------
    async def _committer(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            await self._commit.wait()
            self._commit.clear()
            try:
                await self._commit_now(consumer)
            except KafkaError as exc:  # the next request's start tries again
                self.log.warning("app bus: committing %s failed: %s",
                                 self.config.requests_topic, exc)

    async def _commit_now(self, consumer: AIOKafkaConsumer) -> None:
        offsets = self._offsets.to_commit()
        if offsets:
            await consumer.commit(dict(offsets))
            self._offsets.committed(offsets)
