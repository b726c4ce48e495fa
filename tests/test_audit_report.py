"""The audit's HTML page and JSON: every round and every finding of a tampered history is in
the page, linked to its record and round; party names and details are escaped; the JSON keeps
every figure (times and bytes of every record)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser

import msgpack
import pytest

from agents.audit import (
    AuditRun,
    format_duration,
    format_size,
    record_anchor,
    round_anchor,
    to_html,
    to_json,
)
from protocol.audit import Finding, Location, Record, Report, RoundReport, _Msg
from protocol.driver import CONSORTIUM, COORDINATOR, keys_for
from protocol.envelope import Chain, Header, seal
from protocol.messages import MessageKind
from tests.test_audit import _audit, _transcript

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "wbr", "source", "area", "base"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(" ".join(c.split()) if isinstance(c, str) else c.text
                        for c in self.children).strip()

    def walk(self) -> list[Node]:
        out = [self]
        for c in self.children:
            if isinstance(c, Node):
                out += c.walk()
        return out


class _Tree(HTMLParser):
    """The page as a tree; fails on a close tag that does not match (broken markup)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> tuple[Node, dict[str, Node]]:
    p = _Tree()
    p.feed(page)
    p.close()
    assert [n.tag for n in p.stack] == ["#root"], "unclosed elements"
    nodes = p.root.walk()
    ids: dict[str, Node] = {}
    for n in nodes:
        if "id" in n.attrs:
            assert n.attrs["id"] not in ids, f"duplicate id {n.attrs['id']}"
            ids[n.attrs["id"]] = n
    return p.root, ids


def _links(node: Node) -> set[str]:
    return {n.attrs["href"] for n in node.walk() if n.tag == "a" and "href" in n.attrs}


def tampered() -> tuple[Report, list[Record]]:
    """An honest history of published and aborted rounds, then: a flipped byte, a replayed
    envelope, a fork, a skipped sequence number, a dropped contribution and an envelope moved
    to another topic. Audited with the coordinator's key."""
    net, records = _transcript(rounds=6, aborted=2)
    kinds = [Header.decode(msgpack.unpackb(r.value)[1]).kind for r in records]
    contribution = kinds.index(MessageKind.CONTRIBUTION)
    flipped = len(records) // 2
    bad = bytearray(records[flipped].value)
    bad[len(bad) // 2] ^= 0x01
    out = list(records)
    out[flipped] = Record(records[flipped].topic, 0, records[flipped].offset,
                          records[flipped].timestamp_ms, bytes(bad))
    extra = [Record(records[3].topic, 0, 10_000, 99_000, records[3].value)]  # replay
    h = Header.decode(msgpack.unpackb(records[5].value)[1])
    [fork] = seal(b"other content", sender=net.party(h.sender).me,
                  recipient=net.party(h.recipient).registry[h.recipient],
                  consortium=CONSORTIUM, round_id=h.round_id, kind=h.kind,
                  chain=Chain(h.seq, h.prev))
    extra.append(Record(records[5].topic, 0, 10_001, 99_001, fork))
    sender = net.institutions["bank-2"]
    [skip] = seal(b"x", sender=sender.me, recipient=net.coordinator.registry[COORDINATOR],
                  consortium=CONSORTIUM, round_id=os.urandom(16),
                  kind=MessageKind.CONTRIBUTION,
                  chain=Chain(sender.chain.next_seq + 3, sender.chain.prev))
    coord_topic = net.coordinator.registry[COORDINATOR].topic
    extra.append(Record(coord_topic, 0, 10_002, 99_002, skip))
    moved = out[7]
    other = next(r.topic for r in records if r.topic != moved.topic)
    extra.append(Record(other, 0, 10_003, 99_003, moved.value))
    mallory, _ = keys_for("mallory", b"x")
    forged_key = type(mallory)("bank-1", mallory.signing_key, mallory.kem, mallory.kem_key,
                               mallory.secret)
    [forged] = seal(b"x", sender=forged_key, recipient=net.coordinator.registry[COORDINATOR],
                    consortium=CONSORTIUM, round_id=os.urandom(16),
                    kind=MessageKind.CONTRIBUTION, chain=Chain(next_seq=10_000))
    extra.append(Record(coord_topic, 0, 10_004, 99_004, forged))
    del out[7]
    del out[contribution]
    return _audit(net, out + extra, COORDINATOR), out + extra


def check_page(report: Report, page: str) -> int:
    """Every round of `report` is in `page` with its swimlane, every finding with its record
    and round, linked both ways. Returns how many findings link to a record in a swimlane."""
    root, ids = parse(page)
    assert ("audit PASSED" if report.ok else "audit FAILED") in page
    page_links = _links(root)
    rounds = {r.round_id for r in report.rounds}
    for r in report.rounds:
        section = ids[round_anchor(r.round_id)]
        assert section.tag == "details"
        assert f"#{round_anchor(r.round_id)}" in page_links  # from the timeline
        summary = next(c for c in section.children if isinstance(c, Node) and c.tag == "summary")
        assert r.round_id.hex() in summary.text
        assert r.outcome in summary.text
        assert format_size(r.size) in summary.text
        assert section.attrs["data-outcome"] == r.outcome
        assert set(json.loads(section.attrs["data-parties"])) >= set(r.participants)
        # the swimlane: a lane per party, each message at its record, with its time and size
        lanes = [n for n in section.walk() if n.attrs.get("class") == "lane"]
        assert set(r.participants) <= {n.attrs["data-party"] for n in lanes}
        for m in r.messages:
            cell = ids[record_anchor(m.location)]
            lane = next(n for n in lanes if cell in n.walk())
            assert lane.attrs["data-party"] == m.sender
            assert f"→ {m.recipient}" in cell.text
            assert f"+{format_duration(m.ts - r.first_ms)}" in cell.text
            assert format_size(m.size) in cell.text
            assert cell.attrs["title"].startswith(str(m.location))
        if r.findings:
            assert "open" in section.attrs
            assert "has-findings" in section.attrs["class"]
    findings = report.all_findings()
    on_records = 0
    for i, f in enumerate(findings, 1):
        row = ids[f"finding-{i}"]
        assert row.tag == "tr"
        assert f.check in row.text
        assert f.detail in row.text
        assert str(f.location) in row.text
        links = _links(row)
        if f.round_id is not None and f.round_id in rounds:
            assert f"#{round_anchor(f.round_id)}" in links, str(f)
            # and the round links back to it
            assert f"#finding-{i}" in _links(ids[round_anchor(f.round_id)]), str(f)
        holder = [m for r in report.rounds for m in r.messages if f.location in m.locations]
        if holder:  # the record is a part of a message in a swimlane: linked both ways
            on_records += 1
            anchor = record_anchor(holder[0].location)
            assert f"#{anchor}" in links, str(f)
            assert f"#finding-{i}" in _links(ids[anchor]), str(f)
    assert sorted(i for i in ids if i.startswith("finding-")) == sorted(
        f"finding-{i}" for i in range(1, len(findings) + 1))
    return on_records


def test_every_round_and_every_finding_of_a_tampered_history_is_in_the_page() -> None:
    report, records = tampered()
    findings = report.all_findings()
    checks = {f.check for f in findings}
    assert checks >= {"envelope", "replay", "fork", "gap", "partial", "topic"}, checks
    assert len(report.rounds) >= 9  # 8 honest + the one of the injected envelope
    page = to_html(AuditRun(report, 0.5, len(records)), "zerosum test")
    assert check_page(report, page) >= 2  # the partial sum's result record, the gap's record
    # an envelope that does not verify names no round to believe; every other finding does
    assert all((f.round_id is None) == (f.check == "envelope") for f in findings)


def test_the_page_has_no_external_assets_and_filters_every_party_and_outcome() -> None:
    report, records = tampered()
    page = to_html(AuditRun(report, 0.5, len(records)), "t")
    root, ids = parse(page)
    for n in root.walk():
        assert "src" not in n.attrs, n.tag
        assert not n.attrs.get("href", "#").startswith(("http", "//")), n.attrs
    outcome = [o.attrs["value"] for o in ids["f-outcome"].walk() if o.tag == "option"]
    assert outcome == ["", "published", "aborted", "open", "failed"]
    party = [o.attrs["value"] for o in ids["f-party"].walk() if o.tag == "option"]
    assert party[0] == ""
    assert set(party[1:]) == {COORDINATOR, "bank-0", "bank-1", "bank-2"}


def _hostile_report() -> Report:
    evil = "<script>alert('party')</script>"
    loc = Location("zerosum.x.coordinator", 0, 7)
    rid = bytes(range(16))
    m = _Msg(evil, "coordinator", MessageKind.ROUND_REQUEST, 0, 1, 1_000, loc,
             last_ts=1_000, size=123, locations=[loc], round_id=rid)
    finding = Finding(loc, "transcript", "detail <script>alert('detail')</script> & \"q\"", rid)
    r = RoundReport(rid, 1_000, 1_250, requester=evil, participants=(evil, "bank-2"),
                    leader=evil, reason="<b>why</b>", findings=[finding], messages=[m])
    outside = Finding(None, "envelope", "BadSignature: <img src=x onerror=alert(1)>")
    return Report([r], [outside], 1, 0, "coordinator")


def test_party_names_and_details_are_escaped() -> None:
    report = _hostile_report()
    page = to_html(AuditRun(report, 0.1, 1), "title <script>alert('title')</script>")
    assert "<script>alert" not in page
    assert "<img" not in page
    assert "<b>" not in page
    root, ids = parse(page)
    assert [n.tag for n in root.walk()].count("script") == 1  # the page's own filter script
    assert [n.tag for n in root.walk()].count("img") == 0
    text = root.text
    assert "<script>alert('party')</script>" in text  # shown as text
    assert "detail <script>alert('detail')</script> & \"q\"" in text
    assert "BadSignature: <img src=x onerror=alert(1)>" in text
    section = ids[round_anchor(bytes(range(16)))]
    assert json.loads(section.attrs["data-parties"])[1] == "<script>alert('party')</script>"
    options = [o.attrs["value"] for o in ids["f-party"].walk() if o.tag == "option"]
    assert "<script>alert('party')</script>" in options


def test_the_json_keeps_every_figure() -> None:
    net, records = _transcript()
    report = _audit(net, records, COORDINATOR)
    data = json.loads(to_json(AuditRun(report, 0.25, len(records))))
    assert data["ok"] is True
    assert data["records"] == len(records)
    messages = [m for r in data["rounds"] for m in r["messages"]]
    # every record read is a part of one message, with its time and size
    by_location = {str(rec.location): rec for rec in records}
    assert sorted(loc for m in messages for loc in m["locations"]) == sorted(by_location)
    assert data["bytes"] == sum(len(rec.value) for rec in records)
    for m in messages:
        parts = [by_location[loc] for loc in m["locations"]]
        assert m["bytes"] == sum(len(p.value) for p in parts)
        assert m["first_ms"] == min(p.timestamp_ms for p in parts)
        assert m["last_ms"] == max(p.timestamp_ms for p in parts)
    for r in data["rounds"]:
        assert r["bytes"] == sum(m["bytes"] for m in r["messages"])
        assert r["first_ms"] == min(m["first_ms"] for m in r["messages"])
        assert r["latency_ms"] == r["last_ms"] - r["first_ms"]
    tampered_report, tampered_records = tampered()
    data = json.loads(to_json(AuditRun(tampered_report, 0.25, len(tampered_records))))
    assert data["ok"] is False
    assert [f["check"] for f in data["findings"]] == [
        f.check for f in tampered_report.all_findings()]
    in_rounds = [f for r in data["rounds"] for f in r["findings"]]
    assert in_rounds
    assert all(f["round_id"] for f in in_rounds)
    assert {f["location"] for f in data["findings"]} >= {
        str(f.location) for f in tampered_report.all_findings() if f.location}


@pytest.mark.parametrize("rounds", [0, 1])
def test_an_empty_or_tiny_history_renders(rounds: int) -> None:
    net, records = _transcript(rounds=rounds, aborted=0)
    report = _audit(net, records)
    page = to_html(AuditRun(report, 0.0, len(records)), "t")
    _, ids = parse(page)
    assert "audit PASSED" in page
    assert sum(1 for i in ids if i.startswith("round-")) == rounds
