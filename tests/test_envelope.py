"""Envelopes: sealed to the recipient, signed, chained; tampering and replays are rejected."""

from __future__ import annotations

import contextlib
import os
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.driver import CONSORTIUM, keys_for
from protocol.envelope import (
    CHUNK_BYTES,
    Chain,
    Header,
    Inbox,
    KemKind,
    PublicParty,
    seal,
    verify,
)
from protocol.errors import (
    BadCiphertext,
    BadSignature,
    BrokenChain,
    CodecError,
    DuplicateEnvelope,
    EnvelopeError,
    EquivocationError,
    MessageTooLarge,
    UnknownSender,
    WrongConsortium,
    WrongRecipient,
    ZerosumError,
)
from protocol.messages import MessageKind

RID = bytes(16)


def _setup(kem: KemKind = KemKind.X25519) -> tuple[dict[str, PublicParty], Inbox, Chain]:
    _alice, alice_pub = keys_for("alice", b"t", kem)
    bob, bob_pub = keys_for("bob", b"t", kem)
    registry = {"alice": alice_pub, "bob": bob_pub}
    return registry, Inbox(bob, registry, CONSORTIUM), Chain()


def _seal(body: bytes, chain: Chain, *, rid: bytes = RID, to: str = "bob",
          kem: KemKind = KemKind.X25519) -> list[bytes]:
    alice, _ = keys_for("alice", b"t", kem)
    registry, _, _ = _setup(kem)
    return seal(body, sender=alice, recipient=registry[to], consortium=CONSORTIUM, round_id=rid,
                kind=MessageKind.CONTRIBUTION, chain=chain)


@pytest.mark.parametrize("kem", list(KemKind))
def test_round_trip_with_each_kem(kem: KemKind) -> None:
    _, inbox, chain = _setup(kem)
    [wire] = _seal(b"secret body 12345", chain, kem=kem)
    assert b"secret body" not in wire
    d = inbox.receive(wire)
    assert d is not None
    assert (d.sender, d.body, d.kind, d.round_id) == ("alice", b"secret body 12345",
                                                      MessageKind.CONTRIBUTION, RID)


def test_every_single_bit_flip_is_rejected() -> None:
    _, _, chain = _setup()
    [wire] = _seal(b"x" * 40, chain)
    for bit in range(len(wire) * 8):
        _, inbox, _ = _setup()
        bad = bytearray(wire)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((EnvelopeError, CodecError)):
            inbox.receive(bytes(bad))


def test_header_changes_break_the_signature() -> None:
    """A valid envelope moved into another round (or to another sender) does not verify."""
    _, inbox, chain = _setup()
    [wire] = _seal(b"body", chain)
    version, header, ct, sig = msgpack.unpackb(wire)
    h = Header.decode(header)
    for changed in (Header(h.version, h.consortium, b"\x01" * 16, h.kind, h.sender, h.recipient,
                           h.seq, h.prev, h.part, h.parts),
                    Header(h.version, h.consortium, h.round_id, h.kind, h.sender, h.recipient,
                           h.seq + 1, h.prev, h.part, h.parts)):
        forged = msgpack.packb([version, changed.encode(), ct, sig], use_bin_type=True)
        with pytest.raises(BadSignature):
            inbox.receive(forged)


def test_duplicate_replay_and_equivocation() -> None:
    _, inbox, chain = _setup()
    first = _seal(b"one", chain)[0]
    assert inbox.receive(first) is not None
    with pytest.raises(DuplicateEnvelope):
        inbox.receive(first)
    other = _seal(b"two", Chain())[0]  # same seq 0, different content
    with pytest.raises(EquivocationError) as info:
        inbox.receive(other)
    assert info.value.evidence[1] == other


def test_a_forked_chain_is_detected() -> None:
    _, inbox, chain = _setup()
    a0 = _seal(b"a", chain)[0]
    forked = Chain(next_seq=1, prev=b"\x07" * 32)
    a1 = _seal(b"b", forked)[0]
    assert inbox.receive(a0) is not None
    with pytest.raises(BrokenChain):
        inbox.receive(a1)


def test_wrong_recipient_consortium_and_unknown_sender() -> None:
    registry, inbox, chain = _setup()
    carol, _carol_pub = keys_for("carol", b"t")
    [to_alice] = _seal(b"x", chain, to="alice")
    with pytest.raises(WrongRecipient):
        inbox.receive(to_alice)
    [stranger] = seal(b"x", sender=carol, recipient=registry["bob"], consortium=CONSORTIUM,
                      round_id=RID, kind=MessageKind.CONTRIBUTION, chain=Chain())
    with pytest.raises(UnknownSender):
        inbox.receive(stranger)
    [elsewhere] = seal(b"x", sender=keys_for("alice", b"t")[0], recipient=registry["bob"],
                       consortium="other", round_id=RID, kind=MessageKind.CONTRIBUTION,
                       chain=Chain())
    with pytest.raises(WrongConsortium):
        inbox.receive(elsewhere)


def test_a_forged_signature_by_a_registered_impostor() -> None:
    """Carol signs with her key but claims to be alice."""
    registry, inbox, _ = _setup()
    carol, _ = keys_for("carol", b"t")
    impostor = type(carol)("alice", carol.signing_key, carol.kem, carol.kem_key, carol.secret)
    [wire] = seal(b"x", sender=impostor, recipient=registry["bob"], consortium=CONSORTIUM,
                  round_id=RID, kind=MessageKind.CONTRIBUTION, chain=Chain())
    with pytest.raises(BadSignature):
        inbox.receive(wire)


def test_sealed_to_someone_else_does_not_decrypt() -> None:
    registry, inbox, _ = _setup()
    alice, _ = keys_for("alice", b"t")
    eve_key = PublicParty("bob", registry["bob"].signing_key, KemKind.X25519,
                          keys_for("eve", b"t")[1].kem_key, "t")
    [wire] = seal(b"x", sender=alice, recipient=eve_key, consortium=CONSORTIUM, round_id=RID,
                  kind=MessageKind.CONTRIBUTION, chain=Chain())
    with pytest.raises(BadCiphertext):
        inbox.receive(wire)


def test_chunks_reassemble_in_any_order_only_when_complete() -> None:
    _, inbox, chain = _setup()
    body = os.urandom(CHUNK_BYTES * 2 + 123)
    wires = _seal(body, chain)
    assert len(wires) == 3
    assert all(len(w) < 1024 * 1024 for w in wires)
    order = [2, 0, 1]
    random.Random(1).shuffle(order)
    results = [inbox.receive(wires[i]) for i in order]
    assert results[:2] == [None, None]
    assert results[2] is not None
    assert results[2].body == body
    _, inbox2, _ = _setup()
    assert inbox2.receive(wires[0]) is None
    assert inbox2.receive(wires[1]) is None  # part 2 never came: nothing delivered


def test_buffered_parts_are_bounded() -> None:
    _alice, _ = keys_for("alice", b"t")
    registry, _, chain = _setup()
    bob, _ = keys_for("bob", b"t")
    inbox = Inbox(bob, registry, CONSORTIUM, max_body_bytes=CHUNK_BYTES + 10)
    wires = _seal(os.urandom(CHUNK_BYTES * 3), chain)
    inbox.receive(wires[0])
    with pytest.raises(MessageTooLarge):
        inbox.receive(wires[1])


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x94" + b"\xc0" * 4, b"\x91" * 50000,
                                  msgpack.packb([1, b"", b"", b""]), b"\xff" * 100])
def test_garbage_raises_typed_errors(data: bytes) -> None:
    registry, inbox, _ = _setup()
    with pytest.raises(ZerosumError):
        verify(data, registry, CONSORTIUM)
    with pytest.raises(ZerosumError):
        inbox.receive(data)


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=2048))
def test_fuzzed_bytes_into_the_inbox_raise_only_typed_errors(data: bytes) -> None:
    _, inbox, _ = _setup()
    with contextlib.suppress(ZerosumError):
        inbox.receive(data)


_VALID = _seal(b"a body of some length" * 4, Chain())[0]


@settings(max_examples=3000, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4), cut=st.integers(0, len(_VALID)))
def test_mutated_envelopes_are_rejected_with_typed_errors(edits: list[tuple[int, int]],
                                                          cut: int) -> None:
    data = bytearray(_VALID)
    for pos, byte in edits:
        data[pos] = byte
    data = data[:cut] if cut < len(data) else data
    _, inbox, _ = _setup()
    if bytes(data) == _VALID:
        assert inbox.receive(bytes(data)) is not None
        return
    with pytest.raises(ZerosumError):
        inbox.receive(bytes(data))
