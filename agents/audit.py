"""`zerosum audit`: replay every party topic and check what happened (protocol/audit.py).

Topics are read together, merged by record timestamp, a bounded batch at a time, so memory does
not grow with the length of the topics. With the consortium file alone the audit uses public
keys; with a party's file it also checks what that party's key can open.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.config import Consortium
from agents.security import KafkaAccess, as_access
from protocol.audit import RESEND_HEADER, Auditor, Record, Report
from protocol.envelope import PrivateParty


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
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        if since_ms is None:
            # explicit offsets: a pending seek_to_beginning is lost to the reset policy here
            for tp, start in (await consumer.beginning_offsets(tps)).items():
                consumer.seek(tp, start)
        else:
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                o = found.get(tp)
                consumer.seek(tp, o.offset if o is not None else ends[tp])
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
    rep = run.report
    return json.dumps({"ok": rep.ok, "records": run.records, "seconds": run.seconds,
                       "duplicates": rep.duplicates,
                       "findings": [str(f) for f in rep.all_findings()],
                       "rounds": [r.as_dict() for r in rep.rounds]}, indent=1)


def to_html(run: AuditRun, title: str) -> str:
    """A self-contained page: summary, a timeline of the rounds (SVG), and the table."""
    rep = run.report
    rounds = rep.rounds
    t0 = min((r.first_ms for r in rounds), default=0)
    t1 = max((r.last_ms for r in rounds), default=1)
    span = max(t1 - t0, 1)
    width, row_h = 900, 6
    colour = {"published": "#2a9d4b", "aborted": "#d1495b", "open": "#999999"}
    bars = []
    for i, r in enumerate(rounds):
        x = 40 + (r.first_ms - t0) / span * (width - 60)
        w = max((r.last_ms - r.first_ms) / span * (width - 60), 2)
        c = "#000000" if r.findings else colour[r.outcome]
        bars.append(f'<rect x="{x:.1f}" y="{20 + i * row_h}" width="{w:.1f}" '
                    f'height="{row_h - 1}" fill="{c}"><title>{r.round_id.hex()} {r.outcome} '
                    f'{r.latency_ms} ms</title></rect>')
    height = 40 + len(rounds) * row_h
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
           f'<text x="40" y="14" font-size="12">time: {span / 1000:.1f} s from '
           f'{datetime.fromtimestamp(t0 / 1000):%Y-%m-%d %H:%M:%S}</text>'
           + "".join(bars) + "</svg>")
    rows = "".join(
        f"<tr><td><code>{r.round_id.hex()}</code></td><td>{len(r.participants)}</td>"
        f"<td>{html.escape(r.leader)}</td><td>{'' if r.rows is None else r.rows}</td>"
        f"<td>{r.outcome} {html.escape(r.reason)}</td><td>{r.latency_ms}</td>"
        f"<td>{'FAILED' if r.findings else html.escape(r.verified)}</td></tr>" for r in rounds)
    findings = "".join(f"<li>{html.escape(str(f))}</li>" for f in rep.all_findings())
    verdict = "PASSED" if rep.ok else f"FAILED ({len(rep.all_findings())} findings)"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}
td,th{{padding:2px 8px;text-align:left}}</style></head><body>
<h1>{html.escape(title)}: audit {verdict}</h1>
<p>{len(rounds)} rounds, {run.records} records, audited in {run.seconds:.2f} s.
Green: published; red: aborted; grey: open; black: a failed check.</p>
{svg}<ul>{findings}</ul>
<table><tr><th>round</th><th>participants</th><th>leader</th><th>rows</th><th>outcome</th>
<th>latency ms</th><th>verified</th></tr>{rows}</table></body></html>"""


def write_outputs(run: AuditRun, title: str, json_out: Path | None,
                  html_out: Path | None) -> None:
    if json_out is not None:
        json_out.write_text(to_json(run))
    if html_out is not None:
        html_out.write_text(to_html(run, title))
