"""The audit over a transcript from the in-memory driver: passes when honest, and names the
topic, offset and check of every kind of tampering."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import numpy as np
import pytest

from protocol.audit import Auditor, Record, Report
from protocol.codec import decode, encode
from protocol.coordinator import CoordinatorRound
from protocol.driver import CONSORTIUM, COORDINATOR, Network, keys_for
from protocol.envelope import Chain, Header, Inbox, seal
from protocol.institution import InstitutionRound
from protocol.messages import CoordinatorShare, Message, MessageKind, Scope
from protocol.party import Outgoing
from tests.helpers import DEADLINE, SPECS, make_world, run_round


def _transcript(rounds: int = 6, aborted: int = 2) -> tuple[Network, list[Record]]:
    world = make_world(3, universe=120, hold=0.6, query=80, seed=4)
    net = world.net
    for r in range(rounds):
        run_round(world, requester=f"bank-{r % 3}", scope=Scope.INTERSECTION, min_holders=1)
    for _ in range(aborted):  # requests for an attribute that is not configured
        net.take("bank-0", net.institutions["bank-0"].request(
            os.urandom(16), world.tokens(world.query_ids), participants=tuple(net.institutions),
            attributes=("salary",), deadline_ms=DEADLINE))
        net.run()
    return net, _records(net.topic_log)


def _records(log: list[tuple[str, bytes]]) -> list[Record]:
    offsets: dict[str, int] = {}
    out = []
    for ts, (topic, wire) in enumerate(log):
        off = offsets.get(topic, 0)
        offsets[topic] = off + 1
        out.append(Record(topic, 0, off, 1_000 + ts, wire))
    return out


def _audit(net: Network, records: list[Record], who: str | None = None) -> Report:
    key = None
    if who is not None:
        key = net.party(who).me
    a = Auditor(net.coordinator.registry, CONSORTIUM, COORDINATOR, key=key,
                attributes={s.name: s for s in SPECS})
    for rec in records:
        a.feed(rec)
    return a.finish()


@pytest.mark.parametrize("who", [None, COORDINATOR, "bank-1"])
def test_an_honest_transcript_passes(who: str | None) -> None:
    net, records = _transcript()
    report = _audit(net, records, who)
    assert report.all_findings() == []
    assert [r.outcome for r in report.rounds].count("published") == 6
    assert [r.outcome for r in report.rounds].count("aborted") == 2
    if who == COORDINATOR:
        assert {r.verified for r in report.rounds} == {"coordinator"}
        assert {r.reason for r in report.rounds if r.outcome == "aborted"} == {"BAD_REQUEST"}
    if who == "bank-1":
        assert {r.verified for r in report.rounds if r.outcome == "published"} == {"bank-1"}


def _only(report: Report, check: str) -> str:
    found = report.all_findings()
    assert found, "the audit found nothing"
    assert {f.check for f in found} >= {check}, [str(f) for f in found]
    return str(next(f for f in found if f.check == check).location)


def test_a_modified_byte_is_found_where_it_is() -> None:
    net, records = _transcript()
    i = len(records) // 2
    bad = bytearray(records[i].value)
    bad[len(bad) // 2] ^= 0x01
    records[i] = Record(records[i].topic, 0, records[i].offset, records[i].timestamp_ms,
                        bytes(bad))
    assert _only(_audit(net, records), "envelope") == str(records[i].location)


def test_a_forged_sender_is_found() -> None:
    net, records = _transcript()
    mallory, _ = keys_for("mallory", b"x")
    forged = type(mallory)("bank-1", mallory.signing_key, mallory.kem, mallory.kem_key,
                           mallory.secret)
    [wire] = seal(b"x", sender=forged, recipient=net.coordinator.registry[COORDINATOR],
                  consortium=CONSORTIUM, round_id=os.urandom(16),
                  kind=MessageKind.CONTRIBUTION, chain=Chain(next_seq=10_000))
    topic = net.coordinator.registry[COORDINATOR].topic
    rec = Record(topic, 0, 9_999, 99_999, wire)
    report = _audit(net, [*records, rec])
    assert _only(report, "envelope") == str(rec.location)
    assert "BadSignature" in str(report.all_findings()[0])


def test_an_old_envelope_sent_again_is_found() -> None:
    net, records = _transcript()
    again = Record(records[3].topic, 0, 10_000, 99_999, records[3].value)
    report = _audit(net, [*records, again])
    assert _only(report, "replay") == str(again.location)
    assert report.duplicates == 1


def test_a_copy_marked_as_its_senders_re_send_is_counted_not_found() -> None:
    """A sender that got no ack re-produces the same bytes with the re-send header: counted,
    no finding. The same copy without the header is a replay (the test above)."""
    net, records = _transcript()
    again = Record(records[3].topic, 0, 10_000, 99_999, records[3].value, resent=True)
    report = _audit(net, [*records, again])
    assert report.all_findings() == []
    assert report.duplicates == 1
    # the marked copy first, the unmarked one late (a producer given up on still delivered)
    first = Record(records[3].topic, 0, records[3].offset, records[3].timestamp_ms,
                   records[3].value, resent=True)
    late = dataclasses.replace(records[3], offset=10_001)
    report = _audit(net, [*records[:3], first, *records[4:], late])
    assert report.all_findings() == []
    assert report.duplicates == 1


def test_an_old_envelope_moved_to_another_topic_is_found() -> None:
    net, records = _transcript()
    other = next(r.topic for r in records if r.topic != records[3].topic)
    moved = Record(other, 0, 10_000, 99_999, records[3].value)
    report = _audit(net, [*records[:3], *records[4:], moved])
    assert _only(report, "topic") == str(moved.location)


def test_a_skipped_sequence_number_is_found() -> None:
    net, records = _transcript()
    sender = net.institutions["bank-2"]
    chain = Chain(sender.chain.next_seq + 3, sender.chain.prev)  # skips three numbers
    [wire] = seal(b"x", sender=sender.me, recipient=net.coordinator.registry[COORDINATOR],
                  consortium=CONSORTIUM, round_id=os.urandom(16),
                  kind=MessageKind.CONTRIBUTION, chain=chain)
    topic = net.coordinator.registry[COORDINATOR].topic
    rec = Record(topic, 0, 10_000, 99_999, wire)
    assert _only(_audit(net, [*records, rec]), "gap") == str(rec.location)


def test_two_envelopes_with_one_sequence_number_are_a_fork() -> None:
    net, records = _transcript()
    victim = records[5]
    h = Header.decode(msgpack.unpackb(victim.value)[1])
    sender = net.party(h.sender)
    [wire] = seal(b"other content", sender=sender.me, recipient=net.party(h.recipient).registry[
        h.recipient], consortium=CONSORTIUM, round_id=h.round_id, kind=h.kind,
        chain=Chain(h.seq, h.prev))
    rec = Record(victim.topic, 0, 10_000, 99_999, wire)
    assert _only(_audit(net, [*records, rec]), "fork") == str(rec.location)


def test_a_result_without_every_contribution_is_found() -> None:
    net, records = _transcript(rounds=1, aborted=0)
    kinds = [Header.decode(msgpack.unpackb(r.value)[1]).kind.name for r in records]
    dropped = kinds.index("CONTRIBUTION")
    report = _audit(net, records[:dropped] + records[dropped + 1:])
    assert {f.check for f in report.all_findings()} >= {"partial"}


# -- review finding 3: messages a hostile leader adds after publication are no finding ----------
def _inject(net: Network, sender: str, recipient: str, msg: Message) -> None:
    """`msg` from `sender`, sealed anew and appended to `recipient`'s topic after the round."""
    party = net.party(sender)
    for wire in seal(encode(msg), sender=party.me, recipient=party.registry[recipient],
                     consortium=CONSORTIUM, round_id=msg.round_id, kind=msg.KIND,
                     chain=party.chain):
        net.topic_log.append((party.registry[recipient].topic, wire))
        # the round has ended: refused, or dropped as a copy; nothing is sent
        assert not any(isinstance(e, Outgoing) for e in net.party(recipient).receive(wire))


@pytest.mark.parametrize("variant", ["extra chunk", "other content, same chunk"])
def test_a_share_added_after_publication_is_no_finding_against_the_coordinator(
        variant: str) -> None:
    world = make_world(3, universe=40, hold=0.7, query=35, seed=9, chunk_rows=4,
                       max_query=10_000)
    net = world.net
    rid = run_round(world, requester="bank-2", scope=Scope.INTERSECTION, min_holders=1)
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    assert m.assignment is not None
    assert _audit(net, _records(net.topic_log), COORDINATOR).all_findings() == []
    lead = net.institutions[m.leader].rounds[rid]
    assert isinstance(lead, InstitutionRound)
    last = lead.last
    assert last is not None
    width = m.assignment.width
    bad = CoordinatorShare(rid, m.digest, bytes(32), np.zeros((0, width), dtype=np.uint64),
                           last + 1, True) if variant == "extra chunk" else \
        CoordinatorShare(rid, m.digest, bytes(32), np.ones((4, width), dtype=np.uint64), 0,
                         False)
    _inject(net, m.leader, COORDINATOR, bad)
    assert _audit(net, _records(net.topic_log), COORDINATOR).all_findings() == []


def test_a_share_sealed_again_after_the_result_is_no_finding_against_the_coordinator() -> None:
    world = make_world(3, universe=40, hold=0.7, query=35, seed=9, chunk_rows=4,
                       max_query=10_000)
    net = world.net
    rid = run_round(world, requester="bank-2", scope=Scope.INTERSECTION, min_holders=1)
    m = net.coordinator.rounds[rid]
    assert isinstance(m, CoordinatorRound)
    victim = next(p for p in m.participants if p != m.leader)
    assert _audit(net, _records(net.topic_log), victim).all_findings() == []
    vp = net.party(victim)
    inbox = Inbox(vp.me, vp.registry, CONSORTIUM)
    shares = [decode(d.body) for d in (inbox.receive(w) for t, w in net.topic_log
                                       if t == vp.registry[victim].topic)
              if d is not None and d.kind is MessageKind.LEADER_SHARE]
    assert shares
    _inject(net, m.leader, victim, shares[0])
    assert _audit(net, _records(net.topic_log), victim).all_findings() == []
