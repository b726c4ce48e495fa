"""Key rotation: envelopes name their key epochs; old envelopes verify with old keys, unknown
epochs and retired ones are refused with typed errors; the token key rotates by epoch; the
`zerosum keys` files are written atomically, mode 600."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import numpy as np
import pytest

from agents.config import archived_key, load_consortium, load_party, load_token_keys
from agents.init import init_consortium
from agents.keys import retire_party, rotate_party, rotate_token_key
from protocol.audit import Auditor, Record
from protocol.codec import decode, encode
from protocol.driver import CONSORTIUM, keys_for
from protocol.envelope import (
    Chain,
    Header,
    Inbox,
    PrivateParty,
    PublicParty,
    open_sealed,
    seal,
    verify,
)
from protocol.errors import AbortReason, RetiredKey, UnknownEpoch
from protocol.machine import Ended
from protocol.messages import MessageKind, RoundRequest, Scope
from protocol.tokens import tokenize
from tests import samples

RID = b"\x07" * 16


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
    # a signature checked with the wrong epoch's key never passes: the epoch is signed
    forged = Header.decode(_header(wire))
    assert forged.sender_epoch == 0


def _header(wire: bytes) -> bytes:
    import msgpack

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
    # once b's epoch 0 is retired, what is sealed to it is refused
    registry["b"] = entry("b", 1, retired=frozenset({0}))
    late = Inbox(held, registry, CONSORTIUM)
    with pytest.raises(RetiredKey):
        late.receive(wire)


def test_a_retired_epoch_is_refused_live_and_still_audited() -> None:
    a0, _ = rotated("a", 0)
    b_priv, b_pub = rotated("b", 0)
    wire = send(a0, b_pub, Chain())
    registry = {"a": entry("a", 2, retired=frozenset({0})), "b": b_pub}
    with pytest.raises(RetiredKey):
        Inbox(b_priv, registry, CONSORTIUM).receive(wire)
    # an agent replaying inputs it accepted before the retirement rebuilds them as they were
    replay = Inbox(b_priv, registry, CONSORTIUM)
    replay.live = False
    assert replay.receive(wire) is not None
    # the audit verifies old envelopes with the old public keys, retired or not
    auditor = Auditor(registry, CONSORTIUM, "a")
    auditor.feed(Record(b_pub.topic, 0, 0, 1, wire))
    assert auditor.finish().findings == []


def test_an_old_key_signs_nothing_after_its_successor_has() -> None:
    """The grace rule: once a receiver has seen a sender sign with its new epoch, the old
    key's envelopes are accepted only if sent before (lower sequence numbers): a hostile
    holder of the old key cannot go on with it, and the audit names such an envelope."""
    a0, _ = rotated("a", 0)
    a1, _ = rotated("a", 1)
    b_priv, b_pub = rotated("b", 0)
    chain = Chain()
    first = send(a0, b_pub, chain)        # seq 0, epoch 0: sent before the rotation
    in_flight = send(a0, b_pub, chain)    # seq 1, epoch 0: in the topic at the rotation
    new = send(a1, b_pub, chain)          # seq 2, epoch 1
    stolen = send(a0, b_pub, chain)       # seq 3, epoch 0: the old key after the new one
    registry = {"a": entry("a", 1), "b": b_pub}
    inbox = Inbox(b_priv, registry, CONSORTIUM)
    for w in (first, new, in_flight):     # reordered: the in-flight one after the new key
        assert inbox.receive(w) is not None
    with pytest.raises(RetiredKey):
        inbox.receive(stolen)
    auditor = Auditor(registry, CONSORTIUM, "b")
    for i, w in enumerate((first, in_flight, new, stolen)):
        auditor.feed(Record(b_pub.topic, 0, i, i, w))
    assert [f.check for f in auditor.finish().findings] == ["key epoch"]


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
                   if s.message.KIND is MessageKind.MASK_ASSIGNMENT]
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
