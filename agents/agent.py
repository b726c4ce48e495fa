"""The agent: Kafka in, the party's state machines, Kafka out. One per party, for months.

Input: the party's own inbox topic, read with a fixed assignment and no consumer group. How far
the input has been handled is kept in the state directory (`InboxPosition`), saved only after
every envelope that the inputs before it caused is acknowledged by the broker (acks=all,
idempotent producer); those envelopes are journaled on disk before they are produced
(`Outbox`). On start the agent replays its inbox from the beginning: inputs below the saved
position rebuild the rounds' state with their outputs suppressed (they are on the bus already);
later inputs are processed normally.

The bus (`agents.bus.Bus`: Kafka, or the in-process one of the tests) and the clock
(`agents.clock.Clock`: deadlines) are given to it; what differs between the coordinator and an
institution is its role (`agents.roles`). `stop()` ends every wait for an absent bus at once:
what was journaled and not acknowledged is sent again on the next start, and the position
stays where it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from agents.bus import Bus, Reader, Stopping
from agents.clock import Clock, SystemClock
from agents.config import ConfigError, PartyConfig, PartyFiles, file_stamp
from agents.data import DataFileError, Snapshot
from agents.health import KafkaWatch
from agents.ledger import RoundLedger
from agents.metrics import AgentMetrics
from agents.outbox import Outbox
from agents.position import InboxPosition
from agents.retired import RetiredEpochs, due
from agents.roles import CoordinatorRole, InstitutionRole, Role
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

SUBMIT_MARGIN_S = 30.0  # past a round's deadline, how long `submit` waits for the abort
FETCH_WAIT_S = 0.2  # how long one fetch of the inbox waits for records (then `stop()` is seen)


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


class FailpointCrash(Exception):
    """An in-process agent reached its failpoint: it stops as a crash would, after a produce
    and before the commit (crash tests)."""


@dataclass
class Failpoint:
    """Crash tests only: after `flushes` produced batches, before their commit, the agent dies:
    the process exits (137) or, `in_process`, `run()` raises FailpointCrash. 0: never."""

    flushes: int = 0
    in_process: bool = False

    @classmethod
    def from_env(cls) -> Failpoint:
        return cls(int(os.environ.get("ZEROSUM_FAILPOINT_CRASH_AFTER_FLUSHES", "0")))

    def passed_flush(self, log: logging.Logger) -> None:
        if self.flushes <= 0:
            return
        self.flushes -= 1
        if self.flushes == 0:
            log.warning("failpoint: exiting before the commit")
            if self.in_process:
                raise FailpointCrash
            os._exit(137)


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

    def __init__(self, cfg: PartyConfig, *, bus: Bus | None = None, clock: Clock | None = None,
                 log: logging.Logger | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
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
        self.failpoint = Failpoint.from_env()
        c = cfg.consortium
        role = CoordinatorRole if cfg.is_coordinator else InstitutionRole
        self.metrics = AgentMetrics(cfg.party, role.name, _version(), self.clock.now)
        self.role: Role = role(cfg, self.outbox.load_chain(), self.metrics)
        self.party: CoordinatorParty | InstitutionParty = self.role.party
        self.lag: int | None = None  # inbox records beyond what is handled, at the last fetch
        self.kafka_watch: KafkaWatch | None = None  # set by who runs it: brokers answering?
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
        if bus is None:
            from agents.kafka_bus import KafkaBus  # aiokafka: only for an agent on Kafka

            bus = KafkaBus(cfg.kafka, client_id=f"zerosum-{cfg.party}",
                           topics=[p.topic for p in c.registry.values()], log=self.log)
        self.bus: Bus = bus

    @property
    def snapshot(self) -> Snapshot | None:
        """An institution's data as last loaded (None for the coordinator)."""
        return self.role.snapshot

    @snapshot.setter
    def snapshot(self, snapshot: Snapshot | None) -> None:
        self.role.snapshot = snapshot

    @property
    def kafka_error(self) -> str | None:
        """The last fetch, probe or produce failure, until records come in or a probe works."""
        return self.bus.error

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self.bus.interrupt()

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
        await self.bus.start()
        try:
            inbox = await self.bus.open(cfg.topic)
            try:
                await self._recover(inbox)
            except Stopping:
                self.log.info("%s stopped while recovering", cfg.party)
                return
            self.ready.set()
            self.log.info("%s ready on %s (topic %s)", cfg.party, cfg.bootstrap, cfg.topic)
            # each loop finishes the batch in hand (flush, commit) and returns once stop() is
            # called: nothing is cancelled half way through a produce or a commit
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume(inbox))
                tg.create_task(self._timer_loop())
        finally:
            await self.bus.stop()
            self.log.info("%s stopped: %s", cfg.party, self.stats)

    async def _recover(self, inbox: Reader) -> None:
        """Re-produce journaled envelopes, then rebuild state from the inbox up to the commit."""
        pending = self.outbox.pending()
        if pending:
            landed = await self._landed({t for t, _ in pending}, len(pending))
            missing = [(t, w) for t, w in pending if digest(w) not in landed]
            self.log.info("%d journaled envelopes: %d on the bus already, re-sending %d",
                          len(pending), len(pending) - len(missing), len(missing))
            await self.bus.produce(missing, resend=True)
            self.outbox.done(self.party.chain)
        # inputs whose outputs were staged are replayed quietly even if their offsets were
        # not committed (a crash between produce and commit): their envelopes are the
        # journaled ones, already re-sent above, never sealed a second time
        committed = max(await self._saved_position(), self.outbox.staged_through() + 1)
        self.live_from(committed)
        if committed == 0:
            return
        self._replaying = True
        self.party.sealing = False
        try:
            while True:
                fetched = await inbox.fetch(max_records=500, timeout_s=1.0)
                if not fetched.records:
                    if await inbox.position() >= committed:
                        break
                    continue
                for r in fetched.records:
                    if r.offset >= committed:
                        inbox.seek(r.offset)
                        return
                    self._handle(self.party.receive(r.value, r.offset))
                    self.stats.replayed += 1
                if fetched.records[-1].offset + 1 >= committed:
                    return
        finally:
            self._replaying = False
            self.party.sealing = True
            self._pending.clear()
            self.ledger.append(self._opened)  # rounds rebuilt but never persisted (rare)
            self._opened.clear()
            self.log.info("replayed %d inputs up to offset %d; %d rounds in flight",
                          self.stats.replayed, committed, len(self.party.running()))

    async def _saved_position(self) -> int:
        """The saved position; for a state directory of an earlier version that kept it only
        as the consumer group's committed offset, that offset, asked for once."""
        saved = await asyncio.to_thread(self.position.load)
        if saved is not None:
            return saved
        if self.outbox.load_chain().next_seq == 0 and not self.party.ledger:
            return 0  # a new party: nothing handled yet
        group = f"zerosum.{self.cfg.consortium.id}.{self.cfg.party}"
        try:
            offset = await self.bus.group_offset(group, self.cfg.topic)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.position.path} is missing and {exc}; start again when "
                               "Kafka is back") from exc
        self.log.info("position taken from the consumer group %s: offset %d (saved from now "
                      "on in %s)", group, offset, self.position.path)
        await asyncio.to_thread(self.position.save, offset)
        return offset

    async def _landed(self, topics: set[str], pending: int) -> set[bytes]:
        """Digests of the last records of `topics`: which journaled envelopes landed.

        Only the tail can hold them: the journal is emptied after every acknowledged batch, so
        its envelopes are among the last ones this party wrote to each topic.
        A party that may not read other inboxes (a secured broker) counts none as landed, and
        sends all again (a recipient drops an exact duplicate; the audit counts it)."""
        if not self.bus.reads_other_topics:
            return set()
        return {digest(v) async for v in self.bus.last_records(sorted(topics),
                                                               pending + 10_000)}

    # -- loops -------------------------------------------------------------------------------
    async def _consume(self, inbox: Reader) -> None:
        while not self._stop.is_set():
            try:
                fetched = await inbox.fetch(max_records=200, timeout_s=FETCH_WAIT_S)
            except Stopping:
                return
            records = fetched.records
            if fetched.end is not None:
                self.lag = max(fetched.end - await inbox.position(), 0)
                self.metrics.lag.set(self.lag)
            if not records:
                continue
            self.metrics.received.inc(len(records))
            self.metrics.received_bytes.inc(sum(len(r.value) for r in records))
            async with self._lock:
                await self._refresh_data()
                for r in records:
                    self.stats.received += 1
                    self._handle(self._receive(r.value, r.offset))
                await self._deliver()
                try:
                    flushed = await self._flush(through=records[-1].offset)
                except Stopping:  # journaled; the position stays before these inputs
                    return
                if flushed:
                    self.failpoint.passed_flush(self.log)
                await asyncio.to_thread(self.position.save, records[-1].offset + 1)
            async with self._progress:
                self._progress.notify_all()

    def _receive(self, wire: bytes, offset: int) -> list[Event]:
        """One record into the party. The party never raises on input; should it all the
        same, the record is rejected and counted here, and committed past like any other."""
        try:
            return self.party.receive(wire, offset)
        except Exception as exc:
            return [Rejected(HandlingFailed(f"{type(exc).__name__}: {exc}"[:1024]))]

    async def _timer_loop(self) -> None:
        """Each round's timer fires once the clock passes it. In between this waits on the
        clock for the earliest timer, woken early when the timers change or the agent stops:
        nothing here waits in real time but the clock itself."""
        while not self._stop.is_set():
            now = self.clock.now()
            due = [rid for rid, at in self.timers.items() if at / 1000 <= now]
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
            self._timers_changed.clear()
            waits: set[asyncio.Future[object]] = {
                asyncio.ensure_future(self._timers_changed.wait()),
                asyncio.ensure_future(self._stop.wait())}
            if self.timers:
                waits.add(asyncio.ensure_future(
                    self.clock.sleep_until(min(self.timers.values()) / 1000)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Return once `predicate()` holds after a batch of inputs; TimeoutError after
        `timeout_s` (for operators' tools and tests: no polling, no sleeping)."""
        async with asyncio.timeout(timeout_s), self._progress:
            await self._progress.wait_for(predicate)

    # -- requests (institutions) -------------------------------------------------------------
    async def submit(self, round_id: bytes, query: Tokens, *, participants: tuple[str, ...],
                     attributes: tuple[str, ...], scope: Scope = Scope.INTERSECTION,
                     min_holders: int = 1, deadline_s: float | None = None,
                     wait: bool = True, deadline_ms: int | None = None,
                     token_epoch: int | None = None) -> Outcome | Ended | None:
        """Ask the coordinator for a round; with `wait`, return its outcome or abort.

        The round's deadline is `deadline_s` from now (default: the policy's `deadline_s`), or
        `deadline_ms` (ms since the epoch): a fixed one makes a repeated request (after a
        crash) identical to the first, which the coordinator then takes as the same request.
        `query` is under the token key of `token_epoch` (default: `cfg.consortium_key`'s, as
        of the call). The wait is bounded: a coordinator that drops the request (a refused
        id, a bad signature) never answers; SUBMIT_MARGIN_S past the deadline, on the agent's
        clock, this returns a TIMEOUT abort of its own."""
        party = self.role.requester()  # TypeError for the coordinator
        if token_epoch is None:  # before a reload: the key the caller just tokenized with
            token_epoch = self.cfg.token_epoch
        self._refresh_consortium()
        if deadline_ms is None:
            deadline_s = deadline_s or self.cfg.consortium.policy.deadline_s
            deadline_ms = int((self.clock.now() + deadline_s) * 1000)
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
        give_up = asyncio.ensure_future(
            self.clock.sleep_until(deadline_ms / 1000 + SUBMIT_MARGIN_S))
        try:
            either: list[asyncio.Future[Any]] = [fut, give_up]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            give_up.cancel()
        if fut.done():
            return fut.result()
        self.waiters.pop(round_id, None)
        self.requested.discard(round_id)
        return Ended(round_id, AbortReason.TIMEOUT,
                     f"no answer from the coordinator {SUBMIT_MARGIN_S:.0f} s past the round's "
                     "deadline (it may have refused the request without a reply)", ())

    # -- events ------------------------------------------------------------------------------
    async def _refresh_data(self) -> None:
        """The consortium file and (an institution's) data file, read again if they
        changed."""
        self._refresh_consortium()
        await self.role.refresh_data()

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
        self.role.set_policy(new.round_policy())
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
        new = due(self.cfg.consortium, self.clock.now()) - self._retired.keys()
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
        limit = int((self.clock.now() + self.cfg.consortium.policy.max_deadline_s) * 1000)
        if timer.at_ms <= limit:
            return timer.at_ms
        if not self._replaying:
            self.log.warning("round %s asks for a deadline %.0f s away; it ends within "
                             "max_deadline_s (%.0f s)", timer.round_id.hex(),
                             timer.at_ms / 1000 - self.clock.now(),
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
        await self.bus.produce(items)
        self.stats.sent += len(items)
        self.metrics.sent.inc(len(items))
        self.metrics.sent_bytes.inc(sum(len(w) for _, w in items))
        self.outbox.done(self.party.chain)
        self.metrics.outbox_pending.set(0)
        return True


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
