"""Audit: records replayed from the topics in; findings and one report per round out. Pure.

With public keys only: every signature (with the sender's key of the epoch the envelope names:
the consortium file keeps every past epoch's public keys), that no sender signs with an older
key epoch after a newer one along its chain; that each envelope sits in its recipient's topic; each
sender's sequence numbers and hash chain across all topics (a gap, a fork or a reorder is named
with its topic, partition and offset); and each round's transcript against the protocol: one
request, masks to the participants, the query to one leader, shares from the leader,
contributions from the others, and exactly one outcome.

With the coordinator's key: the requests, shares and contributions it received are decrypted,
added again, and compared with the result it published (its receipt); a timeout abort must come
after the deadline. With an institution's key: that institution's own view of each round.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from protocol.codec import decode
from protocol.envelope import Header, PrivateParty, PublicParty, open_sealed, unpad, verify
from protocol.errors import AbortReason, TotalOutOfRange, ZerosumError
from protocol.fixedpoint import AttributeSpec, decode_totals
from protocol.messages import (
    Contribution,
    CoordinatorShare,
    LeaderShare,
    MaskAssignment,
    Message,
    MessageKind,
    RoundAbort,
    RoundRequest,
    RoundResult,
)
from protocol.ring import U64, sum_matrices


@dataclass(frozen=True, order=True)
class Location:
    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


# the Kafka record header on an envelope a sender produces again (its bytes unchanged)
RESEND_HEADER = ("zerosum-resend", b"1")


@dataclass(frozen=True)
class Record:
    """One record read back from a topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    resent: bool = False  # the record header of a sender's re-send (`RESEND_HEADER`)

    @property
    def location(self) -> Location:
        return Location(self.topic, self.partition, self.offset)


@dataclass(frozen=True)
class Finding:
    """A failed check, where it was found, and what is wrong; the round its envelope names
    (None when the envelope could not be verified, so its header is not to be believed)."""

    location: Location | None
    check: str
    detail: str
    round_id: bytes | None = None

    def __str__(self) -> str:
        return f"{self.location or '-'}: {self.check}: {self.detail}"

    def as_dict(self) -> dict[str, object]:
        return {"location": None if self.location is None else str(self.location),
                "check": self.check, "detail": self.detail,
                "round_id": None if self.round_id is None else self.round_id.hex()}


@dataclass
class _Msg:
    """One message of a round: its envelopes (one per part) as read, with their times and
    sizes."""

    sender: str
    recipient: str
    kind: MessageKind
    seq: int
    parts: int
    ts: int
    location: Location
    chunks: dict[int, bytes] = field(default_factory=dict)
    last_ts: int = 0
    size: int = 0  # bytes of the records read, every part
    locations: list[Location] = field(default_factory=list)  # of each part read
    round_id: bytes = b""

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind.name, "sender": self.sender, "recipient": self.recipient,
                "seq": self.seq, "parts": self.parts, "parts_read": len(self.locations),
                "first_ms": self.ts, "last_ms": self.last_ts, "bytes": self.size,
                "location": str(self.location),
                "locations": [str(loc) for loc in self.locations]}


@dataclass
class RoundReport:
    round_id: bytes
    first_ms: int = 0
    last_ms: int = 0
    requester: str = ""
    participants: tuple[str, ...] = ()
    leader: str = ""
    rows: int | None = None
    outcome: str = "open"  # published | aborted | open
    reason: str = ""
    verified: str = "transcript"
    findings: list[Finding] = field(default_factory=list)
    messages: list[_Msg] = field(default_factory=list, repr=False)

    @property
    def latency_ms(self) -> int:
        return self.last_ms - self.first_ms

    @property
    def size(self) -> int:
        """Bytes of every record of the round's messages."""
        return sum(m.size for m in self.messages)

    def as_dict(self) -> dict[str, object]:
        return {"round_id": self.round_id.hex(), "requester": self.requester,
                "participants": list(self.participants), "leader": self.leader,
                "rows": self.rows, "outcome": self.outcome, "reason": self.reason,
                "first_ms": self.first_ms, "last_ms": self.last_ms,
                "latency_ms": self.latency_ms, "bytes": self.size, "verified": self.verified,
                "findings": [f.as_dict() for f in self.findings],
                "messages": [m.as_dict() for m in self.messages]}


@dataclass
class _Chain:
    next_seq: int = 0
    last_digest: bytes = b""
    started: bool = False
    pending: dict[int, tuple[bytes, bytes, Location, bytes, int]] = field(default_factory=dict)
    epoch: int = 0  # the sender's key epoch, along its chain: it never goes back
    epoch_seq: int = 0  # the first envelope of the chain under `epoch`
    seen: dict[int, bytes] = field(default_factory=dict)  # recent seq -> digest (forks)
    marked: set[int] = field(default_factory=set)  # of `seen`: the copy read was a re-send


@dataclass
class Report:
    rounds: list[RoundReport]
    findings: list[Finding]
    envelopes: int
    duplicates: int
    coordinator: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings and all(not r.findings for r in self.rounds)

    def all_findings(self) -> list[Finding]:
        return self.findings + [f for r in self.rounds for f in r.findings]


class Auditor:
    """Feed records in timestamp order (roughly: chains tolerate reordering across topics)."""

    SEEN_WINDOW = 100_000

    def __init__(self, registry: dict[str, PublicParty], consortium: str, coordinator: str, *,
                 key: PrivateParty | None = None,
                 attributes: dict[str, AttributeSpec] | None = None,
                 from_start: bool = True) -> None:
        self.registry = registry
        self.consortium = consortium
        self.coordinator = coordinator
        self.key = key
        self.attributes = attributes or {}
        self.from_start = from_start
        self.findings: list[Finding] = []
        self.rounds: dict[bytes, RoundReport] = {}
        self._chains: dict[str, _Chain] = defaultdict(_Chain)
        self._topic_last: dict[tuple[str, str], int] = {}
        self._messages: dict[tuple[str, int], _Msg] = {}
        self._digests: dict[tuple[str, int], bytes] = {}
        self.envelopes = 0
        self.duplicates = 0

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, rec: Record) -> None:
        loc = rec.location
        try:
            v = verify(rec.value, self.registry, self.consortium)
        except ZerosumError as exc:
            self.findings.append(Finding(loc, "envelope", f"{type(exc).__name__}: {exc}"))
            return
        h = v.header
        self.envelopes += 1
        owner = self.registry.get(h.recipient)
        if owner is None or owner.topic != rec.topic:
            self.findings.append(Finding(loc, "topic", f"envelope for {h.recipient!r} found in "
                                                       f"topic {rec.topic}", h.round_id))
        if not self._chain(h, v.digest, loc, rec.resent):
            return
        first = h.seq - h.part
        m = self._messages.get((h.sender, first))
        if m is None:
            m = _Msg(h.sender, h.recipient, h.kind, first, h.parts, rec.timestamp_ms, loc,
                     round_id=h.round_id)
            self._messages[(h.sender, first)] = m
            r = self.rounds.get(h.round_id)
            if r is None:
                r = self.rounds[h.round_id] = RoundReport(h.round_id, rec.timestamp_ms,
                                                          rec.timestamp_ms)
            r.messages.append(m)
        r = self.rounds[m.round_id]
        r.first_ms = min(r.first_ms, rec.timestamp_ms)
        r.last_ms = max(r.last_ms, rec.timestamp_ms)
        m.ts = min(m.ts, rec.timestamp_ms)
        m.last_ts = max(m.last_ts, rec.timestamp_ms)
        m.size += len(rec.value)
        m.locations.append(loc)
        if self.key is not None and h.recipient == self.key.party_id:
            try:
                m.chunks[h.part] = open_sealed(self.key, v)
            except ZerosumError as exc:
                self.findings.append(Finding(loc, "decrypt", f"{type(exc).__name__}: {exc}",
                                             h.round_id))

    def _chain(self, h: Header, digest: bytes, loc: Location, resent: bool = False) -> bool:
        """Sequence and hash-chain checks; False for an exact duplicate (already counted)."""
        c = self._chains[h.sender]
        known = c.seen.get(h.seq)
        if known is not None:
            if known == digest:
                # an agent sends an envelope again only when it cannot know that the first
                # copy landed (no ack before a timeout, or a restart on a broker where it may
                # not read other inboxes), and marks that copy in a record header; the
                # unmarked first copy may land after it (a producer given up on still
                # delivers). Any other copy of the same bytes is a replay. Recipients drop all.
                self.duplicates += 1
                if not (resent or h.seq in c.marked):
                    self.findings.append(Finding(loc, "replay", f"envelope {h.seq} of "
                                                                f"{h.sender} sent again",
                                                 h.round_id))
                return False
            self.findings.append(Finding(loc, "fork", f"a second, different envelope with "
                                                      f"sequence {h.seq} from {h.sender}",
                                         h.round_id))
            return False
        c.seen[h.seq] = digest
        if resent:
            c.marked.add(h.seq)
        if len(c.seen) > self.SEEN_WINDOW:
            oldest = next(iter(c.seen))
            del c.seen[oldest]
            c.marked.discard(oldest)
        key = (h.sender, h.recipient)
        last = self._topic_last.get(key, -1)
        if h.seq < last:
            self.findings.append(Finding(loc, "reorder", f"sequence {h.seq} of {h.sender} after "
                                                         f"{last} in the same topic", h.round_id))
        self._topic_last[key] = max(last, h.seq)
        if not c.started:  # from the start, every chain begins at 0; else where we join it
            c.started = True
            c.next_seq = 0 if self.from_start else h.seq
        if h.seq < c.next_seq:
            self.findings.append(Finding(loc, "reorder", f"sequence {h.seq} of {h.sender} "
                                                         f"arrived after {c.next_seq - 1}",
                                         h.round_id))
            return True
        c.pending[h.seq] = (digest, h.prev, loc, h.round_id, h.sender_epoch)
        while c.next_seq in c.pending:
            d, prev, ploc, prid, epoch = c.pending.pop(c.next_seq)
            if c.last_digest and prev != c.last_digest:
                self.findings.append(Finding(ploc, "chain", f"envelope {c.next_seq} of "
                                             f"{h.sender} does not follow {c.next_seq - 1}",
                                             prid))
            if epoch < c.epoch:  # a key is not used again once its successor has signed
                self.findings.append(Finding(ploc, "key epoch", f"envelope {c.next_seq} of "
                                             f"{h.sender} is signed with key epoch {epoch} "
                                             f"after envelope {c.epoch_seq} with epoch "
                                             f"{c.epoch}", prid))
            elif epoch > c.epoch:
                c.epoch, c.epoch_seq = epoch, c.next_seq
            c.last_digest = d
            c.next_seq += 1
        return True

    # -- finishing -----------------------------------------------------------------------------
    def finish(self) -> Report:
        for sender, c in self._chains.items():
            if c.pending:
                first = min(c.pending)
                _, _, loc, rid, _ = c.pending[first]
                self.findings.append(Finding(loc, "gap", f"sequence of {sender} jumps from "
                                             f"{c.next_seq - 1} to {first} (missing "
                                             f"{c.next_seq}..{first - 1})", rid))
        for r in self.rounds.values():
            self._check_round(r)
            r.findings = [f if f.round_id is not None else replace(f, round_id=r.round_id)
                          for f in r.findings]
        rounds = sorted(self.rounds.values(), key=lambda r: r.first_ms)
        return Report(rounds, self.findings, self.envelopes, self.duplicates, self.coordinator)

    def _check_round(self, r: RoundReport) -> None:
        coord = self.coordinator

        def of(kind: MessageKind, sender: str | None = None,
               recipient: str | None = None) -> list[_Msg]:
            return [m for m in r.messages if m.kind is kind
                    and (sender is None or m.sender == sender)
                    and (recipient is None or m.recipient == recipient)]

        def bad(m: _Msg | None, check: str, detail: str) -> None:
            r.findings.append(Finding(m.location if m else None, check, detail))

        for m in r.messages:
            if len(m.chunks) not in (0, m.parts) and self.key and m.recipient == self.key.party_id:
                bad(m, "chunks", f"{len(m.chunks)} of {m.parts} parts of a {m.kind.name}")
        requests = of(MessageKind.ROUND_REQUEST, recipient=coord)
        assigns = of(MessageKind.MASK_ASSIGNMENT)
        for m in assigns + of(MessageKind.LEADER_QUERY) + of(MessageKind.ROUND_RESULT):
            if m.sender != coord:
                bad(m, "role", f"{m.kind.name} from {m.sender}, not the coordinator")
        results = [m for m in of(MessageKind.ROUND_RESULT, coord) if m.recipient != coord]
        aborts = [m for m in of(MessageKind.ROUND_ABORT, coord) if m.recipient != coord]
        if not requests:
            if self.from_start:
                bad(r.messages[0], "transcript", "messages of a round that was never requested")
        else:
            r.requester = requests[0].sender
        r.participants = tuple(sorted({m.recipient for m in assigns}))
        queries = of(MessageKind.LEADER_QUERY, coord)
        if assigns and len({q.recipient for q in queries}) != 1:
            bad(assigns[0], "transcript", f"{len(queries)} leader queries for one round")
        r.leader = queries[0].recipient if queries else ""
        if r.leader and r.leader not in r.participants:
            bad(queries[0], "transcript", f"leader {r.leader} has no mask assignment")
        if results and aborts:
            bad(aborts[0], "outcome", "the round both published a result and aborted")
        if results:
            r.outcome = "published"
            got = [m.recipient for m in results]
            for p in r.participants:
                if got.count(p) != 1:
                    bad(results[0], "outcome", f"{p} received {got.count(p)} results")
            self._check_inputs(r)
        elif aborts:
            r.outcome = "aborted"
        if self.key is not None:
            if self.key.party_id == coord:
                self._check_as_coordinator(r)
            elif self.key.party_id in r.participants:
                self._check_as_institution(r)

    def _check_inputs(self, r: RoundReport) -> None:
        """A published round has every input: the sum was never partial."""
        msgs = r.messages
        leader, coord = r.leader, self.coordinator
        has = {(m.kind, m.sender, m.recipient) for m in msgs}
        first = next(m for m in msgs if m.kind is MessageKind.ROUND_RESULT)
        if (MessageKind.COORDINATOR_SHARE, leader, coord) not in has:
            r.findings.append(Finding(first.location, "partial",
                                      f"published without the share of leader {leader}"))
        for p in r.participants:
            if p == leader:
                continue
            if (MessageKind.LEADER_SHARE, leader, p) not in has:
                r.findings.append(Finding(first.location, "transcript",
                                          f"the leader sent no share to {p}"))
            if (MessageKind.CONTRIBUTION, p, coord) not in has:
                r.findings.append(Finding(first.location, "partial",
                                          f"published without the contribution of {p}"))

    def _open(self, m: _Msg, r: RoundReport) -> Message | None:
        if len(m.chunks) != m.parts:
            return None
        try:
            msg = decode(unpad(b"".join(m.chunks[i] for i in range(m.parts))))
        except ZerosumError as exc:
            r.findings.append(Finding(m.location, "decode", str(exc)))
            return None
        m.chunks = {}
        return msg

    def _check_as_coordinator(self, r: RoundReport) -> None:
        me = self.coordinator
        mine = [(m, self._open(m, r)) for m in r.messages if m.recipient == me]
        req = next((x for _, x in mine if isinstance(x, RoundRequest)), None)
        end_at = next((i for i, (m, x) in enumerate(mine) if m.sender == me
                       and isinstance(x, RoundResult | RoundAbort)), None)
        if end_at is None:
            return
        receipt = mine[end_at]
        # every chunk of E_S and of each contribution, by chunk of I: those before the receipt
        # (the round took no later one) and, per sender and chunk, the first (as the round)
        inputs: dict[int, dict[str, U64]] = defaultdict(dict)
        for m, x in mine[:end_at]:
            if isinstance(x, CoordinatorShare) and m.sender == r.leader:
                inputs[x.chunk].setdefault(m.sender, x.share)
            elif isinstance(x, Contribution) and m.sender != r.leader:
                inputs[x.chunk].setdefault(m.sender, x.values)
        msg, end = receipt  # the coordinator's RoundResult or RoundAbort to this party
        if isinstance(end, RoundAbort):
            r.reason = end.reason.name
            if req is not None and end.reason is AbortReason.TIMEOUT and msg.ts < req.deadline_ms:
                r.findings.append(Finding(msg.location, "deadline", "timed out "
                                          f"{req.deadline_ms - msg.ts} ms before the deadline"))
            r.verified = "coordinator"
            return
        assert isinstance(end, RoundResult)
        r.rows = end.rows
        if req is None or not inputs:
            return
        sums: list[U64] = []
        for k in range(max(inputs) + 1):
            parts = list(inputs.get(k, {}).values())
            if len(parts) != len(r.participants) or any(p.shape != parts[0].shape
                                                        for p in parts):
                r.findings.append(Finding(msg.location, "sum", f"inputs of chunk {k} missing "
                                                              "or misshapen"))
                return
            sums.append(sum_matrices(parts))
        total = np.concatenate(sums)
        kept = end.kept_mask()
        if total.shape[0] != end.rows or not np.array_equal(total[kept], end.totals):
            r.findings.append(Finding(msg.location, "sum", "the published totals are not the "
                                                          "sum of the contributions"))
            return
        specs = tuple(self.attributes[a] for a in req.attributes if a in self.attributes)
        try:
            holders = decode_totals(total, specs, len(r.participants))[:, 0]
        except TotalOutOfRange as exc:
            r.findings.append(Finding(msg.location, "sum", str(exc)))
            return
        if not np.array_equal(holders >= req.min_holders, kept):
            r.findings.append(Finding(msg.location, "threshold", "withheld rows differ from "
                                                                "those below min_holders"))
        if msg.ts > req.deadline_ms:
            r.findings.append(Finding(msg.location, "deadline", "published after the deadline"))
        r.verified = "coordinator"

    def _check_as_institution(self, r: RoundReport) -> None:
        assert self.key is not None
        me = self.key.party_id
        mine = [(m, self._open(m, r)) for m in r.messages if m.recipient == me]
        assign = next((x for _, x in mine if isinstance(x, MaskAssignment)), None)
        ends = [(m, x) for m, x in mine if isinstance(x, RoundResult | RoundAbort)]
        # the leader's chunks of I as the round took them: before its outcome, the first per
        # chunk (a copy sealed again, or a later different one, changed nothing)
        end_at = next((i for i, (_, x) in enumerate(mine)
                       if isinstance(x, RoundResult | RoundAbort)), len(mine))
        shares = list({x.chunk: x for _, x in reversed(mine[:end_at])
                       if isinstance(x, LeaderShare)}.values())
        if len(ends) > 1:
            r.findings.append(Finding(ends[1][0].location, "outcome",
                                      f"{me} received {len(ends)} outcomes"))
        if assign is None or not ends:
            return
        m, end = ends[0]
        if isinstance(end, RoundAbort):
            r.reason = end.reason.name
        elif isinstance(end, RoundResult):
            r.rows = end.rows
            shared = sum(s.tokens.size for s in shares)  # every chunk of I
            if shares and end.rows != shared:
                r.findings.append(Finding(m.location, "rows", f"{end.rows} rows for the "
                                          f"{shared} customers of the round"))
            try:
                decode_totals(end.totals, assign.attributes, len(assign.participants))
            except TotalOutOfRange as exc:
                r.findings.append(Finding(m.location, "range", str(exc)))
        r.verified = me
