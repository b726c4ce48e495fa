"""`zerosum audit`: replay every party topic and check what happened (protocol/audit.py).

Topics are read together, merged by record timestamp, a bounded batch at a time, so memory does
not grow with the length of the topics. With the consortium file alone the audit uses public
keys; with a party's file it also checks what that party's key can open.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.config import Consortium
from agents.kafka_client import seek_to_read
from agents.security import KafkaAccess, as_access
from protocol.audit import RESEND_HEADER, Auditor, Location, Record, Report, RoundReport
from protocol.envelope import PrivateParty
from protocol.messages import MessageKind


@dataclass
class AuditRun:
    report: Report
    seconds: float
    records: int


def parse_since(text: str) -> int:
    """An ISO 8601 time (UTC if no zone) or epoch milliseconds -> epoch milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"--since {text!r}: use ISO 8601 (2026-11-24T10:00:00) or "
                         "epoch ms") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


async def read_and_audit(consortium: Consortium, bootstrap: str | KafkaAccess, *,
                         key: PrivateParty | None = None, since_ms: int | None = None,
                         batch: int = 500) -> AuditRun:
    t0 = time.monotonic()
    auditor = Auditor(consortium.registry, consortium.id, consortium.coordinator, key=key,
                      attributes=consortium.attributes, from_start=since_ms is None)
    consumer = AIOKafkaConsumer(**as_access(bootstrap).aiokafka_kwargs(),
                                enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    n = 0
    try:
        existing = await consumer.topics()
        tps = [TopicPartition(p.topic, 0) for p in consortium.registry.values()
               if p.topic in existing]
        if not tps:
            return AuditRun(auditor.finish(), time.monotonic() - t0, 0)
        ends = await seek_to_read(consumer, tps, since_ms=since_ms)
        buffers: dict[TopicPartition, list[Record]] = {tp: [] for tp in tps}
        done = {tp for tp in tps if await consumer.position(tp) >= ends[tp]}
        idle = 0
        while len(done) < len(tps) or any(buffers.values()):
            # refill every partition that is empty and not finished, then merge by time
            want = [tp for tp in tps if not buffers[tp] and tp not in done]
            if want:
                got = await consumer.getmany(*want, timeout_ms=5000, max_records=batch)
                for tp, recs in got.items():
                    buffers[tp] += [Record(tp.topic, tp.partition, r.offset, r.timestamp,
                                           r.value, RESEND_HEADER in (r.headers or ()))
                                    for r in recs if r.offset < ends[tp]]
                for tp in want:
                    if await consumer.position(tp) >= ends[tp]:
                        done.add(tp)
                idle = 0 if got else idle + 1
                if idle >= 6:
                    raise RuntimeError("the broker stopped delivering records before the end "
                                       f"offsets of {[str(t) for t in want]}")
                if not got and not any(buffers.values()):
                    continue
            ready = [tp for tp in tps if buffers[tp]]
            if any(not buffers[tp] and tp not in done for tp in tps):
                continue  # wait until every live partition has a record to compare
            tp = min(ready, key=lambda t: buffers[t][0].timestamp_ms)
            auditor.feed(buffers[tp].pop(0))
            n += 1
    finally:
        await consumer.stop()
    return AuditRun(auditor.finish(), time.monotonic() - t0, n)


def render_table(run: AuditRun) -> str:
    rep = run.report
    lines = [f"{'round':<34} {'participants':>12} {'leader':<12} {'rows':>8} "
             f"{'outcome':<10} {'latency ms':>10} verified"]
    for r in rep.rounds:
        outcome = r.outcome + (f":{r.reason}" if r.reason else "")
        status = r.verified if not r.findings else "FAILED"
        lines.append(f"{r.round_id.hex():<34} {len(r.participants):>12} {r.leader:<12} "
                     f"{'-' if r.rows is None else r.rows:>8} {outcome:<10} "
                     f"{r.latency_ms:>10} {status}")
    counts = {k: sum(r.outcome == k for r in rep.rounds) for k in ("published", "aborted",
                                                                    "open")}
    lines.append(f"\n{len(rep.rounds)} rounds ({counts['published']} published, "
                 f"{counts['aborted']} aborted, {counts['open']} open), {run.records} records, "
                 f"{rep.duplicates} exact re-sends, audited in {run.seconds:.2f} s")
    findings = rep.all_findings()
    lines += ([f"FAILED: {len(findings)} finding(s)"] + [f"  {f}" for f in findings]
              if findings else ["audit PASSED"])
    return "\n".join(lines)


def to_json(run: AuditRun) -> str:
    """Every figure of the report: per round its messages (sender, recipient, stage, times,
    bytes, records) and its findings; the findings of no round at the top."""
    rep = run.report
    return json.dumps({"ok": rep.ok, "records": run.records, "seconds": run.seconds,
                       "envelopes": rep.envelopes, "duplicates": rep.duplicates,
                       "bytes": sum(r.size for r in rep.rounds),
                       "findings": [f.as_dict() for f in rep.all_findings()],
                       "rounds": [r.as_dict() for r in rep.rounds]}, indent=1)


# -- the HTML page: a view of the report, rendered by templates/audit.html ----------------------
STAGE_NAMES = {
    MessageKind.ROUND_REQUEST: "request",
    MessageKind.MASK_ASSIGNMENT: "masks",
    MessageKind.LEADER_QUERY: "leader query",
    MessageKind.LEADER_SHARE: "leader shares",
    MessageKind.COORDINATOR_SHARE: "coordinator share",
    MessageKind.CONTRIBUTION: "contributions",
    MessageKind.ROUND_RESULT: "result",
    MessageKind.ROUND_ABORT: "abort",
}


def record_anchor(loc: Location) -> str:
    """The page's id of a record (Kafka topic names are already of [A-Za-z0-9._-])."""
    return "rec-" + re.sub(r"[^A-Za-z0-9_.-]", "_", loc.topic) + f"-{loc.partition}-{loc.offset}"


def round_anchor(round_id: bytes) -> str:
    return f"round-{round_id.hex()}"


@dataclass(frozen=True)
class MessageView:
    """One message in a swimlane cell: a sender's envelope(s) of one stage to one recipient."""

    recipient: str
    offset_ms: int  # from the round's first record
    pos: float  # offset_ms in percent of the round's latency
    duration_ms: int  # first to last part
    size: int
    parts: int
    parts_read: int
    location: str
    anchor: str
    time: str
    findings: tuple[int, ...]  # numbers in FindingView.number


@dataclass(frozen=True)
class LaneView:
    party: str
    role: str
    cells: tuple[tuple[MessageView, ...], ...]  # one per stage of the round
    size: int


@dataclass(frozen=True)
class StageView:
    name: str
    start_ms: int
    end_ms: int
    size: int
    messages: int


@dataclass(frozen=True)
class RoundView:
    round_id: str
    anchor: str
    outcome: str
    reason: str
    requester: str
    leader: str
    participants: tuple[str, ...]
    parties: tuple[str, ...]  # every party with a lane: what the party filter matches
    rows: int | None
    start: str
    latency_ms: int
    size: int
    verified: str
    stages: tuple[StageView, ...]
    lanes: tuple[LaneView, ...]
    findings: tuple[int, ...]
    # the timeline bar, in percent of the history's span
    bar_x: float
    bar_w: float


@dataclass(frozen=True)
class FindingView:
    number: int
    anchor: str
    check: str
    detail: str
    location: str
    record_anchor: str | None  # the record's place in a swimlane, if it has one
    round_id: str | None
    round_anchor: str | None  # None: the finding's round is not in the page
    outcome: str
    parties: tuple[str, ...]


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def format_size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1_000_000:.1f} MB"


def format_duration(ms: int) -> str:
    return f"{ms} ms" if abs(ms) < 10_000 else f"{ms / 1000:.1f} s"


def _round_view(r: RoundReport, coordinator: str, t0: int, span: int,
                by_location: dict[Location, list[int]], numbers: list[int]) -> RoundView:
    kinds = [k for k in MessageKind if any(m.kind is k for m in r.messages)]
    involved = {m.sender for m in r.messages} | {m.recipient for m in r.messages}
    order = [coordinator, r.requester, *r.participants, *sorted(involved)]
    lanes_of = list(dict.fromkeys(p for p in order if p and p in involved | {coordinator}))
    roles = {coordinator: "coordinator"}
    for p in r.participants:
        roles[p] = "leader" if p == r.leader else "institution"
    if r.requester:
        roles[r.requester] = roles.get(r.requester, "institution") + ", requester"
    lanes = []
    for party in lanes_of:
        cells = []
        for k in kinds:
            mine = sorted((m for m in r.messages if m.sender == party and m.kind is k),
                          key=lambda m: (m.ts, m.recipient))
            cells.append(tuple(MessageView(
                recipient=m.recipient, offset_ms=m.ts - r.first_ms,
                pos=(m.ts - r.first_ms) / max(r.latency_ms, 1) * 100,
                duration_ms=m.last_ts - m.ts, size=m.size, parts=m.parts,
                parts_read=len(m.locations), location=str(m.location),
                anchor=record_anchor(m.location), time=_utc(m.ts),
                findings=tuple(sorted({n for loc in m.locations
                                       for n in by_location.get(loc, ())})))
                for m in mine))
        lanes.append(LaneView(party, roles.get(party, "not a participant"), tuple(cells),
                              sum(m.size for m in r.messages if m.sender == party)))
    stages = []
    for k in kinds:
        ms = [m for m in r.messages if m.kind is k]
        stages.append(StageView(STAGE_NAMES[k], min(m.ts for m in ms) - r.first_ms,
                                max(m.last_ts for m in ms) - r.first_ms,
                                sum(m.size for m in ms), len(ms)))
    return RoundView(
        round_id=r.round_id.hex(), anchor=round_anchor(r.round_id), outcome=r.outcome,
        reason=r.reason, requester=r.requester, leader=r.leader,
        participants=r.participants, parties=tuple(lanes_of), rows=r.rows,
        start=_utc(r.first_ms), latency_ms=r.latency_ms, size=r.size,
        verified=r.verified, stages=tuple(stages), lanes=tuple(lanes),
        findings=tuple(numbers),
        bar_x=(r.first_ms - t0) / span * 100, bar_w=max(r.latency_ms / span * 100, 0.15))


def html_context(run: AuditRun, title: str) -> dict[str, object]:
    """What templates/audit.html shows: plain values, escaped by the template engine."""
    rep = run.report
    findings = rep.all_findings()
    by_location: dict[Location, list[int]] = {}
    by_round: dict[bytes, list[int]] = {}
    for i, f in enumerate(findings, 1):
        if f.location is not None:
            by_location.setdefault(f.location, []).append(i)
        if f.round_id is not None:
            by_round.setdefault(f.round_id, []).append(i)
    t0 = min((r.first_ms for r in rep.rounds), default=0)
    t1 = max((r.last_ms for r in rep.rounds), default=t0)
    span = max(t1 - t0, 1)
    rounds = [_round_view(r, rep.coordinator, t0, span, by_location, by_round.get(r.round_id, []))
              for r in rep.rounds]
    in_page = {r.round_id: v for r, v in zip(rep.rounds, rounds, strict=True)}
    anchors = {loc: record_anchor(m.location) for r in rep.rounds for m in r.messages
               for loc in m.locations}
    finding_views = []
    for i, f in enumerate(findings, 1):
        rv = in_page.get(f.round_id) if f.round_id is not None else None
        finding_views.append(FindingView(
            number=i, anchor=f"finding-{i}", check=f.check, detail=f.detail,
            location=str(f.location) if f.location else "-",
            record_anchor=anchors.get(f.location) if f.location else None,
            round_id=f.round_id.hex() if f.round_id is not None else None,
            round_anchor=rv.anchor if rv else None, outcome=rv.outcome if rv else "",
            parties=rv.parties if rv else ()))
    parties = sorted({p for v in rounds for p in v.parties})
    counts = {k: sum(r.outcome == k for r in rep.rounds) for k in ("published", "aborted",
                                                                    "open")}
    return {"title": title, "ok": rep.ok, "rounds": rounds, "findings": finding_views,
            "parties": parties, "counts": counts,
            "failed_rounds": sum(1 for r in rep.rounds if r.findings),
            "records": run.records, "envelopes": rep.envelopes,
            "duplicates": rep.duplicates, "seconds": run.seconds,
            "size": sum(r.size for r in rep.rounds),
            "start": _utc(t0) if rep.rounds else "", "span_ms": t1 - t0}


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("agents", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = format_duration
    env.filters["size"] = format_size
    return env


def to_html(run: AuditRun, title: str) -> str:
    """A self-contained page (no external assets): summary, filters by outcome and party, a
    timeline of the rounds, every finding linked to its record and round, and per round a
    swimlane of parties x stages with times and sizes."""
    return _environment().get_template("audit.html").render(
        html_context(run, title))


def write_outputs(run: AuditRun, title: str, json_out: Path | None,
                  html_out: Path | None) -> None:
    if json_out is not None:
        json_out.write_text(to_json(run))
    if html_out is not None:
        html_out.write_text(to_html(run, title))
