"""Key rotation: envelopes name their key epochs; old envelopes verify with old keys, unknown
epochs and retired ones are refused with typed errors; the token key rotates by epoch; the
`zerosum keys` files are written atomically, mode 600."""

from __future__ import annotations

import asyncio
import dataclasses
import stat
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from agents import keys as keys_module
from agents.agent import Agent
from agents.clock import FakeClock
from agents.config import (
    ConfigError,
    archived_key,
    load_consortium,
    load_party,
    load_token_keys,
)
from agents.init import init_consortium
from agents.keys import retire_party, rotate_party, rotate_token_key
from protocol.audit import Auditor, Record
from protocol.codec import assignment_digest, attestation_statement, decode, encode
from protocol.driver import CONSORTIUM, COORDINATOR, Network, build_network, keys_for
from protocol.envelope import (
    Chain,
    Header,
    Inbox,
    PrivateParty,
    PublicParty,
    open_sealed,
    seal,
    unpad,
    verify,
)
from protocol.errors import (
    AbortReason,
    BadSignature,
    DuplicateEnvelope,
    RetiredKey,
    UnknownEpoch,
    UnsupportedVersion,
)
from protocol.institution import InstitutionRound, request_terms
from protocol.machine import Ended, Published
from protocol.messages import MaskAssignment, MessageKind, RoundRequest, Scope
from protocol.party import CoordinatorParty, Event, InstitutionParty, Outgoing, Rejected
from protocol.tokens import LocalTable, tokenize
from tests import samples
from tests.helpers import DEADLINE, KEY, SPECS

RID = b"\x07" * 16
COORD_NAME = "coordinator"  # as `zerosum init` names it


def rotated(name: str, epoch: int) -> tuple[PrivateParty, PublicParty]:
    """`name`'s keys of `epoch` (epoch 0: the driver's test keys), each epoch different."""
    priv, pub = keys_for(name, b"epoch-%d" % epoch)
    return (dataclasses.replace(priv, epoch=epoch),
            dataclasses.replace(pub, epoch=epoch))


def entry(name: str, epoch: int, *, retired: frozenset[int] = frozenset()) -> PublicParty:
    """`name`'s registry entry at `epoch`, with every earlier epoch's public keys."""
    earlier = tuple(rotated(name, e)[1] for e in range(epoch))
    return dataclasses.replace(rotated(name, epoch)[1], earlier=earlier, retired=retired)


def send(sender: PrivateParty, recipient: PublicParty, chain: Chain, body: bytes = b"x"
         ) -> bytes:
    (wire,) = seal(body, sender=sender, recipient=recipient, consortium=CONSORTIUM,
                   round_id=RID, kind=MessageKind.ROUND_ABORT, chain=chain)
    return wire


def test_an_old_envelope_verifies_with_its_old_epoch_after_a_rotation() -> None:
    a0, _ = rotated("a", 0)
    b_priv, b_pub = rotated("b", 0)
    wire = send(a0, b_pub, Chain())
    assert Header.decode(_header(wire)).version == 1  # epochs 0: the header of before
    after = {"a": entry("a", 1), "b": b_pub}  # a rotated; its epoch 0 kept
    v = verify(wire, after, CONSORTIUM)
    assert v.header.sender_epoch == 0
    assert open_sealed(b_priv, v)
    # the new key signs epoch-1 envelopes, named in a version 2 header
    a1, _ = rotated("a", 1)
    new = verify(send(a1, b_pub, Chain(1, v.digest)), after, CONSORTIUM)
    assert (new.header.version, new.header.sender_epoch) == (2, 1)
    # without the old public keys, the old envelope's epoch is unknown: typed
    with pytest.raises(UnknownEpoch):
        verify(wire, {"a": rotated("a", 1)[1], "b": b_pub}, CONSORTIUM)
    # the epoch is part of the signed header: claiming epoch 1 for an epoch-0 signature fails
    raw = msgpack.unpackb(send(a0, b_pub, Chain(1, v.digest)))
    relabelled = dataclasses.replace(Header.decode(raw[1]), version=2, sender_epoch=1)
    with pytest.raises(BadSignature):
        verify(msgpack.packb([raw[0], relabelled.encode(), raw[2], raw[3]],
                             use_bin_type=True), after, CONSORTIUM)


def _header(wire: bytes) -> bytes:
    raw: bytes = msgpack.unpackb(wire)[1]
    return raw


def test_an_unknown_epoch_is_a_typed_rejection() -> None:
    a5, _ = rotated("a", 5)
    _, b_pub = rotated("b", 0)
    wire = send(a5, b_pub, Chain())
    with pytest.raises(UnknownEpoch):
        verify(wire, {"a": entry("a", 1), "b": b_pub}, CONSORTIUM)
    # sealed to a KEM epoch the recipient does not hold (its key destroyed): typed too
    b_priv, _ = rotated("b", 0)
    b1_pub = rotated("b", 1)[1]
    sealed_to_1 = verify(send(rotated("a", 0)[0], b1_pub, Chain()),
                         {"a": rotated("a", 0)[1], "b": b1_pub}, CONSORTIUM)
    with pytest.raises(UnknownEpoch):
        open_sealed(b_priv, sealed_to_1)


def test_a_party_opens_what_was_sealed_to_its_previous_epoch() -> None:
    """A peer that has not reloaded the consortium file seals to the old KEM key: the rotated
    party still holds it (its archived key file) and opens the envelope."""
    b0, b0_pub = rotated("b", 0)
    b1, _ = rotated("b", 1)
    held = dataclasses.replace(b1, earlier_kem=((0, b0.kem, b0.kem_key),))
    registry = {"a": rotated("a", 0)[1], "b": entry("b", 1)}
    wire = send(rotated("a", 0)[0], b0_pub, Chain(), b"late")
    inbox = Inbox(held, registry, CONSORTIUM)
    got = inbox.receive(wire)
    assert got is not None
    assert got.body
    # once b's epoch 0 is retired (its agent recorded it), what is sealed to it is refused
    registry["b"] = entry("b", 1, retired=frozenset({0}))
    late = Inbox(held, registry, CONSORTIUM)
    late.retire("b", 0, 0)
    with pytest.raises(RetiredKey):
        late.receive(wire)


def test_a_retired_epoch_is_refused_from_its_position_and_still_audited() -> None:
    a0, _ = rotated("a", 0)
    b_priv, b_pub = rotated("b", 0)
    chain = Chain()
    first, second = send(a0, b_pub, chain), send(a0, b_pub, chain)
    registry = {"a": entry("a", 2, retired=frozenset({0})), "b": b_pub}
    # b's agent recorded "a's epoch 0 is retired from inbox position 1": the input at 0 was
    # handled before, and is accepted again when the inbox is replayed; the one at 1 is not
    for _ in range(2):  # live, then a replay: the same answers
        inbox = Inbox(b_priv, registry, CONSORTIUM)
        inbox.retire("a", 0, 1)
        assert inbox.receive(first, 0) is not None
        with pytest.raises(RetiredKey):
            inbox.receive(second, 1)
    # without a position (not an agent's input): every recorded retirement applies
    inbox = Inbox(b_priv, registry, CONSORTIUM)
    inbox.retire("a", 0, 1)
    with pytest.raises(RetiredKey):
        inbox.receive(first)
    # the consortium file's `retired` alone refuses nothing: the agent records it first
    assert Inbox(b_priv, registry, CONSORTIUM).receive(first, 5) is not None
    # the audit verifies old envelopes with the old public keys, retired or not
    auditor = Auditor(registry, CONSORTIUM, "a")
    auditor.feed(Record(b_pub.topic, 0, 0, 1, first))
    assert auditor.finish().findings == []


def test_an_old_key_signs_nothing_after_its_successor_has() -> None:
    """Once a receiver has seen a sender sign with its new epoch, it refuses the old key's
    envelopes whatever their sequence number (a sender's envelopes reach one inbox in chain
    order); an exact duplicate of one accepted before stays a harmless duplicate; the audit
    names an old-epoch envelope after a newer one."""
    a0, _ = rotated("a", 0)
    a1, _ = rotated("a", 1)
    b_priv, b_pub = rotated("b", 0)
    chain = Chain()
    first = send(a0, b_pub, chain)        # seq 0, epoch 0: sent before the rotation
    in_flight = send(a0, b_pub, chain)    # seq 1, epoch 0
    new = send(a1, b_pub, chain)          # seq 2, epoch 1
    stolen = send(a0, b_pub, chain)       # seq 3, epoch 0: the old key after the new one
    registry = {"a": entry("a", 1), "b": b_pub}
    inbox = Inbox(b_priv, registry, CONSORTIUM)
    for w in (first, in_flight, new):
        assert inbox.receive(w) is not None
    with pytest.raises(RetiredKey):
        inbox.receive(stolen)
    with pytest.raises(DuplicateEnvelope):
        inbox.receive(in_flight)
    late = Inbox(b_priv, registry, CONSORTIUM)  # an old envelope after the new key: refused
    for w in (first, new):
        assert late.receive(w) is not None
    with pytest.raises(RetiredKey):
        late.receive(in_flight)
    auditor = Auditor(registry, CONSORTIUM, "b")
    for i, w in enumerate((first, in_flight, new, stolen)):
        auditor.feed(Record(b_pub.topic, 0, i, i, w))
    assert [f.check for f in auditor.finish().findings] == ["key epoch"]


def test_the_old_key_cannot_fill_a_gap_below_the_new_epoch() -> None:
    """A sender's chain spans every recipient, so each inbox sees gaps in it: a holder of the
    previous key forges an envelope at a gap's sequence number, after the receiver saw the
    new key. Refused."""
    a0, _ = rotated("a", 0)
    a1, _ = rotated("a", 1)
    b_priv, b_pub = rotated("b", 0)
    _, c_pub = rotated("c", 0)
    registry = {"a": entry("a", 1), "b": b_pub, "c": c_pub}
    chain = Chain()
    for _ in range(3):
        send(a0, c_pub, chain)             # seq 0..2 went to c, not to b
    inbox = Inbox(b_priv, registry, CONSORTIUM)
    assert inbox.receive(send(a1, b_pub, chain)) is not None  # seq 3, epoch 1
    forged = send(a0, b_pub, Chain(1, b"\x00" * 32), b"forged RoundResult")
    with pytest.raises(RetiredKey):
        inbox.receive(forged)


def test_an_in_message_signature_with_an_old_key_only_in_rounds_opened_before() -> None:
    """Statements inside messages (attestations, endorsements) can be forwarded, so they are
    judged by round: a round opened here before this party saw the signer's new epoch accepts
    the old key (it may have signed before it rotated); a round opened after does not; a
    recorded retirement refuses it from its position on, in every round."""
    a0, _ = rotated("a", 0)
    a1, _ = rotated("a", 1)
    b_priv, b_pub = rotated("b", 0)
    registry = {"a": entry("a", 1), "b": b_pub}
    party = CoordinatorParty(b_priv, registry, CONSORTIUM, samples.coordinator().policy)
    ring, inbox = party.keyring, party.inbox
    statement = b"a statement"
    old_sig, new_sig = a0.signing_key.sign(statement), a1.signing_key.sign(statement)
    early, late = b"\x01" * 16, b"\x02" * 16
    chain = Chain()
    inbox.receive(send(a0, b_pub, chain), 0)
    inbox.open_round(early)
    inbox.receive(send(a1, b_pub, chain), 1)  # b has seen a's epoch 1
    inbox.open_round(late)
    inbox.position = 2
    inbox.round_id = early
    assert ring.verify("a", old_sig, statement)
    assert ring.verify("a", new_sig, statement)
    inbox.round_id = late
    assert not ring.verify("a", old_sig, statement)
    assert ring.verify("a", new_sig, statement)
    inbox.retire("a", 0, 3)
    inbox.round_id = early
    assert ring.verify("a", old_sig, statement)  # position 2: before the retirement
    inbox.position = 3
    assert not ring.verify("a", old_sig, statement)


def test_tokens_differ_across_token_epochs_and_travel_in_the_round() -> None:
    ids = ["CUST-1", "CUST-2"]
    k0, k1 = b"\x01" * 32, b"\x02" * 32
    assert not np.intersect1d(tokenize(ids, k0), tokenize(ids, k1)).size
    req = samples.request()
    assert b"token_epoch" not in encode(req)  # epoch 0: the bytes of before
    later = dataclasses.replace(req, token_epoch=3)
    back = decode(encode(later))
    assert isinstance(back, RoundRequest)
    assert back.token_epoch == 3
    # the coordinator puts the request's token epoch into every assignment
    outputs = samples.coordinator().handle(req.requester, later)
    assignments = [s.message for s in samples.sends(outputs)
                   if isinstance(s.message, MaskAssignment)]
    assert assignments
    assert {a.token_epoch for a in assignments} == {3}


def test_a_round_under_a_token_epoch_not_held_aborts_typed() -> None:
    name = samples.NAMES[1]
    m = samples.institution(name)
    req = dataclasses.replace(samples.request(), token_epoch=4, scope=Scope.QUERY)
    outputs = samples.coordinator().handle(req.requester, req)
    mine = next(s.message for s in samples.sends(outputs)
                if s.recipient == name and s.message.KIND is MessageKind.MASK_ASSIGNMENT)
    out = m.handle(samples.COORD, mine)
    ended = [o for o in out if isinstance(o, Ended)]
    assert ended
    assert ended[0].reason is AbortReason.TOKEN_EPOCH


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_zerosum_keys_rotate_writes_epochs_atomically_mode_600(tmp_path: Path) -> None:
    d = tmp_path / "c"
    init_consortium(d, institutions=2, customers=10, bootstrap="127.0.0.1:1", insecure=True)
    cfile = d / "consortium.toml"
    before = load_party(d / "bank-1.toml")
    done = rotate_party(cfile, "bank-1")
    assert done.epoch == 1
    key = d / "keys" / "bank-1" / "bank-1.key"
    assert _mode(key) == 0o600
    assert _mode(archived_key(key, 0)) == 0o600
    assert "policy" in cfile.read_text()
    assert "# The consortium's floors" in cfile.read_text()
    cfg = load_party(d / "bank-1.toml")
    assert cfg.keys.epoch == 1
    assert [e for e, _, _ in cfg.keys.earlier_kem] == [0]  # what was sealed to it opens
    entry1 = cfg.consortium.registry["bank-1"]
    assert entry1.epoch == 1
    assert entry1.signing_key != before.keys.signing_key.public_key()
    assert entry1.at(0) is not None
    assert entry1.retired == frozenset()
    assert cfg.keys.secret == before.keys.secret
    rotate_party(cfile, "bank-1")
    again = load_consortium(cfile).registry["bank-1"]
    assert (again.epoch, again.retired) == (2, frozenset({0}))  # one epoch in its grace
    retire_party(cfile, "bank-1")
    assert load_consortium(cfile).registry["bank-1"].retired == frozenset({0, 1})
    # the token key: a new epoch at every institution, the coordinator never has one
    rotate_token_key(cfile)
    e1, k1, earlier1 = load_token_keys(d / "keys" / "bank-1" / "consortium.key")
    e2, k2, _ = load_token_keys(d / "keys" / "bank-2" / "consortium.key")
    assert (e1, k1) == (e2, k2)
    assert e1 == 1
    assert list(earlier1) == [0]
    assert earlier1[0] == before.consortium_key
    assert _mode(d / "keys" / "bank-2" / "consortium.key") == 0o600
    assert not (d / "keys" / "coordinator" / "consortium.key").exists()
    assert load_party(d / "bank-2.toml").token_epoch == 1
    # no key in a repr (what a log line could show)
    text = repr(load_party(d / "bank-1.toml"))
    assert k1.hex() not in text
    assert cfg.keys.secret.hex() not in text


# -- retirement by inbox position: a restart's replay rebuilds what the live run did ----------

def _table(ids: list[str]) -> LocalTable:
    vals = np.array([[100 * (i + 1), i] for i in range(len(ids))], dtype=np.int64)
    return LocalTable.build(tokenize(ids, KEY), vals.reshape(len(ids), 2),
                            ("balance", "overdue_days"))


def _sender(wire: bytes) -> str:
    return Header.decode(_header(wire)).sender


class _Positions:
    """Each party's inbox as a topic: what it received, in order, at positions 0, 1, ..."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.topics: dict[str, list[bytes]] = {}

    def deliver(self, to: str, wire: bytes) -> list[Event]:
        topic = self.topics.setdefault(to, [])
        topic.append(wire)
        events = self.net.party(to).receive(wire, len(topic) - 1)
        self.net.take(to, events)
        return events


def _network() -> tuple[Network, _Positions, bytes]:
    tables = {"bank-a": _table(["x", "y"]), "bank-b": _table(["y", "z"]),
              "bank-c": _table(["y"])}
    net = build_network(tables, SPECS)
    rid = b"\x42" * 16
    net.take("bank-a", net.institutions["bank-a"].request(
        rid, tokenize(["x", "y", "z"], KEY), participants=tuple(tables),
        attributes=("balance", "overdue_days"), deadline_ms=DEADLINE, scope=Scope.QUERY))
    return net, _Positions(net), rid


def _replay(party: CoordinatorParty | InstitutionParty, wires: list[bytes]) -> list[Event]:
    """What an agent does on restart: the inbox again, from position 0, outputs suppressed."""
    party.sealing = False
    events: list[Event] = []
    for i, w in enumerate(wires):
        events += party.receive(w, i)
    party.sealing = True
    return events


def test_replay_refuses_what_live_refused_as_retired() -> None:
    """bank-c's epoch 0 is retired; a hostile bank-c signs a contribution with it. Live, the
    coordinator refuses it; after a restart, the replay refuses it too (the retirement is
    recorded from inbox position 0), so bank-c's genuine contribution still ends the round."""
    net, pos, rid = _network()
    reg = net.coordinator.registry  # shared by every party
    c0, c0_pub = keys_for("bank-c", b"zerosum-test")
    c1, c1_pub = keys_for("bank-c", b"epoch-1")
    c1 = dataclasses.replace(c1, epoch=1, earlier_kem=((0, c0.kem, c0.kem_key),))
    reg["bank-c"] = dataclasses.replace(c1_pub, epoch=1, earlier=(c0_pub,),
                                        retired=frozenset({0}))
    net.coordinator.retire("bank-c", 0, 0)  # what the coordinator's agent records
    hostile = net.institutions["bank-c"]
    hostile.rekey(c1)
    held: list[bytes] = []
    while net.in_flight:
        to, wire, _ = net.in_flight.pop(0)
        if to == COORDINATOR and _sender(wire) == "bank-c":
            held.append(wire)  # bank-c's genuine contribution: not yet delivered
            continue
        pos.deliver(to, wire)
    (genuine,) = held
    ck0, _ = keys_for(COORDINATOR, b"zerosum-test")
    junk = decode(unpad(open_sealed(ck0, verify(genuine, reg, CONSORTIUM))))
    (forged,) = seal(encode(junk), sender=dataclasses.replace(c0, epoch=0),
                     recipient=reg[COORDINATOR], consortium=CONSORTIUM, round_id=rid,
                     kind=junk.KIND, chain=hostile.chain)
    live = pos.deliver(COORDINATOR, forged)
    assert any(isinstance(e, Rejected) and isinstance(e.error, RetiredKey) for e in live)
    m = net.coordinator.rounds[rid]
    assert m.state not in m.TERMINAL
    # the coordinator restarts with what its agent recorded, and replays its inbox
    again = CoordinatorParty(ck0, reg, CONSORTIUM, net.coordinator.policy)
    again.retire("bank-c", 0, 0)
    replayed = _replay(again, pos.topics[COORDINATOR])
    r = again.rounds[rid]
    assert r.state == m.state
    assert not any(isinstance(e, Published) for e in replayed)
    after = again.receive(genuine, len(pos.topics[COORDINATOR]))
    assert any(isinstance(e, Published) for e in after)


def test_replay_accepts_an_attestation_accepted_before_the_retirement() -> None:
    """bank-c accepted an assignment attested with the coordinator's epoch 0; epoch 0 is
    retired afterwards (from bank-c's next inbox position); bank-c restarts: the replay
    accepts the assignment and its attestation as the live run did."""
    net, pos, rid = _network()
    while net.in_flight:
        to, wire, _ = net.in_flight.pop(0)
        if to == "bank-c" or to == COORDINATOR:
            pos.deliver(to, wire)
    live = net.institutions["bank-c"].rounds[rid]
    reg = net.coordinator.registry
    _, c0_pub = keys_for(COORDINATOR, b"zerosum-test")
    _, c1_pub = keys_for(COORDINATOR, b"epoch-1")
    reg[COORDINATOR] = dataclasses.replace(c1_pub, epoch=1, earlier=(c0_pub,),
                                           retired=frozenset({0}))
    ck, _ = keys_for("bank-c", b"zerosum-test")
    again = InstitutionParty(ck, reg, CONSORTIUM, coordinator=COORDINATOR,
                             table=net.institutions["bank-c"].table,
                             policy=net.institutions["bank-c"].policy)
    again.retire(COORDINATOR, 0, len(pos.topics["bank-c"]))  # from the next position on
    _replay(again, pos.topics["bank-c"])
    replayed = again.rounds.get(rid)
    assert replayed is not None
    assert replayed.state == live.state
    assert replayed.state not in replayed.TERMINAL


# -- the agent: retirements recorded durably from its next inbox position; grace by its clock --

def _consortium(tmp_path: Path, institutions: int = 2) -> Path:
    d = tmp_path / "c"
    init_consortium(d, institutions=institutions, customers=10, bootstrap="127.0.0.1:1",
                    insecure=True)
    return d


def test_an_agent_records_a_retirement_from_its_next_position(tmp_path: Path) -> None:
    d = _consortium(tmp_path)
    cfile = d / "consortium.toml"
    clock = FakeClock(datetime.now(UTC).timestamp())
    agent = Agent(load_party(d / "bank-1.toml"), clock=clock)
    agent.live_from(3)  # recovered: inputs from position 3 on are handled live
    rotate_party(cfile, COORD_NAME, grace_s=600)
    rotate_party(cfile, COORD_NAME, grace_s=600)  # epoch 0 retired, epoch 1 in its grace
    agent._refresh_consortium()
    assert agent.party.inbox.retired == {(COORD_NAME, 0): 3}
    # the record is in the state directory: a restarted agent has it before it replays
    assert Agent(load_party(d / "bank-1.toml")).party.inbox.retired == {(COORD_NAME, 0): 3}
    # an input handled at position 7; then the agent's clock passes epoch 1's grace_until:
    # retired from the next position, 8
    agent.party.receive(b"not an envelope", 7)
    agent._refresh_consortium()
    assert (COORD_NAME, 1) not in agent.party.inbox.retired
    clock.advance(601)
    agent._refresh_consortium()
    assert agent.party.inbox.retired == {(COORD_NAME, 0): 3, (COORD_NAME, 1): 8}
    assert Agent(load_party(d / "bank-1.toml")).party.inbox.retired == \
        {(COORD_NAME, 0): 3, (COORD_NAME, 1): 8}
    # before it has recovered, an agent records nothing (it does not know its position yet)
    fresh = Agent(load_party(d / "bank-2.toml"), clock=clock)
    fresh._refresh_consortium()
    assert fresh.party.inbox.retired == {}
    fresh.live_from(0)
    assert fresh.party.inbox.retired == {(COORD_NAME, 0): 0, (COORD_NAME, 1): 0}


def test_rotate_writes_a_grace_end_and_archives_only_the_kem_key(tmp_path: Path) -> None:
    d = _consortium(tmp_path)
    cfile = d / "consortium.toml"
    before = load_party(d / "bank-1.toml")
    at = datetime(2030, 1, 1, tzinfo=UTC)
    rotate_party(cfile, "bank-1", now=at)  # default grace: the policy's max_deadline_s
    c = load_consortium(cfile)
    assert c.grace_until == {("bank-1", 0): at.timestamp() + c.policy.max_deadline_s}
    rotate_party(cfile, "bank-1", grace_s=60, now=at)
    assert load_consortium(cfile).grace_until == {("bank-1", 1): at.timestamp() + 60}
    archive = tomllib.loads(archived_key(d / "keys" / "bank-1" / "bank-1.key", 0).read_text())
    assert set(archive) == {"epoch", "kem", "kem_private"}  # the old signing seed is gone
    assert archive["kem_private"] != ""
    assert before.keys.secret.hex() not in str(archive)
    cfg = load_party(d / "bank-1.toml")
    assert [e for e, _, _ in cfg.keys.earlier_kem] == [0, 1]


def test_a_failed_token_rekey_is_retried_until_it_holds(tmp_path: Path) -> None:
    """The token key rotates while the data file is bad (an upload in progress): the agent
    keeps the old token key, and takes the new one once the data file is good again."""
    d = _consortium(tmp_path)
    cfg = load_party(d / "bank-1.toml")
    agent = Agent(cfg)
    assert cfg.data is not None
    good = cfg.data.read_text()
    cfg.data.write_text("customer_id,balance\nX,notanumber\n")
    rotate_token_key(d / "consortium.toml")
    asyncio.run(agent._refresh_data())
    assert agent.cfg.token_epoch == 0  # the old key kept: a table never under a wrong epoch
    cfg.data.write_text(good)
    asyncio.run(agent._refresh_data())
    assert agent.cfg.token_epoch == 1
    assert agent.snapshot is not None
    assert agent.snapshot.epoch == 1
    assert isinstance(agent.party, InstitutionParty)
    assert agent.party._context().table_of(1) is not None


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3])
def test_an_interrupted_party_rotation_completes_when_run_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int) -> None:
    d = _consortium(tmp_path)
    cfile = d / "consortium.toml"
    key = d / "keys" / "bank-1" / "bank-1.key"
    steps = _crash_at(monkeypatch, crash_at)
    with pytest.raises(OSError, match="power cut"):
        rotate_party(cfile, "bank-1")
    monkeypatch.undo()
    assert steps == [crash_at]
    load_party(d / "bank-1.toml")  # the agent starts whatever step the crash came at
    done = rotate_party(cfile, "bank-1")  # run again: the rotation completes
    assert done.epoch == 1
    cfg = load_party(d / "bank-1.toml")
    assert (cfg.keys.epoch, cfg.consortium.registry["bank-1"].epoch) == (1, 1)
    assert tomllib.loads(key.read_text())["epoch"] == 1
    assert set(tomllib.loads(archived_key(key, 0).read_text())) == {"epoch", "kem",
                                                                    "kem_private"}
    assert not list(key.parent.glob("*.next"))
    assert rotate_party(cfile, "bank-1").epoch == 2  # and the next one works as usual


@pytest.mark.parametrize("crash_at", [0, 1])
def test_an_interrupted_token_rotation_completes_when_run_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int) -> None:
    d = _consortium(tmp_path, institutions=3)
    cfile = d / "consortium.toml"
    files = [d / "keys" / f"bank-{i}" / "consortium.key" for i in (1, 2, 3)]
    _, k0, _ = load_token_keys(files[0])
    _crash_at(monkeypatch, crash_at + 1)  # after crash_at + 1 of the 3 files
    with pytest.raises(OSError, match="power cut"):
        rotate_token_key(cfile)
    monkeypatch.undo()
    assert rotate_token_key(cfile).epoch == 1
    keys = [load_token_keys(f) for f in files]
    assert len({(e, k) for e, k, _ in keys}) == 1
    assert keys[0][0] == 1
    assert all(earlier == {0: k0} for _, _, earlier in keys)


def _crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Make the n-th file change of `agents.keys` (0-based) fail as a power cut would."""
    count, crashed = [0], []

    def step(real: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            if count[0] - 1 == n:
                crashed.append(n)
                raise OSError("power cut")
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(keys_module, "write_atomic", step(keys_module.write_atomic))
    monkeypatch.setattr(keys_module, "_install", step(keys_module._install))
    return crashed


def test_keys_commands_take_a_lock_and_check_the_file_before_replacing_it(
        tmp_path: Path) -> None:
    d = _consortium(tmp_path)
    cfile = d / "consortium.toml"
    with keys_module.lock(cfile), pytest.raises(ConfigError, match="another"):
        rotate_party(cfile, "bank-1")
    text = cfile.read_text()
    with pytest.raises(ConfigError):
        keys_module._write_parties(cfile, {"bank-1": {"kem": "x25519"}})
    assert cfile.read_text() == text
    assert not [p for p in cfile.parent.iterdir() if p.name.endswith(".tmp")]


# -- the requester checks its own round's assignment against its request ------------------

@pytest.mark.parametrize("change", [
    {"token_epoch": 1}, {"scope": Scope.QUERY}, {"min_holders": 2},
    {"query_digest": b"\x00" * 32}, {"query_size": 3},
    {"participants": ("bank-a", "bank-b")},
    {"attributes": (SPECS[0],), "mask": np.zeros(2, dtype=np.uint64)}])
def test_the_requester_aborts_an_assignment_that_differs_from_its_request(
        change: dict[str, Any]) -> None:
    req = samples.request()
    honest = samples.transcript().assignments["bank-a"]
    terms = request_terms(req, samples.POLICY.chunk_rows)
    ctx = dataclasses.replace(samples.institution("bank-a").ctx,
                              requested={req.round_id: terms},
                              earlier_tables={1: samples.TABLES["bank-a"]})
    assert not [o for o in InstitutionRound(req.round_id, ctx).handle(samples.COORD, honest)
                if isinstance(o, Ended)]
    hostile = samples.attested(dataclasses.replace(honest, **change))
    ended = [o for o in InstitutionRound(req.round_id, ctx).handle(samples.COORD, hostile)
             if isinstance(o, Ended)]
    assert [(e.reason, e.culprits) for e in ended] == [(AbortReason.INCONSISTENT,
                                                        (samples.COORD,))]


def test_a_coordinator_changing_the_token_epoch_is_named_by_the_requester() -> None:
    """A hostile coordinator puts another held token epoch into the requester's assignment
    (the round would come back empty, as if nobody held the customers): the requester's
    party aborts it, naming the coordinator."""
    net, _, rid = _network()
    requester = net.institutions["bank-a"]
    requester.set_table(requester.table, 0, {1: requester.table})  # epoch 1 is held too
    reg = net.coordinator.registry
    to_coordinator = [w for to, w, _ in net.in_flight if to == COORDINATOR]
    net.in_flight.clear()
    out = [e for w in to_coordinator for e in net.coordinator.receive(w)]
    mine = next(w for e in out if isinstance(e, Outgoing) and e.recipient == "bank-a"
                for w in e.wires
                if Header.decode(_header(w)).kind is MessageKind.MASK_ASSIGNMENT)
    honest = decode(unpad(open_sealed(requester.me, verify(mine, reg, CONSORTIUM))))
    assert isinstance(honest, MaskAssignment)
    changed = dataclasses.replace(honest, token_epoch=1)
    hostile = dataclasses.replace(changed, attestation=net.coordinator.keyring.sign(
        attestation_statement(rid, assignment_digest(changed))))
    (wire,) = seal(encode(hostile), sender=net.coordinator.me, recipient=reg["bank-a"],
                   consortium=CONSORTIUM, round_id=rid, kind=hostile.KIND,
                   chain=net.coordinator.chain)
    ended = [e for e in requester.receive(wire) if isinstance(e, Ended)]
    assert [(e.reason, e.culprits) for e in ended] == [(AbortReason.INCONSISTENT,
                                                        (COORDINATOR,))]


@pytest.mark.parametrize("version", [{}, [], 1.0, True, None, "1"])
def test_a_header_version_of_another_type_is_a_typed_rejection(version: object) -> None:
    """Found by tests/test_fuzz.py: an empty map as the version raised an untyped TypeError."""
    fields = [version, "c", b"\x00" * 16, 1, "a", "b", 0, b"\x00" * 32, 0, 1]
    with pytest.raises(UnsupportedVersion):
        Header.decode(msgpack.packb(fields, use_bin_type=True))
