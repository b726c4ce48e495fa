"""The agent: Kafka in, the party's state machines, Kafka out. One per party, for months.

Input: the party's own inbox topic, read with a fixed assignment and no consumer group. How far
the input has been handled is kept in the state directory (`InboxPosition`), saved only after
every envelope that the inputs before it caused is acknowledged by the broker (acks=all,
idempotent producer); those envelopes are journaled on disk before they are produced
(`Outbox`). On start the agent replays its inbox from the beginning: inputs below the saved
position rebuild the rounds' state with their outputs suppressed (they are on the bus already);
later inputs are processed normally. Deadlines come from an injected clock.

Kafka away (a single broker down, a cluster without a majority) stops no loop: a produce that
is not acknowledged is sent again with backoff, a fetch that fails is tried again. `stop()`
ends those waits at once: what was journaled and not acknowledged is sent again on the next
start, and the position stays where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
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
from agents.config import ConfigError, PartyConfig, PartyFiles, file_stamp
from agents.data import DataFileError, Snapshot
from agents.health import KafkaWatch
from agents.kafka_client import prepare_topics, seek_to_read
from agents.ledger import RoundLedger
from agents.metrics import AgentMetrics
from agents.outbox import Outbox
from agents.position import InboxPosition
from agents.retired import RetiredEpochs, due
from agents.security import KafkaAccess, as_access
from protocol.audit import RESEND_HEADER
from protocol.envelope import Header, digest
from protocol.errors import AbortReason, DuplicateEnvelope, HandlingFailed
from protocol.machine import Ended, Outcome, Published, SetTimer
from protocol.messages import MaskAssignment, Scope
from protocol.party import (
    CoordinatorParty,
    Event,
    InstitutionParty,
    Outgoing,
    Rejected,
    RoundOpened,
)
from protocol.tokens import Tokens

T = TypeVar("T")
MAX_REQUEST_BYTES = 2 * 1024 * 1024
SUBMIT_MARGIN_S = 30.0  # past a round's deadline, how long `submit` waits for the abort
# errors after which the idempotent producer's state is useless: replace the producer
PRODUCER_STATE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch)
Clock = Callable[[], float]  # seconds since the epoch
CLIENT_STOP_S = 10.0  # how long a stopping agent lets its Kafka clients close before it leaves
STUCK_AFTER_S = 10.0  # a consumer idle this long while its inbox has more is rebuilt
PROBE_S = 5.0  # how long a look at the inbox's end offset may take
BACKOFF_FIRST_S = 0.2  # the first wait before a failed fetch or produce is tried again
BACKOFF_MAX_S = 5.0  # each further wait doubles, up to this
PRODUCE_TIMEOUT_MS = 20_000  # a send not acknowledged by then is sent again
LEGACY_GROUP_S = 30.0  # how long a first start under this version asks for the group's offset


class Stopping(Exception):
    """`stop()` was called while the agent waited for Kafka: leave the work in hand undone
    (it is journaled, or its input is not yet past the saved position)."""


@dataclass(frozen=True, eq=False)
class RoundEnd:
    """A round's end at this institution, with who asked for it and who led it (None where
    this institution never saw the round's assignment: it ended before reaching it here)."""

    result: Outcome | Ended
    requester: str | None
    leader: str | None


# called with each batch of round ends before the inputs that caused them are committed past:
# a listener that records them durably (the API's results record) loses none to a crash
RoundEndListener = Callable[[Sequence[RoundEnd]], Awaitable[None]]


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


@dataclass
class Stats:
    received: int = 0
    rejected: int = 0
    duplicates: int = 0
    sent: int = 0
    published: int = 0
    aborted: int = 0
    outcomes: int = 0
    replayed: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class Agent:
    """A coordinator or institution agent. `run()` until `stop()`."""

    def __init__(self, cfg: PartyConfig, *, clock: Clock = time.time,
                 log: logging.Logger | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.log = log or logging.getLogger(f"zerosum.{cfg.party}")
        self.outbox = Outbox(cfg.state_dir)
        self.ledger = RoundLedger(cfg.state_dir)
        self.position = InboxPosition(cfg.state_dir)
        # ledger entries to persist before a send: (round id, inbox offset, envelope digest)
        self._opened: list[tuple[bytes, int, bytes]] = []
        self.stats = Stats()
        self.timers: dict[bytes, int] = {}
        self.waiters: dict[bytes, asyncio.Future[Outcome | Ended]] = {}
        self.requested: set[bytes] = set()
        self.listeners: list[RoundEndListener] = []
        self._ends: list[RoundEnd] = []  # rounds ended by the inputs in hand
        self._stop = asyncio.Event()
        self._timers_changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._pending: list[Outgoing] = []
        self._replaying = False
        self.ready = asyncio.Event()  # recovered: reading its inbox
        self.serving = asyncio.Event()  # set by `agents.run.serve_party`: its doors open too
        self._progress = asyncio.Condition()  # notified after every batch of inputs
        # crash tests only: exit hard after this many produced batches, before their commit
        self._failpoint = int(os.environ.get("ZEROSUM_FAILPOINT_CRASH_AFTER_FLUSHES", "0"))
        c = cfg.consortium
        chain = self.outbox.load_chain()
        self.snapshot: Snapshot | None = None
        self.party: CoordinatorParty | InstitutionParty
        self.metrics = AgentMetrics(cfg.party, "coordinator" if cfg.is_coordinator else
                                    "institution", _version(), clock)
        self._data_seen = (0, 0)  # the snapshot's (loads, errors) the metrics have counted
        self.lag: int | None = None  # inbox records beyond what is handled, at the last fetch
        # the last fetch, probe or produce failure, until records come in or a probe works
        self.kafka_error: str | None = None
        self.kafka_watch: KafkaWatch | None = None  # set by who runs it: brokers answering?
        policy = c.round_policy()
        if cfg.is_coordinator:
            self.party = CoordinatorParty(cfg.keys, c.registry, c.id, policy, chain=chain)
        else:
            assert cfg.data is not None
            assert cfg.consortium_key is not None
            self.snapshot = Snapshot(cfg.data, c.attributes, cfg.consortium_key,
                                     epoch=cfg.token_epoch, earlier_keys=cfg.earlier_token_keys)
            self.party = InstitutionParty(cfg.keys, c.registry, c.id, coordinator=c.coordinator,
                                          table=self.snapshot.refresh(), policy=policy,
                                          chain=chain)
            self.party.set_table(self.snapshot.refresh(), cfg.token_epoch, self.snapshot.earlier)
            self._count_data()
        self.party.ledger = self.ledger.load()
        self._party_files = PartyFiles(cfg)
        # key epochs retired from an inbox position on: recorded before the inputs they
        # refuse, given to the party before it replays anything
        self.retired = RetiredEpochs(cfg.state_dir)
        self._retired = self.retired.load()
        for (who, epoch), since in self._retired.items():
            self.party.retire(who, epoch, since)
        self._live_from: int | None = None  # the first inbox position handled live
        self._rekey_failed: tuple[object, ...] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cfg = self.cfg
        if cfg.metrics_port is not None:
            port = self.metrics.serve(cfg.metrics_port)
            self.log.info("%s metrics on http://127.0.0.1:%d/metrics", cfg.party, port)
        try:
            await self._run()
        finally:
            self.metrics.close()

    async def _run(self) -> None:
        cfg = self.cfg
        await prepare_topics(cfg.kafka, [p.topic for p in cfg.consortium.registry.values()])
        self._producer = self._new_producer()
        self._consumer = self._new_consumer()
        await self._producer.start()
        try:
            await self._consumer.start()
            try:
                try:
                    await self._recover()
                except Stopping:
                    self.log.info("%s stopped while recovering", cfg.party)
                    return
                self.ready.set()
                self.log.info("%s ready on %s (topic %s)", cfg.party, cfg.bootstrap, cfg.topic)
                # each loop finishes the batch in hand (flush, commit) and returns once stop()
                # is called: nothing is cancelled half way through a produce or a commit
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._consume())
                    tg.create_task(self._timer_loop())
            finally:
                await self._close(self._consumer.stop(), "consumer")
        finally:
            if self._producer is not None:
                await self._close(self._producer.stop(), "producer")
            self.log.info("%s stopped: %s", cfg.party, self.stats)

    async def _close(self, closing: Awaitable[None], what: str) -> None:
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

    async def _unless_stopped(self, work: Awaitable[T]) -> T:
        """`work`; once `stop()` is called, it has CLIENT_STOP_S more to finish, then it is
        cancelled and this raises Stopping (a produce with Kafka away: journaled already)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stop.wait())
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

    async def _backoff(self, delay: float) -> float:
        """Wait `delay` seconds (Stopping if `stop()` comes first); the next, longer delay."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()
        if self._stop.is_set():
            raise Stopping
        return min(delay * 2, BACKOFF_MAX_S)

    async def _recover(self) -> None:
        """Re-produce journaled envelopes, then rebuild state from the inbox up to the commit."""
        assert self._consumer is not None
        pending = self.outbox.pending()
        if pending:
            landed = await self._landed({t for t, _ in pending}, len(pending))
            missing = [(t, w) for t, w in pending if digest(w) not in landed]
            self.log.info("%d journaled envelopes: %d on the bus already, re-sending %d",
                          len(pending), len(pending) - len(missing), len(missing))
            await self._produce(missing, resend=True)
            self.outbox.done(self.party.chain)
        tp = TopicPartition(self.cfg.topic, 0)
        self._consumer.assign([tp])
        # inputs whose outputs were staged are replayed quietly even if their offsets were
        # not committed (a crash between produce and commit): their envelopes are the
        # journaled ones, already re-sent above, never sealed a second time
        committed = max(await self._saved_position(tp), self.outbox.staged_through() + 1)
        self.live_from(committed)
        start = (await self._consumer.beginning_offsets([tp]))[tp]
        self._consumer.seek(tp, start)
        if committed == 0:
            return
        self._replaying = True
        self.party.sealing = False
        try:
            while True:
                batch = await self._consumer.getmany(tp, timeout_ms=1000, max_records=500)
                records = batch.get(tp, [])
                if not records:
                    if await self._consumer.position(tp) >= committed:
                        break
                    continue
                for r in records:
                    if r.offset >= committed:
                        self._consumer.seek(tp, r.offset)
                        return
                    self._handle(self.party.receive(r.value, r.offset))
                    self.stats.replayed += 1
                if records[-1].offset + 1 >= committed:
                    return
        finally:
            self._replaying = False
            self.party.sealing = True
            self._pending.clear()
            self.ledger.append(self._opened)  # rounds rebuilt but never persisted (rare)
            self._opened.clear()
            self.log.info("replayed %d inputs up to offset %d; %d rounds in flight",
                          self.stats.replayed, committed, len(self.party.running()))

    async def _saved_position(self, tp: TopicPartition) -> int:
        """The saved position; for a state directory of an earlier version that kept it only
        as the consumer group's committed offset, that offset, asked for once."""
        saved = await asyncio.to_thread(self.position.load)
        if saved is not None:
            return saved
        if self.outbox.load_chain().next_seq == 0 and not self.party.ledger:
            return 0  # a new party: nothing handled yet
        group = f"zerosum.{self.cfg.consortium.id}.{self.cfg.party}"
        legacy = AIOKafkaConsumer(**self.cfg.kafka.aiokafka_kwargs(), group_id=group,
                                  enable_auto_commit=False)
        try:
            async with asyncio.timeout(LEGACY_GROUP_S):
                await legacy.start()
                offset = await legacy.committed(tp) or 0
        except (TimeoutError, KafkaError) as exc:
            raise RuntimeError(
                f"{self.position.path} is missing and the consumer group {group}'s offset "
                f"could not be read ({type(exc).__name__}: {exc}); start again when Kafka is "
                "back") from exc
        finally:
            await self._close(legacy.stop(), "consumer of the old group")
        self.log.info("position taken from the consumer group %s: offset %d (saved from now "
                      "on in %s)", group, offset, self.position.path)
        await asyncio.to_thread(self.position.save, offset)
        return offset

    async def _landed(self, topics: set[str], pending: int) -> set[bytes]:
        """Digests of the last records of `topics`: which journaled envelopes landed.

        Only the tail can hold them: the journal is emptied after every acknowledged batch, so
        its envelopes are among the last ones this party wrote to each topic.
        On a secured broker a party may not read other inboxes: then nothing counts as landed,
        and all is sent again (a recipient drops an exact duplicate; the audit counts it)."""
        if self.cfg.kafka.secure:
            return set()
        return {digest(r.value) async for r in read_to_end(
            self.cfg.bootstrap, sorted(topics), last=pending + 10_000)}

    # -- loops -------------------------------------------------------------------------------
    async def _consume(self) -> None:
        assert self._consumer is not None
        tp = TopicPartition(self.cfg.topic, 0)
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST_S
        next_offset = await self._consumer.position(tp)
        idle_since = loop.time()
        while not self._stop.is_set():
            if loop.time() - idle_since > STUCK_AFTER_S:
                idle_since = loop.time()
                if await self._stuck(tp, next_offset):
                    await self._replace_consumer(tp, next_offset)
            try:
                batch = await self._consumer.getmany(tp, timeout_ms=200, max_records=200)
            except KafkaError as exc:  # the fetcher retries by itself; this is what it gave up
                self.kafka_error = f"fetch: {type(exc).__name__}: {exc}"
                self.log.warning("fetching %s failed (%s); again in %.1f s", tp.topic, exc,
                                 delay)
                try:
                    delay = await self._backoff(delay)
                except Stopping:
                    return
                continue
            delay = BACKOFF_FIRST_S
            records = batch.get(tp, [])
            if not records:  # aiokafka's fetcher hides a broker away: an empty batch
                continue
            self.kafka_error = None
            idle_since = loop.time()
            next_offset = records[-1].offset + 1
            self.metrics.received.inc(len(records))
            self.metrics.received_bytes.inc(sum(len(r.value) for r in records))
            if (end := self._consumer.highwater(tp)) is not None:
                self.lag = max(end - next_offset, 0)
                self.metrics.lag.set(self.lag)
            async with self._lock:
                self._refresh_data()
                for r in records:
                    self.stats.received += 1
                    self._handle(self._receive(r.value, r.offset))
                await self._deliver()
                try:
                    flushed = await self._flush(through=records[-1].offset)
                except Stopping:  # journaled; the position stays before these inputs
                    return
                if flushed and self._failpoint:
                    self._failpoint -= 1
                    if self._failpoint == 0:  # crash tests: die between produce and commit
                        self.log.warning("failpoint: exiting before the commit")
                        os._exit(137)
                await asyncio.to_thread(self.position.save, records[-1].offset + 1)
            async with self._progress:
                self._progress.notify_all()

    async def _stuck(self, tp: TopicPartition, next_offset: int) -> bool:
        """After STUCK_AFTER_S without input: does the inbox hold more than the consumer
        delivers, or can the consumer not even tell? A Kafka client keeps the brokers of its
        last metadata and asks only them (aiokafka has no re-bootstrap); when those are the
        nodes still down after an outage, it waits for them forever."""
        assert self._consumer is not None
        try:
            async with asyncio.timeout(PROBE_S):
                end = (await self._consumer.end_offsets([tp]))[tp]
        except (TimeoutError, KafkaError) as exc:
            self.log.warning("the inbox's end offset is unknown (%s)", type(exc).__name__)
            self.kafka_error = f"the inbox's end offset is unknown ({type(exc).__name__})"
            return True
        self.kafka_error = None
        self.lag = max(end - next_offset, 0)
        self.metrics.lag.set(self.lag)
        return bool(end > next_offset)

    async def _replace_consumer(self, tp: TopicPartition, next_offset: int) -> None:
        """A new consumer, bootstrapped again from every configured address, at
        `next_offset`; the old one stays if the new one cannot start (Kafka away)."""
        consumer = self._new_consumer()
        try:
            async with asyncio.timeout(PROBE_S * 2):
                await consumer.start()
        except (TimeoutError, KafkaError) as exc:
            self.log.warning("a new consumer could not start (%s); keeping the old one",
                             type(exc).__name__)
            await self._close(consumer.stop(), "consumer")
            return
        consumer.assign([tp])
        consumer.seek(tp, next_offset)
        old, self._consumer = self._consumer, consumer
        if old is not None:
            await self._close(old.stop(), "consumer")
        self.log.warning("consumer replaced (bootstrapped again from %s) at offset %d",
                         self.cfg.bootstrap, next_offset)

    def _receive(self, wire: bytes, offset: int) -> list[Event]:
        """One record into the party. The party never raises on input; should it all the
        same, the record is rejected and counted here, and committed past like any other."""
        try:
            return self.party.receive(wire, offset)
        except Exception as exc:
            return [Rejected(HandlingFailed(f"{type(exc).__name__}: {exc}"[:1024]))]

    async def _timer_loop(self) -> None:
        while not self._stop.is_set():
            now_ms = int(self.clock() * 1000)
            due = [rid for rid, at in self.timers.items() if at <= now_ms]
            if due:
                async with self._lock:
                    for rid in due:
                        self.timers.pop(rid, None)
                        self._handle(self.party.deadline(rid))
                    await self._deliver()
                    try:
                        await self._flush()
                    except Stopping:
                        return
                continue
            wait = min((at - now_ms for at in self.timers.values()), default=1000) / 1000
            self._timers_changed.clear()
            try:
                async with asyncio.timeout(min(max(wait, 0.01), 1.0)):
                    await self._timers_changed.wait()
            except TimeoutError:
                pass

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Return once `predicate()` holds after a batch of inputs; TimeoutError after
        `timeout_s` (for operators' tools and tests: no polling, no sleeping)."""
        async with asyncio.timeout(timeout_s), self._progress:
            await self._progress.wait_for(predicate)

    # -- requests (institutions) -------------------------------------------------------------
    async def submit(self, round_id: bytes, query: Tokens, *, participants: tuple[str, ...],
                     attributes: tuple[str, ...], scope: Scope = Scope.INTERSECTION,
                     min_holders: int = 1, timeout_s: float | None = None,
                     wait: bool = True, deadline_ms: int | None = None,
                     token_epoch: int | None = None) -> Outcome | Ended | None:
        """Ask the coordinator for a round; with `wait`, return its outcome or abort.

        A fixed `deadline_ms` makes a repeated request (after a crash) identical to the first,
        which the coordinator then takes as the same request. `query` is under the token key
        of `token_epoch` (default: `cfg.consortium_key`'s, as of the call)."""
        party = self.party
        if not isinstance(party, InstitutionParty):
            raise TypeError("only an institution requests rounds")
        if token_epoch is None:  # before a reload: the key the caller just tokenized with
            token_epoch = self.cfg.token_epoch
        self._refresh_consortium()
        timeout_s = timeout_s or self.cfg.consortium.policy.deadline_s
        if deadline_ms is None:
            deadline_ms = int((self.clock() + timeout_s) * 1000)
        fut: asyncio.Future[Outcome | Ended] = asyncio.get_running_loop().create_future()
        async with self._lock:
            request = party.request(round_id, query, participants=participants,
                                    attributes=attributes, deadline_ms=deadline_ms,
                                    scope=scope, min_holders=min_holders,
                                    token_epoch=token_epoch)  # or ValueError
            self.waiters[round_id] = fut
            self.requested.add(round_id)
            self._handle(request)
            await self._flush()
        self.log.info("requested round %s: %d customers, %d participants, scope %s",
                      round_id.hex(), query.size, len(participants), scope)
        if not wait:
            return None
        # bounded: a coordinator that drops the request (refused id, bad signature) never
        # answers; the round's own deadline plus a margin ends the wait here
        wait_s = max(deadline_ms / 1000 - self.clock(), 0) + SUBMIT_MARGIN_S
        try:
            async with asyncio.timeout(wait_s):
                return await fut
        except TimeoutError:
            self.waiters.pop(round_id, None)
            self.requested.discard(round_id)
            return Ended(round_id, AbortReason.TIMEOUT,
                         f"no answer from the coordinator {wait_s:.0f} s after the request "
                         "(it may have refused the request without a reply)", ())

    # -- events ------------------------------------------------------------------------------
    def _refresh_data(self) -> None:
        self._refresh_consortium()
        if self.snapshot is not None and isinstance(self.party, InstitutionParty):
            self.party.set_table(self.snapshot.refresh(), self.snapshot.epoch,
                                 self.snapshot.earlier)
            self._count_data()

    def _count_data(self) -> None:
        snap = self.snapshot
        if snap is None or (snap.loads, snap.errors) == self._data_seen:
            return
        if snap.loads != self._data_seen[0] and snap.table is not None:
            self.metrics.snapshot(len(snap.table))
        self.metrics.data_errors.inc(snap.errors - self._data_seen[1])
        self._data_seen = (snap.loads, snap.errors)

    def _refresh_consortium(self) -> None:
        """Parties added to or removed from consortium.toml, a changed policy, rotated keys
        (anyone's; this party's own private keys of the epoch the file lists) and, at an
        institution, a rotated token key take effect for rounds that start from now on,
        without a restart (rounds in flight keep their assignment, and past key epochs in
        their grace still verify and open). Past key epochs retired by the file or by the
        clock are recorded from the next inbox position (`_record_retirements`)."""
        try:
            cfg = self._party_files.refresh()
        except ConfigError as exc:
            self.log.error("%s; keeping the consortium and keys as they were", exc)
            cfg = None
        if cfg is not None:
            self._reload(cfg)
        self._rekey_tokens()
        self._record_retirements()

    def _reload(self, cfg: PartyConfig) -> None:
        # the token keys in use stay until the data loads under the new ones (_rekey_tokens)
        self.cfg = dataclasses.replace(cfg, consortium_key=self.cfg.consortium_key,
                                       token_epoch=self.cfg.token_epoch,
                                       earlier_token_keys=self.cfg.earlier_token_keys)
        new = cfg.consortium
        party = self.party
        party.registry.clear()  # the dict the inbox shares: update it in place
        party.registry.update(new.registry)
        party.rekey(cfg.keys)
        party.policy = new.round_policy()
        if isinstance(party, InstitutionParty):
            party.attributes = party.policy.attributes
        self.log.info("consortium file reloaded: %d institutions (%s); key epoch %d",
                      len(new.institutions), ", ".join(new.institutions), cfg.keys.epoch)

    def _rekey_tokens(self) -> None:
        """Take the token keys of the consortium key file on disk, tried again (whenever the
        data file or the key file changed) until the data loads under them: a table is never
        labelled with an epoch its tokens are not under."""
        disk, snap = self._party_files.cfg, self.snapshot
        if snap is None or disk.consortium_key is None or (
                disk.token_epoch, disk.consortium_key, disk.earlier_token_keys) == (
                snap.epoch, snap.key, snap.earlier_keys):
            return
        attempt = (disk.token_epoch, file_stamp(snap.path), file_stamp(disk.consortium_key_path))
        if attempt == self._rekey_failed:
            return
        try:
            snap.rekey(disk.token_epoch, disk.consortium_key, disk.earlier_token_keys)
        except DataFileError as exc:
            self._rekey_failed = attempt
            self.log.error("%s; keeping token key epoch %d until the data file loads", exc,
                           snap.epoch)
            return
        self._rekey_failed = None
        self.cfg = dataclasses.replace(self.cfg, consortium_key=disk.consortium_key,
                                       token_epoch=disk.token_epoch,
                                       earlier_token_keys=disk.earlier_token_keys)
        if isinstance(self.party, InstitutionParty) and snap.table is not None:
            self.party.set_table(snap.table, snap.epoch, snap.earlier)
        self.log.info("token key epoch %d", snap.epoch)

    def live_from(self, position: int) -> None:
        """Inputs from inbox `position` on are handled live (those below it are replayed):
        retirements not recorded yet are recorded from there."""
        self._live_from = position
        self._record_retirements()

    def _record_retirements(self) -> None:
        """Past key epochs that the consortium file retires, or whose grace_until this
        agent's clock has passed, are retired from the next inbox position: recorded in the
        state directory (fsync'ed) before any further input is handled. Not before the agent
        knows where its live input starts (`live_from`)."""
        if self._live_from is None:
            return
        new = due(self.cfg.consortium, self.clock()) - self._retired.keys()
        if not new:
            return
        since = max(self._live_from, self.party.next_position)
        records = self._retired | {k: since for k in new}
        self.retired.save(records)
        self._retired = records
        for who, epoch in sorted(new):
            self.party.retire(who, epoch, since)
            self.log.info("key epoch %d of %s retired from inbox position %d", epoch, who,
                          since)

    def _handle(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Outgoing):
                if not self._replaying:
                    self._pending.append(e)
                    self.metrics.stage(e.round_id, _kind(e.wires[0]))
            elif isinstance(e, RoundOpened):
                self._opened.append((e.round_id, e.position, e.envelope))
                if not self._replaying:
                    self.metrics.round_opened(e.round_id)
            elif isinstance(e, SetTimer):
                self.timers[e.round_id] = self._bounded(e)
                self._timers_changed.set()
            elif isinstance(e, Rejected):
                if isinstance(e.error, DuplicateEnvelope):
                    self.stats.duplicates += 1
                    if not self._replaying:
                        self.metrics.duplicates.inc()
                    continue
                name = type(e.error).__name__
                self.stats.rejected += 1
                if not self._replaying:
                    self.metrics.rejected.labels(name).inc()
                self.stats.rejected_by_reason[name] = self.stats.rejected_by_reason.get(name,
                                                                                        0) + 1
                if not self._replaying:
                    self.log.warning("rejected input: %s: %s", name, e.error)
            elif isinstance(e, Published):
                self.timers.pop(e.round_id, None)
                self.stats.published += 1
                if not self._replaying:
                    self.metrics.round_ended(e.round_id, "published")
                    self.log.info("round %s published: %d rows, %d kept", e.round_id.hex(),
                                  e.rows, e.kept)
            elif isinstance(e, Ended):
                self.timers.pop(e.round_id, None)
                self.stats.aborted += 1
                if not self._replaying:
                    self.metrics.round_ended(e.round_id, "aborted", e.reason.name)
                    self.log.warning("round %s aborted: %s: %s", e.round_id.hex(),
                                     e.reason.name, e.detail)
                    self._ends.append(self._round_end(e))
            elif isinstance(e, Outcome):
                self.timers.pop(e.round_id, None)
                self.stats.outcomes += 1
                if not self._replaying:
                    self.metrics.round_ended(e.round_id, "result")
                    self.log.info("round %s result: %d rows (%d withheld)", e.round_id.hex(),
                                  e.tokens.size, e.withheld)
                    self._ends.append(self._round_end(e))

    def _bounded(self, timer: SetTimer) -> int:
        """The timer's time, at most `[policy] max_deadline_s` from now: a request (a hostile
        member's) cannot keep a round open at every party for ever with a far deadline."""
        limit = int((self.clock() + self.cfg.consortium.policy.max_deadline_s) * 1000)
        if timer.at_ms <= limit:
            return timer.at_ms
        if not self._replaying:
            self.log.warning("round %s asks for a deadline %.0f s away; it ends within "
                             "max_deadline_s (%.0f s)", timer.round_id.hex(),
                             timer.at_ms / 1000 - self.clock(),
                             self.cfg.consortium.policy.max_deadline_s)
        return limit

    def _round_end(self, result: Outcome | Ended) -> RoundEnd:
        m = self.party.rounds.get(result.round_id)
        a = getattr(m, "assignment", None)
        if isinstance(a, MaskAssignment):
            return RoundEnd(result, a.requester, a.leader)
        if isinstance(result, Outcome):
            return RoundEnd(result, result.requester, None)
        return RoundEnd(result, self.cfg.party if result.round_id in self.requested else None,
                        None)

    async def _deliver(self) -> None:
        """Hand the rounds ended by the inputs in hand to the listeners, then wake the
        `submit`s waiting for them. Called before those inputs' outputs are journaled, so a
        crash at any point delivers them again (at least once), never not at all."""
        ends, self._ends = self._ends, []
        if not ends:
            return
        for listener in self.listeners:
            try:
                await listener(ends)
            except Exception:  # a listener's failure never stops the agent
                self.log.exception("a round-end listener failed")
        for end in ends:
            rid = end.result.round_id
            self.requested.discard(rid)
            fut = self.waiters.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(end.result)

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **self.cfg.kafka.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=MAX_REQUEST_BYTES * 4,
            fetch_max_bytes=64 * 1024 * 1024, client_id=f"zerosum-{self.cfg.party}")

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self.cfg.kafka.aiokafka_kwargs(), enable_idempotence=True, acks="all",
            max_request_size=MAX_REQUEST_BYTES, linger_ms=0,
            request_timeout_ms=PRODUCE_TIMEOUT_MS, client_id=f"zerosum-{self.cfg.party}")

    async def _produce(self, items: list[tuple[str, bytes]], *, resend: bool = False) -> None:
        """Produce and await every ack; what failed (a broker away longer than the producer's
        own retries) is sent again, with backoff, until the broker is back.

        A failed batch can leave the idempotent producer's sequence numbers ahead of the
        broker's (a new topic's leader not elected yet, a broker restart): every later send to
        that partition then fails with OutOfOrderSequenceNumber. The producer is replaced
        then, with a new producer id; a copy that did land is an exact duplicate, which
        receivers drop."""
        delay = BACKOFF_FIRST_S
        attempts = 0
        while items:
            attempts += 1
            results: list[object] = []
            try:
                results = await self._unless_stopped(self._send_all(items, resend))
            except KafkaError as exc:
                results = [exc] * len(items)
            failed = [it for it, r in zip(items, results, strict=True)
                      if isinstance(r, BaseException)]
            if not failed:
                self.kafka_error = None
                return
            self.kafka_error = f"produce: {len(failed)} envelopes not acknowledged"
            self.log.warning("%d of %d envelopes not acknowledged (%s); sending them again in "
                             "%.1f s", len(failed), len(items), next(
                                 r for r in results if isinstance(r, BaseException)), delay)
            # a stall or a second failure in a row: a new producer, bootstrapped again (the
            # old one may be asking only nodes that are down; see `_stuck`)
            if self._producer is None or attempts >= 2 or any(
                    isinstance(r, (KafkaTimeoutError, *PRODUCER_STATE_ERRORS))
                    for r in results):
                await self._replace_producer(results)
            delay = await self._backoff(delay)  # while the broker is away
            items = failed
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
            await self._close(self._producer.stop(), "producer")
            self._producer = None
        producer = self._new_producer()
        try:
            await self._unless_stopped(producer.start())
        except KafkaError as exc:
            self.log.warning("a new producer could not start (%s); trying again", exc)
            await self._close(producer.stop(), "producer")
            return
        self._producer = producer
        self.log.warning("producer replaced (new producer id) after %s", why)

    async def _flush(self, through: int | None = None) -> bool:
        """Persist new round ids, then journal, produce and await acks for everything the
        last inputs (up to inbox offset `through`) caused."""
        if self._opened:
            await asyncio.to_thread(self.ledger.append, list(self._opened))
            self._opened.clear()
        if not self._pending:
            return False
        items = [(o.topic, w) for o in self._pending for w in o.wires]
        self._pending.clear()
        await asyncio.to_thread(self.outbox.stage, items, through)
        self.metrics.outbox_pending.set(len(items))
        await self._produce(items)
        self.stats.sent += len(items)
        self.metrics.sent.inc(len(items))
        self.metrics.sent_bytes.inc(sum(len(w) for _, w in items))
        self.outbox.done(self.party.chain)
        self.metrics.outbox_pending.set(0)
        return True


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (one left to a replaced producer)."""
    if not fut.cancelled():
        fut.exception()


def _kind(wire: bytes) -> str:
    """The message kind of an envelope this agent sealed (a metrics label)."""
    try:
        return Header.decode(msgpack.unpackb(wire)[1]).kind.name.lower()
    except Exception:  # never: the agent sealed it; a label is not worth a failure
        return "unknown"


def _version() -> str:
    try:
        return importlib.metadata.version("zerosum")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
