"""The institution agent as a `RoundService`: what the local API and the application bus run
rounds through, and where every round the institution takes part in is delivered.

Rounds requested here are kept in a results record, `<state_dir>/results/<round id>.*`: an
`.asked` marker written before the request is sent, then the round's end, written before the
inputs that ended it are committed past. A record is removed once its end has reached a client
(`taken`: the requester's answer or a subscriber's delivery written, the app bus's record
acknowledged); so a crash of the agent at any point loses no result, and one may be delivered
twice. Records found at start are delivered first, their rows by token (the customer ids of a
query live only in the agent's memory). Only rounds this agent asked for get a record: an
assignment naming it as requester of a round it never asked for leaves nothing on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.agent import Agent, RoundEnd
from agents.api.codec import outcome_json
from agents.api.service import Delivery, Refused, RoundRequest, roles
from protocol.errors import AbortReason
from protocol.machine import Ended, Outcome
from protocol.policy import ConsortiumPolicy
from protocol.tokens import (
    Tokens,
    first_duplicate,
    tokenize,
    tokens_from_bytes,
    tokens_to_bytes,
)
from zerosum.wire import ErrorCode, Role

TOKENIZE_IN_THREAD = 4096  # ids; a larger query is hashed off the event loop


class _Listener:
    """One `deliveries()` iterator: an unbounded queue (its reader, the API server, never
    blocks on it)."""

    def __init__(self, listeners: list[_Listener], first: list[Delivery]) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        for d in first:
            self.queue.put_nowait(d)
        listeners.append(self)

    def __aiter__(self) -> _Listener:
        return self

    async def __anext__(self) -> Delivery:
        return await self.queue.get()


class AgentService:
    """`RoundService` over a running institution `Agent` (call from the agent's loop)."""

    def __init__(self, agent: Agent, log: logging.Logger | None = None) -> None:
        if agent.cfg.is_coordinator or agent.cfg.consortium_key is None:
            raise ValueError("only an institution agent serves rounds")
        self.agent = agent
        self.me = agent.cfg.party
        self.log = log or agent.log
        self.records = agent.cfg.state_dir / "results"
        # round id -> the query's ids and tokens, while the round runs
        self._asked: dict[bytes, tuple[tuple[str, ...], Tokens]] = {}
        self._ended: dict[bytes, Delivery] = {}  # requested here, ended, not yet returned
        self._listeners: list[_Listener] = []
        self._taken: set[bytes] = set()  # records to remove
        self._removing: asyncio.Future[None] | None = None
        self._left_over = load_records(self.records, self.me, self.log)
        self._recorded = {d.round_id for d in self._left_over}  # ends on disk
        # rounds asked here, by their `.asked` markers: read once at start, then kept in step
        self._marked = marked_rounds(self.records)
        self.delivered = 0
        agent.listeners.append(self._on_ends)

    # -- RoundService ------------------------------------------------------------------------
    def policy(self) -> ConsortiumPolicy:
        return self.agent.party.policy

    async def submit(self, round_id: bytes, request: RoundRequest) -> Delivery:
        ids = request.customer_ids
        # the token key as of now; the request names its epoch (the key may rotate meanwhile)
        key, epoch = self.agent.cfg.consortium_key, self.agent.cfg.token_epoch
        assert key is not None
        if len(ids) > TOKENIZE_IN_THREAD:
            tokens = await asyncio.to_thread(tokenize, ids, key)
        else:
            tokens = tokenize(ids, key)
        if (dup := first_duplicate(tokens)) is not None:
            raise Refused(ErrorCode.INVALID_FIELD, f"customer id {ids[dup]!r} is in the query "
                          "twice (after normalisation)", "customer_ids")
        self._asked[round_id] = (ids, tokens)
        try:
            await asyncio.to_thread(mark_asked, self.records, round_id)
            self._marked.add(round_id)
            result = await self.agent.submit(
                round_id, tokens, participants=request.participants,
                attributes=request.attributes, scope=request.scope,
                min_holders=request.min_holders, deadline_s=request.deadline_s,
                token_epoch=epoch)
        except ValueError as exc:  # the protocol's own check of the request
            await asyncio.to_thread(remove_record, self.records, round_id)
            self._marked.discard(round_id)
            raise Refused(ErrorCode.INVALID_FIELD, str(exc)) from exc
        finally:
            self._asked.pop(round_id, None)
        assert result is not None
        delivery = self._ended.pop(round_id, None)
        if delivery is None:  # no answer from the coordinator: the agent's own abort
            delivery = Delivery(round_id, frozenset({Role.REQUESTER}), result, ids)
            await asyncio.to_thread(write_records, self.records, [delivery])
            self._recorded.add(round_id)  # removed once a client has it, like any other
            self._fan_out(delivery)
        return delivery

    def taken(self, round_id: bytes) -> None:
        if self._has_record(round_id):
            self._taken.add(round_id)
            if self._removing is None or self._removing.done():
                self._removing = asyncio.ensure_future(self._remove_taken())

    async def _remove_taken(self) -> None:
        while self._taken:
            batch, self._taken = self._taken, set()
            await asyncio.to_thread(remove_records, self.records, batch)
            self._recorded.difference_update(batch)
            self._marked.difference_update(batch)

    async def removals(self) -> None:
        """Return once the records `taken` so far are off the disk."""
        if self._removing is not None:
            await self._removing

    def _has_record(self, round_id: bytes) -> bool:
        return round_id in self._recorded

    def deliveries(self) -> AsyncIterator[Delivery]:
        """From now on; the first reader gets first the records left from before a restart
        (they stay on disk until `taken`)."""
        first, self._left_over = self._left_over, []
        if first:
            self.log.info("%d round results from before the restart delivered first",
                          len(first))
        return _Listener(self._listeners, first)

    def status(self) -> Mapping[str, Any]:
        a = self.agent
        snap = a.snapshot
        loaded = a.metrics.snapshot_loaded_at
        return {"party": self.me, "version": a.metrics.version, "ready": a.ready.is_set(),
                "kafka_available": a.kafka_error is None and (
                    a.kafka_watch is None or a.kafka_watch.available),
                "kafka_error": a.kafka_error,
                "inbox_lag": a.lag, "rounds_in_flight": len(a.party.running()),
                "data": {"rows": None if snap is None or snap.table is None else
                         len(snap.table), "loaded_at": loaded, "load_errors":
                         0 if snap is None else snap.errors},
                "delivered": self.delivered, "received": a.stats.received,
                "sent": a.stats.sent, "rejected": a.stats.rejected,
                "outcomes": a.stats.outcomes, "aborted": a.stats.aborted}

    # -- the agent's side --------------------------------------------------------------------
    async def _on_ends(self, ends: Sequence[RoundEnd]) -> None:
        """Every round this institution took part in, as it ends: the results record first
        for those it asked for (in a thread), then to every `deliveries()` reader."""
        asked = {e.result.round_id for e in ends if e.result.round_id in self._marked}
        deliveries = [self._delivery(e, e.result.round_id in asked) for e in ends]
        mine = [d for d in deliveries if d.round_id in asked]
        if mine:
            await asyncio.to_thread(write_records, self.records, mine)
            self._recorded.update(d.round_id for d in mine)
        for d in deliveries:
            if d.round_id in self._asked:
                self._ended[d.round_id] = d
            self._fan_out(d)

    def _delivery(self, end: RoundEnd, mine: bool) -> Delivery:
        """`mine`: asked by this agent, now or before a restart (its `.asked` marker): the
        requester, whatever the assignment says."""
        rid = end.result.round_id
        query = self._asked.get(rid)
        requester = self.me if mine else (
            None if end.requester == self.me else end.requester)
        names: tuple[str, ...] | None = None
        if query is not None and isinstance(end.result, Outcome):
            names = names_of(end.result.tokens, *query)
        return Delivery(rid, roles(self.me, requester or "", end.leader), end.result, names)

    def _fan_out(self, delivery: Delivery) -> None:
        self.delivered += 1
        for listener in self._listeners:
            listener.queue.put_nowait(delivery)


# -- the results record ------------------------------------------------------------------------
def _base(directory: Path, round_id: bytes) -> Path:
    return directory / round_id.hex()


def write_records(directory: Path, deliveries: Sequence[Delivery]) -> None:
    """Each delivery's round end as <rid>.json, and for a published round <rid>.tokens and
    <rid>.totals.npy, written first: the .json, renamed into place last, marks a whole
    record."""
    directory.mkdir(parents=True, exist_ok=True)
    for d in deliveries:
        base = _base(directory, d.round_id)
        if isinstance(d.result, Outcome):  # whole on disk before the .json names them
            with open(base.with_suffix(".tokens"), "wb") as fh:
                fh.write(tokens_to_bytes(d.result.tokens))
                os.fsync(fh.fileno())
            with open(base.with_suffix(".totals.npy"), "wb") as fh:
                np.save(fh, np.asarray(d.result.totals, dtype=np.int64))
                os.fsync(fh.fileno())
        meta = {**outcome_json(d.result), "roles": sorted(r.value for r in d.roles),
                "requester": d.result.requester if isinstance(d.result, Outcome) else None,
                "scales": [[a.name, a.scale, a.min, a.max] for a in d.result.attributes]
                if isinstance(d.result, Outcome) else []}
        tmp = base.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, base.with_suffix(".json"))


def mark_asked(directory: Path, round_id: bytes) -> None:
    """The `.asked` marker of a round this agent is about to request."""
    directory.mkdir(parents=True, exist_ok=True)
    _base(directory, round_id).with_suffix(".asked").touch()


def marked_rounds(directory: Path) -> set[bytes]:
    """The round ids of the `.asked` markers in `directory`."""
    found = set()
    for path in directory.glob("*.asked") if directory.is_dir() else []:
        with contextlib.suppress(ValueError):  # a file not named by a round id: not ours
            found.add(bytes.fromhex(path.stem))
    return found


def remove_record(directory: Path, round_id: bytes) -> None:
    base = _base(directory, round_id)
    for suffix in (".json", ".tokens", ".totals.npy", ".asked"):
        base.with_suffix(suffix).unlink(missing_ok=True)


def remove_records(directory: Path, round_ids: set[bytes]) -> None:
    for rid in round_ids:
        remove_record(directory, rid)


def names_of(result: Tokens, ids: tuple[str, ...], query: Tokens) -> tuple[str, ...]:
    """The customer ids of `result`'s tokens, each one of the `query` tokens of `ids`
    (numpy: a sort and a binary search, not a dict of a million byte strings)."""
    order = np.argsort(query, kind="stable")
    at = order[np.searchsorted(query[order], result)]
    return tuple(ids[i] for i in at.tolist())


def load_records(directory: Path, me: str, log: logging.Logger) -> list[Delivery]:
    """The whole records in `directory` (an unreadable one is logged and left in place)."""
    from protocol.fixedpoint import AttributeSpec

    out: list[Delivery] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            rid = bytes.fromhex(path.stem)
            meta = json.loads(path.read_text())
            result: Outcome | Ended
            if meta["status"] == "published":
                tokens: Tokens = tokens_from_bytes(path.with_suffix(".tokens").read_bytes())
                totals = np.load(path.with_suffix(".totals.npy"))
                specs = tuple(AttributeSpec(str(n), int(s), int(lo), int(hi))
                              for n, s, lo, hi in meta["scales"])
                result = Outcome(rid, tokens, totals, specs, int(meta["withheld"]),
                                 str(meta["requester"]))
            else:
                result = Ended(rid, AbortReason[meta["reason"]], str(meta["detail"]),
                               tuple(meta["culprits"]))
            if isinstance(result, Outcome) and result.totals.shape[0] != result.tokens.size:
                raise ValueError(f"{result.tokens.size} tokens and {result.totals.shape[0]} "
                                 "rows")
            out.append(Delivery(rid, frozenset(Role(r) for r in meta["roles"]), result))
        except Exception as exc:  # a torn or foreign file never stops the agent
            log.error("results record %s unreadable (%s: %s); left in place", path,
                      type(exc).__name__, exc)
    return out
