"""`zerosum audit` on the real broker: honest history passes; tampering through a raw Kafka
producer is caught at the right topic and offset."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import msgpack
import pytest

from agents.audit import AuditRun, read_and_audit, to_html
from agents.cli import main
from agents.config import load_consortium, load_party
from agents.outbox import Outbox
from agents.security import KafkaAccess
from protocol.driver import keys_for
from protocol.envelope import Chain, Header, seal
from protocol.machine import Ended, Outcome
from protocol.messages import MessageKind, Scope
from protocol.tokens import tokenize
from tests.kafka_util import make_consortium, party_access, produce
from tests.test_agents_kafka import ATTRS, query_ids, running
from tests.test_audit_report import check_page

pytestmark = pytest.mark.kafka


async def _history(tmp: Path, bootstrap: KafkaAccess, rounds: int,
                   aborted: int) -> tuple[Path, float]:
    d = make_consortium(tmp, bootstrap, 3, customers=100)
    ids = query_ids(d, 60)
    t0 = time.monotonic()
    async with running(d) as agents:
        banks = [agents[f"bank-{i}"] for i in (1, 2, 3)]
        key = banks[0].cfg.consortium_key
        assert key is not None
        tokens = tokenize(ids, key)
        parts = banks[0].cfg.consortium.institutions

        async def one(r: int) -> Outcome | Ended | None:
            bad = r < aborted  # an attribute the consortium does not have: BAD_REQUEST
            return await banks[r % 3].submit(os.urandom(16), tokens, participants=parts,
                                              attributes=("salary",) if bad else ATTRS,
                                              scope=Scope.INTERSECTION, deadline_s=60)
        results = []
        for start in range(0, rounds, 20):
            results += await asyncio.gather(*(one(r) for r in range(start,
                                                                   min(rounds, start + 20))))
    assert sum(isinstance(r, Ended) for r in results) == aborted
    assert sum(isinstance(r, Outcome) for r in results) == rounds - aborted
    return d, time.monotonic() - t0


async def _audit(d: Path, bootstrap: KafkaAccess, party: str | None = None) -> AuditRun:
    auditor = party_access(d, bootstrap, "auditor")  # reads every inbox, writes none
    if party is None:
        return await read_and_audit(load_consortium(d / "consortium.toml"), auditor)
    cfg = load_party(d / f"{party}.toml")
    return await read_and_audit(cfg.consortium, auditor, key=cfg.keys)


async def test_200_rounds_some_aborted_pass_every_audit(kafka_bootstrap: KafkaAccess,
                                                        tmp_path: Path) -> None:
    d, ran = await _history(tmp_path, kafka_bootstrap, 200, 15)
    for party in (None, "coordinator", "bank-2"):
        run = await _audit(d, kafka_bootstrap, party)
        assert [str(f) for f in run.report.all_findings()] == []
        outcomes = [r.outcome for r in run.report.rounds]
        assert outcomes.count("published") == 185
        assert outcomes.count("aborted") == 15
        if party == "coordinator":
            assert {r.verified for r in run.report.rounds} == {"coordinator"}
        print(f"\naudit ({party or 'public keys'}): {run.records} records in "
              f"{run.seconds:.2f} s; running the 200 rounds took {ran:.2f} s")
    html_out, json_out = tmp_path / "a.html", tmp_path / "a.json"
    code = await asyncio.to_thread(main, ["audit", "--config", str(d / "coordinator.toml"),
                                          "--html", str(html_out), "--json", str(json_out)])
    assert code == 0
    data = json.loads(json_out.read_text())
    assert data["ok"] is True
    assert len(data["rounds"]) == 200
    assert all(m["bytes"] > 0 for r in data["rounds"] for m in r["messages"])
    page = html_out.read_text()
    assert "<svg" in page
    # the page of the coordinator's audit: every round with its swimlane
    check_page((await _audit(d, kafka_bootstrap, "coordinator")).report, page)


def _topic(d: Path, party: str) -> str:
    return load_consortium(d / "consortium.toml").registry[party].topic


async def _read_one(bootstrap: KafkaAccess, topic: str, offset: int) -> bytes:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    c = AIOKafkaConsumer(**bootstrap.aiokafka_kwargs(), enable_auto_commit=False)
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, offset)
        batch = await c.getmany(tp, timeout_ms=10_000, max_records=1)
        return bytes(batch[tp][0].value)
    finally:
        await c.stop()


async def _tampered(d: Path, bootstrap: KafkaAccess, topic: str, wire: bytes, check: str) -> None:
    [offset] = await produce(bootstrap, topic, [wire])
    run = await _audit(d, bootstrap)
    found = run.report.all_findings()
    assert not run.report.ok
    where = [f for f in found if f.check == check]
    assert where, [str(f) for f in found]
    assert str(where[0].location) == f"{topic}[0]@{offset}"
    check_page(run.report, to_html(run, "tampered"))  # every round and finding in the page
    code = await asyncio.to_thread(main, ["audit", "--config", str(d / "consortium.toml")])
    assert code == 1


@pytest.fixture
async def history(kafka_bootstrap: KafkaAccess, tmp_path: Path) -> Path:
    d, _ = await _history(tmp_path, kafka_bootstrap, 4, 1)
    run = await _audit(d, kafka_bootstrap)
    assert run.report.ok
    return d


async def test_a_modified_byte(kafka_bootstrap: KafkaAccess, history: Path) -> None:
    topic = _topic(history, "coordinator")
    wire = bytearray(await _read_one(kafka_bootstrap, topic, 2))
    wire[len(wire) // 2] ^= 0x10
    await _tampered(history, kafka_bootstrap, topic, bytes(wire), "envelope")


async def test_a_forged_sender(kafka_bootstrap: KafkaAccess, history: Path) -> None:
    c = load_consortium(history / "consortium.toml")
    mallory, _ = keys_for("mallory", b"evil")
    forged = type(mallory)("bank-1", mallory.signing_key, mallory.kem, mallory.kem_key,
                           mallory.secret)
    [wire] = seal(b"x", sender=forged, recipient=c.registry["coordinator"], consortium=c.id,
                  round_id=os.urandom(16), kind=MessageKind.CONTRIBUTION, chain=Chain())
    await _tampered(history, kafka_bootstrap, _topic(history, "coordinator"), wire, "envelope")


async def test_an_old_envelope_sent_again(kafka_bootstrap: KafkaAccess, history: Path) -> None:
    topic = _topic(history, "bank-2")
    wire = await _read_one(kafka_bootstrap, topic, 0)
    await _tampered(history, kafka_bootstrap, topic, wire, "replay")


def _sender(d: Path, party: str) -> tuple[object, Chain]:
    cfg = load_party(d / f"{party}.toml")
    return cfg.keys, Outbox(cfg.state_dir).load_chain()


async def test_an_injected_message_that_skips_a_sequence_number(kafka_bootstrap: KafkaAccess,
                                                                  history: Path) -> None:
    c = load_consortium(history / "consortium.toml")
    keys, chain = _sender(history, "bank-1")
    [wire] = seal(b"x", sender=keys, recipient=c.registry["coordinator"],  # type: ignore[arg-type]
                  consortium=c.id, round_id=os.urandom(16), kind=MessageKind.CONTRIBUTION,
                  chain=Chain(chain.next_seq + 5, chain.prev))
    await _tampered(history, kafka_bootstrap, _topic(history, "coordinator"), wire, "gap")


async def test_two_envelopes_with_the_same_sequence_number(kafka_bootstrap: KafkaAccess,
                                                           history: Path) -> None:
    topic = _topic(history, "coordinator")
    original = await _read_one(kafka_bootstrap, topic, 1)
    h = Header.decode(msgpack.unpackb(original)[1])
    keys, _ = _sender(history, h.sender)
    c = load_consortium(history / "consortium.toml")
    [wire] = seal(b"different", sender=keys, recipient=c.registry[h.recipient],  # type: ignore[arg-type]
                  consortium=c.id, round_id=h.round_id, kind=h.kind,
                  chain=Chain(h.seq, h.prev))
    await _tampered(history, kafka_bootstrap, topic, wire, "fork")
