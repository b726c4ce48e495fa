"""The agent's bus on Apache Kafka (aiokafka): an idempotent acks=all producer, a consumer of the
party's inbox with a fixed assignment and no consumer group, and the topic helpers around them.

Kafka away (a single broker down, a cluster without a majority) stops no loop: a produce that
is not acknowledged is sent again with backoff, a fetch that fails is tried again. `interrupt()`
ends those waits at once (Stopping): what was journaled and not acknowledged is sent again on
the agent's next start.

A Kafka client asks only the brokers of its last metadata (aiokafka has no re-bootstrap); after
an outage those may be the nodes still down. So a producer whose sends get no ack for
PRODUCE_TIMEOUT_MS, or a consumer whose inbox has records it does not deliver for
STUCK_AFTER_S, is replaced by one bootstrapped again from the whole list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    TopicAlreadyExistsError,
    UnknownProducerId,
)

from agents.broker import broker_config_dir, read_properties
from agents.bus import Fetched, Record, Stopping
from agents.kafka_client import prepare_topics, seek_to_read
from agents.security import KafkaAccess, as_access
from protocol.audit import RESEND_HEADER

T = TypeVar("T")
MAX_REQUEST_BYTES = 2 * 1024 * 1024
# errors after which the idempotent producer's state is useless: replace the producer
PRODUCER_STATE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)
CLIENT_STOP_S = 10.0  # how long a stopping agent lets its Kafka clients close before it leaves
STUCK_AFTER_S = 10.0  # a consumer idle this long while its inbox has more is rebuilt
PROBE_S = 5.0  # how long a look at the inbox's end offset may take
BACKOFF_FIRST_S = 0.2  # the first wait before a failed fetch or produce is tried again
BACKOFF_MAX_S = 5.0  # each further wait doubles, up to this
PRODUCE_TIMEOUT_MS = 20_000  # a send not acknowledged by then is sent again
LEGACY_GROUP_S = 30.0  # how long a first start under this version asks for the group's offset


def topic_settings() -> tuple[int, int, dict[str, str]]:
    """(partitions, replication factor, configs) for inbox topics, from broker_config/."""
    props = read_properties(broker_config_dir() / "topics.properties")
    partitions = int(props.pop("partitions", "1"))
    replication = int(props.pop("replication.factor", "1"))
    return partitions, replication, props


async def ensure_topics(bootstrap: str | KafkaAccess, topics: list[str]) -> None:
    """Create the inbox topics that do not exist yet, with the audit settings.

    On a secured broker only the admin may (`agents.kafka_admin.provision`); a party there
    checks that its topics exist (`check_topics`)."""
    partitions, replication, configs = topic_settings()
    admin = AIOKafkaAdminClient(**as_access(bootstrap).aiokafka_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:  # no more replicas than the cluster has brokers (the single node: 1)
            replication = min(replication, len((await admin.describe_cluster())["brokers"]))
            with contextlib.suppress(TopicAlreadyExistsError):  # another agent was first
                await admin.create_topics([NewTopic(t, partitions, replication,
                                                    topic_configs=configs) for t in missing])
    finally:
        await admin.close()


async def read_to_end(bootstrap: str | KafkaAccess, topics: list[str], *,
                      last: int | None = None) -> AsyncIterator[Any]:
    """The records of `topics` (partition 0) up to their end offsets at the time of the call:
    all of them, or only the `last` few of each. RuntimeError if the broker stops delivering
    before the end."""
    consumer = AIOKafkaConsumer(**as_access(bootstrap).aiokafka_kwargs(),
                                enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=MAX_REQUEST_BYTES * 4)
    await consumer.start()
    try:
        tps = [TopicPartition(t, 0) for t in topics]
        ends = await seek_to_read(consumer, tps, last=last)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=10_000)
            if not batch:
                raise RuntimeError(f"{', '.join(topics)} stopped delivering before their end")
            for tp, recs in batch.items():
                for r in recs:
                    if r.offset < ends[tp]:
                        yield r
    finally:
        await consumer.stop()


class KafkaBus:
    """The `agents.bus.Bus` of one party on Kafka: its own producer, and a consumer per
    `open()`ed topic. `topics`: the inboxes it needs (created on a plaintext broker, checked on
    a secured one, at `start()`)."""

    def __init__(self, access: KafkaAccess, *, client_id: str, topics: Sequence[str],
                 log: logging.Logger) -> None:
        self.access = access
        self.client_id = client_id
        self.topics = list(topics)
        self.log = log
        self.error: str | None = None
        # a party of a secured broker may not read other inboxes
        self.reads_other_topics = not access.secure
        self._stopping = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._readers: list[KafkaReader] = []

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await prepare_topics(self.access, self.topics)
        self._producer = self._new_producer()
        await self._producer.start()

    async def stop(self) -> None:
        for reader in self._readers:
            await self.close_client(reader.consumer.stop(), "consumer")
        self._readers.clear()
        if self._producer is not None:
            await self.close_client(self._producer.stop(), "producer")
            self._producer = None

    def interrupt(self) -> None:
        self._stopping.set()

    async def close_client(self, closing: Awaitable[None], what: str) -> None:
        """A client's stop, bounded: with Kafka away a producer would wait for its unsent
        batches to expire; they are journaled, and sent again on the next start."""
        try:
            async with asyncio.timeout(CLIENT_STOP_S):
                await closing
        except TimeoutError:
            self.log.warning("the Kafka %s did not close within %.0f s (Kafka away?); leaving "
                             "it: its unacknowledged envelopes are journaled", what,
                             CLIENT_STOP_S)
        except KafkaError as exc:
            self.log.warning("the Kafka %s closed with an error: %s", what, exc)
        except asyncio.CancelledError:
            # aiokafka's consumer.stop() lets its own cancelled fetch task's CancelledError
            # out when a fetch was failing (Kafka away); ours, if it is, goes on up
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self.log.warning("the Kafka %s closed while a request to Kafka was failing", what)

    async def unless_stopped(self, work: Awaitable[T]) -> T:
        """`work`; once `interrupt()` is called, it has CLIENT_STOP_S more to finish, then it
        is cancelled and this raises Stopping (a produce with Kafka away: journaled already)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():
            await asyncio.wait({task}, timeout=CLIENT_STOP_S)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise Stopping
        return task.result()

    async def backoff(self, delay: float) -> float:
        """Wait `delay` seconds (Stopping if `interrupt()` comes first); the next, longer
        delay."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()
        if self._stopping.is_set():
            raise Stopping
        return min(delay * 2, BACKOFF_MAX_S)

    # -- clients -----------------------------------------------------------------------------
    def new_consumer(self, **extra: Any) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **self.access.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=MAX_REQUEST_BYTES * 4,
            fetch_max_bytes=64 * 1024 * 1024, client_id=self.client_id, **extra)

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self.access.aiokafka_kwargs(), enable_idempotence=True, acks="all",
            max_request_size=MAX_REQUEST_BYTES, linger_ms=0,
            request_timeout_ms=PRODUCE_TIMEOUT_MS, client_id=self.client_id)

    # -- producing ---------------------------------------------------------------------------
    async def produce(self, items: Sequence[tuple[str, bytes]], *, resend: bool = False) -> None:
        """Produce and await every ack; what failed (a broker away longer than the producer's
        own retries) is sent again, with backoff, until the broker is back.

        A failed batch can leave the idempotent producer's sequence numbers ahead of the
        broker's (a new topic's leader not elected yet, a broker restart): every later send to
        that partition then fails with OutOfOrderSequenceNumber. The producer is replaced
        then, with a new producer id; a copy that did land is an exact duplicate, which
        receivers drop."""
        todo = list(items)
        delay = BACKOFF_FIRST_S
        attempts = 0
        while todo:
            attempts += 1
            results: list[object] = []
            try:
                results = await self.unless_stopped(self._send_all(todo, resend))
            except KafkaError as exc:
                results = [exc] * len(todo)
            failed = [it for it, r in zip(todo, results, strict=True)
                      if isinstance(r, BaseException)]
            if not failed:
                self.error = None
                return
            self.error = f"produce: {len(failed)} envelopes not acknowledged"
            self.log.warning("%d of %d envelopes not acknowledged (%s); sending them again in "
                             "%.1f s", len(failed), len(todo), next(
                                 r for r in results if isinstance(r, BaseException)), delay)
            # a stall or a second failure in a row: a new producer, bootstrapped again (the
            # old one may be asking only nodes that are down; see `KafkaReader._stuck`)
            if self._producer is None or attempts >= 2 or any(
                    isinstance(r, (KafkaTimeoutError, *PRODUCER_STATE_ERRORS))
                    for r in results):
                await self._replace_producer(results)
            delay = await self.backoff(delay)  # while the broker is away
            todo = failed
            resend = True

    async def _send_all(self, items: list[tuple[str, bytes]], resend: bool) -> list[object]:
        """Send `items` and wait for their acks; each result is its record's metadata or the
        exception that failed it.

        The wait ends when no ack has come for PRODUCE_TIMEOUT_MS: the records still waiting
        count as failed (KafkaTimeoutError). aiokafka's own timeout does not cover a leader it
        cannot reach: it retries such a batch for ever."""
        if self._producer is None:
            raise KafkaConnectionError("no producer (its replacement could not start)")
        headers = [RESEND_HEADER] if resend else None  # the audit tells a re-send by it
        futures = [await self._producer.send(t, w, headers=headers) for t, w in items]
        waiting: set[asyncio.Future[Any]] = set(futures)
        while waiting:
            done, waiting = await asyncio.wait(waiting, timeout=PRODUCE_TIMEOUT_MS / 1000)
            if not done:
                break
        for f in waiting:  # left to the old producer; never awaited again
            f.add_done_callback(_retrieve)
        return [f.exception() or f.result() if f.done() else KafkaTimeoutError(
            f"no ack in {PRODUCE_TIMEOUT_MS / 1000:.0f} s") for f in futures]

    async def _replace_producer(self, results: list[object]) -> None:
        """A new producer (a new producer id) after an error that spoils the idempotent
        producer's sequence numbers. With Kafka away the new one may not start: then there is
        none until a later attempt starts one."""
        why = next((type(r).__name__ for r in results if isinstance(r, BaseException)),
                   "a failed start")
        if self._producer is not None:
            await self.close_client(self._producer.stop(), "producer")
            self._producer = None
        producer = self._new_producer()
        try:
            await self.unless_stopped(producer.start())
        except KafkaError as exc:
            self.log.warning("a new producer could not start (%s); trying again", exc)
            await self.close_client(producer.stop(), "producer")
            return
        self._producer = producer
        self.log.warning("producer replaced (new producer id) after %s", why)

    # -- reading -----------------------------------------------------------------------------
    async def open(self, topic: str) -> KafkaReader:
        consumer = self.new_consumer()
        await consumer.start()
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        start = (await consumer.beginning_offsets([tp]))[tp]
        consumer.seek(tp, start)
        reader = KafkaReader(self, consumer, tp, start)
        self._readers.append(reader)
        return reader

    async def end_offsets(self, topics: Sequence[str]) -> dict[str, int]:
        consumer = self.new_consumer()
        await consumer.start()
        try:
            tps = [TopicPartition(t, 0) for t in topics]
            ends = await consumer.end_offsets(tps)
            return {tp.topic: ends[tp] for tp in tps}
        finally:
            await self.close_client(consumer.stop(), "consumer")

    async def last_records(self, topics: Sequence[str], last: int) -> AsyncIterator[bytes]:
        async for r in read_to_end(self.access, sorted(topics), last=last):
            yield r.value

    async def group_offset(self, group: str, topic: str) -> int:
        legacy = AIOKafkaConsumer(**self.access.aiokafka_kwargs(), group_id=group,
                                  enable_auto_commit=False)
        try:
            async with asyncio.timeout(LEGACY_GROUP_S):
                await legacy.start()
                return await legacy.committed(TopicPartition(topic, 0)) or 0
        except (TimeoutError, KafkaError) as exc:
            raise RuntimeError(f"the consumer group {group}'s offset could not be read "
                               f"({type(exc).__name__}: {exc})") from exc
        finally:
            await self.close_client(legacy.stop(), "consumer of the old group")


class KafkaReader:
    """One inbox partition through a consumer that is replaced when it stops delivering."""

    def __init__(self, bus: KafkaBus, consumer: AIOKafkaConsumer, tp: TopicPartition,
                 start: int) -> None:
        self.bus = bus
        self.consumer = consumer
        self.tp = tp
        self.next = start
        self._delay = BACKOFF_FIRST_S
        self._idle_since = asyncio.get_running_loop().time()

    def seek(self, offset: int) -> None:
        self.consumer.seek(self.tp, offset)
        self.next = offset

    async def position(self) -> int:
        return self.next

    async def fetch(self, *, max_records: int, timeout_s: float) -> Fetched:
        bus = self.bus
        loop = asyncio.get_running_loop()
        probed: int | None = None
        if loop.time() - self._idle_since > STUCK_AFTER_S:
            self._idle_since = loop.time()
            probed = await self._stuck()
            if probed is None or probed > self.next:
                await self._replace_consumer()
        try:
            batch = await self.consumer.getmany(self.tp, timeout_ms=int(timeout_s * 1000),
                                                max_records=max_records)
        except KafkaError as exc:  # the fetcher retries by itself; this is what it gave up
            bus.error = f"fetch: {type(exc).__name__}: {exc}"
            bus.log.warning("fetching %s failed (%s); again in %.1f s", self.tp.topic, exc,
                            self._delay)
            self._delay = await bus.backoff(self._delay)
            return Fetched([], probed)
        self._delay = BACKOFF_FIRST_S
        records = batch.get(self.tp, [])
        if not records:  # aiokafka's fetcher hides a broker away: an empty batch
            return Fetched([], probed)
        bus.error = None
        self._idle_since = loop.time()
        self.next = records[-1].offset + 1
        return Fetched([Record(r.offset, r.value) for r in records],
                       self.consumer.highwater(self.tp))

    async def _stuck(self) -> int | None:
        """After STUCK_AFTER_S without input: the inbox's end offset, or None when the
        consumer cannot even tell. A Kafka client keeps the brokers of its last metadata and
        asks only them; when those are the nodes still down after an outage, it waits for
        them forever."""
        try:
            async with asyncio.timeout(PROBE_S):
                end: int = (await self.consumer.end_offsets([self.tp]))[self.tp]
        except (TimeoutError, KafkaError) as exc:
            self.bus.log.warning("the inbox's end offset is unknown (%s)", type(exc).__name__)
            self.bus.error = f"the inbox's end offset is unknown ({type(exc).__name__})"
            return None
        self.bus.error = None
        return end

    async def _replace_consumer(self) -> None:
        """A new consumer, bootstrapped again from every configured address, at the next
        offset; the old one stays if the new one cannot start (Kafka away)."""
        bus = self.bus
        consumer = bus.new_consumer()
        try:
            async with asyncio.timeout(PROBE_S * 2):
                await consumer.start()
        except (TimeoutError, KafkaError) as exc:
            bus.log.warning("a new consumer could not start (%s); keeping the old one",
                            type(exc).__name__)
            await bus.close_client(consumer.stop(), "consumer")
            return
        consumer.assign([self.tp])
        consumer.seek(self.tp, self.next)
        old, self.consumer = self.consumer, consumer
        await bus.close_client(old.stop(), "consumer")
        bus.log.warning("consumer replaced (bootstrapped again from %s) at offset %d",
                        bus.access.bootstrap, self.next)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (one left to a replaced producer)."""
    if not fut.cancelled():
        fut.exception()
