"""Envelopes: what travels on the bus. Sealed to the recipient, signed by the sender, chained.

    wire   = msgpack [ENVELOPE_VERSION, header, ciphertext, signature]
    header = msgpack [version, consortium, round_id, kind, sender, recipient, seq, prev,
                      part, parts(, sender_epoch, recipient_epoch)]
    ciphertext = HPKE(recipient's key; info = "zerosum-v1 seal" || header; body chunk)
    signature  = Ed25519(sender's key; "zerosum-v1 sign" || len(header) || header || ciphertext)

`seq` numbers every envelope a sender ever sends (all recipients), and `prev` is the SHA-256 of
the sender's previous envelope, so the union of all topics is one hash chain per sender that an
auditor can check. A body over `CHUNK_BYTES` travels as `parts` envelopes with consecutive seq;
it is reassembled only when every part has arrived and each was authentic.

Key epochs: a party's keys rotate (`zerosum keys rotate`), and each rotation is a new epoch. A
header of version 2 names the epoch of the sender's signing key and of the recipient's KEM key
it was sealed to; version 1 (no epochs) is epoch 0 on both sides, and is still what a sender
writes while both epochs are 0, so the history of a consortium that never rotated reads as
before. `verify` checks a signature with the sender's key of the named epoch (the registry keeps
every epoch's public keys, so an audit verifies old envelopes); an epoch it does not know is
`UnknownEpoch`. A receiver (`Inbox`) also refuses an old epoch (`RetiredKey`):
- once it has seen the sender sign with a newer epoch: a sender's envelopes reach one inbox in
  the order of its chain, so an older epoch after a newer one is not the sender's (an exact
  duplicate of an envelope accepted before stays a harmless `DuplicateEnvelope`);
- once the epoch is retired from the inbox position of the input: the agent records "P's
  epoch E is retired from position N" when it loads a consortium file that retires it or when
  its clock passes the epoch's `grace_until`, and calls `Inbox.retire`; inputs at positions
  below N were handled before, and a replay of the inbox accepts them as the live run did.
Until one of these happens, whoever holds a previous key (a thief included) can still sign
with it: the grace is bounded by `grace_until` (see `zerosum keys rotate`), not by the
rotation itself. Statements inside messages (attestations, endorsements; `party.Keyring`)
are judged by the same positions, and by round: an old epoch only in a round opened here
before the signer's newer epoch was seen (it may have signed before it rotated).

HPKE: X25519 or ML-KEM-768+X25519 KEM, HKDF-SHA256, AES-256-GCM, from `cryptography`.

Padding: a body is sealed as `pad(body)`: an 8-byte length, the body and zeros up to the next
size bucket (`padded_size`: 256 bytes, then four buckets per doubling), so
the broker sees message sizes only coarsely (at most 25% larger).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.hpke import (
    AEAD,
    KDF,
    KEM,
    MLKEM768X25519PrivateKey,
    MLKEM768X25519PublicKey,
    Suite,
)

from protocol.errors import (
    BadCiphertext,
    BadSignature,
    BrokenChain,
    ChunkError,
    DuplicateEnvelope,
    EquivocationError,
    MalformedMessage,
    MessageTooLarge,
    PartialExpired,
    QuotaExceeded,
    ReplayedEnvelope,
    RetiredKey,
    UnknownEpoch,
    UnknownSender,
    UnsupportedVersion,
    WrongConsortium,
    WrongRecipient,
)
from protocol.messages import PROTOCOL_VERSION, ROUND_ID_BYTES, MessageKind

ENVELOPE_VERSION = 1
HEADER_EPOCHS = 2  # the header version that names key epochs; PROTOCOL_VERSION (1) does not
MAX_EPOCH = 2**32 - 1
NO_POSITION = -1  # an input that has no inbox position (not read from a topic)
MAX_ROUND_FLOORS = 100_000  # rounds whose signers' key epochs at their opening are kept
CHUNK_BYTES = 1024 * 1024 - 16 * 1024  # plaintext per part: an envelope stays under 1 MiB
MAX_ENVELOPE_BYTES = 1024 * 1024
MAX_PARTS = 1024
SEQ_WINDOW = 65536  # how far back an unseen sequence number is still accepted (reordering)
ZERO_HASH = bytes(32)
MIN_PADDED = 256
PARTIAL_EXPIRY_SEQ = 4096  # a chunked message not complete this many envelopes later is dropped
MAX_PARTIALS_PER_SENDER = 4
_SEAL_INFO = b"zerosum-v1 seal\x00"
_SIGN_CTX = b"zerosum-v1 sign\x00"


class KemKind(IntEnum):
    X25519 = 1
    MLKEM768_X25519 = 2


_SUITES = {
    KemKind.X25519: Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
    KemKind.MLKEM768_X25519: Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
}

KemPublic = x25519.X25519PublicKey | MLKEM768X25519PublicKey
KemPrivate = x25519.X25519PrivateKey | MLKEM768X25519PrivateKey


@dataclass(frozen=True)
class PublicParty:
    """A registry entry: who a party is and how to reach it (shared configuration)."""

    party_id: str
    signing_key: ed25519.Ed25519PublicKey
    kem: KemKind
    kem_key: KemPublic
    topic: str
    # the X25519 key for pairwise masks: the KEM key itself, or its X25519 half (hybrid)
    agreement_key: x25519.X25519PublicKey | None = None
    epoch: int = 0  # of these keys; `earlier` holds the public keys of the party's past epochs
    earlier: tuple[PublicParty, ...] = ()
    # past epochs the consortium file marks retired: a party's agent records each from an
    # inbox position (`Inbox.retire`); only that record refuses anything (audits still verify)
    retired: frozenset[int] = frozenset()

    def agreement(self) -> x25519.X25519PublicKey:
        if self.agreement_key is not None:
            return self.agreement_key
        if isinstance(self.kem_key, x25519.X25519PublicKey):
            return self.kem_key
        raise ValueError(f"{self.party_id} has no X25519 key for pairwise masks")

    def at(self, epoch: int) -> PublicParty | None:
        """This party's public keys of `epoch` (current or past), None if unknown."""
        if epoch == self.epoch:
            return self
        return next((p for p in self.earlier if p.epoch == epoch), None)


@dataclass(frozen=True)
class PrivateParty:
    """A party's own secrets. `secret` (>= 32 bytes) seeds its per-round randomness."""

    party_id: str
    signing_key: ed25519.Ed25519PrivateKey
    kem: KemKind
    kem_key: KemPrivate
    secret: bytes = field(repr=False)
    agreement_key: x25519.X25519PrivateKey | None = field(default=None, repr=False)
    epoch: int = 0
    # the KEM private keys of past epochs kept (envelopes sealed to them while peers had not
    # yet read the rotated consortium file; the audit of old rounds with this party's key)
    earlier_kem: tuple[tuple[int, KemKind, KemPrivate], ...] = field(default=(), repr=False)

    def kem_at(self, epoch: int) -> tuple[KemKind, KemPrivate] | None:
        """The KEM kind and private key of `epoch`, None if this party no longer holds it."""
        if epoch == self.epoch:
            return self.kem, self.kem_key
        return next(((k, key) for e, k, key in self.earlier_kem if e == epoch), None)

    def agreement(self) -> x25519.X25519PrivateKey:
        if self.agreement_key is not None:
            return self.agreement_key
        if isinstance(self.kem_key, x25519.X25519PrivateKey):
            return self.kem_key
        raise ValueError(f"{self.party_id} has no X25519 key for pairwise masks")


def kem_keys(kind: KemKind, private_bytes: bytes) -> tuple[KemPrivate, KemPublic, bytes]:
    """A KEM key pair from its private bytes, and the public bytes that go in the registry.

    X25519: 32 private bytes. ML-KEM-768+X25519: the 64-byte ML-KEM seed then the 32-byte
    X25519 key (96 bytes); its public bytes are ML-KEM (1184) then X25519 (32).
    """
    if kind is KemKind.X25519:
        priv = x25519.X25519PrivateKey.from_private_bytes(private_bytes)
        pub = priv.public_key()
        return priv, pub, pub.public_bytes_raw()
    if len(private_bytes) != 96:
        raise ValueError("an ML-KEM-768+X25519 private key has 96 bytes")
    mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(private_bytes[:64])
    xk = x25519.X25519PrivateKey.from_private_bytes(private_bytes[64:])
    hybrid = MLKEM768X25519PrivateKey(mk, xk)
    pub_bytes = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
    return hybrid, hybrid.public_key(), pub_bytes


def kem_public_from_bytes(kind: KemKind, data: bytes) -> KemPublic:
    if kind is KemKind.X25519:
        return x25519.X25519PublicKey.from_public_bytes(data)
    if len(data) != 1184 + 32:
        raise ValueError("an ML-KEM-768+X25519 public key has 1216 bytes")
    return MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(data[:1184]),
                                   x25519.X25519PublicKey.from_public_bytes(data[1184:]))


@dataclass(frozen=True)
class Header:
    version: int
    consortium: str
    round_id: bytes
    kind: MessageKind
    sender: str
    recipient: str
    seq: int
    prev: bytes
    part: int
    parts: int
    sender_epoch: int = 0  # of the key that signed it (version 2; version 1 is epoch 0)
    recipient_epoch: int = 0  # of the recipient's KEM key it was sealed to

    def encode(self) -> bytes:
        fields: list[Any] = [self.version, self.consortium, self.round_id, int(self.kind),
                             self.sender, self.recipient, self.seq, self.prev, self.part,
                             self.parts]
        if self.version == HEADER_EPOCHS:
            fields += [self.sender_epoch, self.recipient_epoch]
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> Header:
        try:
            raw = msgpack.unpackb(data, raw=False, max_str_len=256, max_bin_len=64,
                                  max_array_len=16, max_map_len=0, max_ext_len=0)
        except Exception as exc:
            raise MalformedMessage(f"header is not valid msgpack: {exc}", path="header") from exc
        if not isinstance(raw, list) or not raw:
            raise MalformedMessage("header must be a list of fields", path="header")
        version = raw[0]
        size = {PROTOCOL_VERSION: 10, HEADER_EPOCHS: 12}.get(version) \
            if type(version) is int else None
        if size is None:
            raise UnsupportedVersion(f"protocol version {version!r}", path="header.version")
        if len(raw) != size:
            raise MalformedMessage(f"a version {version} header has {size} fields",
                                   path="header")
        _, consortium, rid, kind, sender, recipient, seq, prev, part, parts = raw[:10]
        epochs = raw[10:] or [0, 0]
        types: list[tuple[str, Any, type | tuple[type, ...]]] = [
            ("consortium", consortium, str), ("round_id", rid, bytes), ("kind", kind, int),
            ("sender", sender, str), ("recipient", recipient, str), ("seq", seq, int),
            ("prev", prev, bytes), ("part", part, int), ("parts", parts, int),
            ("sender_epoch", epochs[0], int), ("recipient_epoch", epochs[1], int)]
        for name, value, typ in types:
            if not isinstance(value, typ) or isinstance(value, bool):
                raise MalformedMessage(f"wrong type {type(value).__name__}",
                                       path=f"header.{name}")
        if len(rid) != ROUND_ID_BYTES or len(prev) != 32:
            raise MalformedMessage("round_id or prev has the wrong length", path="header")
        if seq < 0 or not 0 <= part < parts <= MAX_PARTS or part > seq:
            raise MalformedMessage(f"seq {seq}, part {part} of {parts}", path="header")
        if not all(0 <= e <= MAX_EPOCH for e in epochs):
            raise MalformedMessage(f"key epochs {epochs} out of 0..{MAX_EPOCH}", path="header")
        try:
            mkind = MessageKind(kind)
        except ValueError as exc:
            raise MalformedMessage(f"unknown kind {kind}", path="header.kind") from exc
        return cls(version, consortium, rid, mkind, sender, recipient, seq, prev, part, parts,
                   epochs[0], epochs[1])


def digest(wire: bytes) -> bytes:
    return hashlib.sha256(wire).digest()


def _signed_bytes(header: bytes, ciphertext: bytes) -> bytes:
    return _SIGN_CTX + len(header).to_bytes(4, "big") + header + ciphertext


@dataclass
class Chain:
    """A sender's position in its own hash chain: the next seq and the previous digest.

    Persist it (or the envelopes) before they are sent, so a restart continues the chain.
    """

    next_seq: int = 0
    prev: bytes = ZERO_HASH


def padded_size(n: int) -> int:
    """The bucket a body of n bytes (plus its 8-byte length) is padded to: 256 bytes, or the
    smallest of 2^k, 1.25*2^k, 1.5*2^k, 1.75*2^k that holds it."""
    need = n + 8
    if need <= MIN_PADDED:
        return MIN_PADDED
    k = need.bit_length() - 1
    for quarter in (4, 5, 6, 7, 8):
        size = (quarter << k) // 4
        if size >= need:
            return size
    raise AssertionError("unreachable")


def pad(body: bytes) -> bytes:
    size = padded_size(len(body))
    return len(body).to_bytes(8, "big") + body + bytes(size - 8 - len(body))


def unpad(data: bytes) -> bytes:
    """The body inside a padded plaintext; MalformedMessage if the length does not fit."""
    if len(data) < 8:
        raise MalformedMessage("a padded body has at least 8 bytes")
    n = int.from_bytes(data[:8], "big")
    if n > len(data) - 8 or any(data[8 + n:]):
        raise MalformedMessage("the padding of a body is not well formed")
    return data[8:8 + n]


def seal(body: bytes, *, sender: PrivateParty, recipient: PublicParty, consortium: str,
         round_id: bytes, kind: MessageKind, chain: Chain) -> list[bytes]:
    """Seal and sign a message body (padded) into one or more envelopes; advances `chain`."""
    body = pad(body)
    chunks = [body[i:i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)] or [b""]
    if len(chunks) > MAX_PARTS:
        raise MessageTooLarge(f"{len(body)} bytes needs more than {MAX_PARTS} parts")
    suite = _SUITES[recipient.kem]
    # a header names key epochs only once there are any: version 1 is epoch 0 on both sides
    version = HEADER_EPOCHS if sender.epoch or recipient.epoch else PROTOCOL_VERSION
    out = []
    for i, chunk in enumerate(chunks):
        header = Header(version, consortium, round_id, kind, sender.party_id,
                        recipient.party_id, chain.next_seq, chain.prev, i, len(chunks),
                        sender.epoch, recipient.epoch).encode()
        ct = suite.encrypt(chunk, recipient.kem_key, info=_SEAL_INFO + header)
        sig = sender.signing_key.sign(_signed_bytes(header, ct))
        wire: bytes = msgpack.packb([ENVELOPE_VERSION, header, ct, sig], use_bin_type=True)
        chain.next_seq += 1
        chain.prev = digest(wire)
        out.append(wire)
    return out


@dataclass(frozen=True)
class Verified:
    """An authentic envelope, not yet decrypted: what an auditor with public keys can know."""

    header: Header
    ciphertext: bytes
    digest: bytes
    wire: bytes


def verify(wire: bytes, registry: dict[str, PublicParty], consortium: str) -> Verified:
    """Parse and check the signature of an envelope with public keys only."""
    if not isinstance(wire, bytes):
        raise MalformedMessage(f"expected bytes, got {type(wire).__name__}")
    if len(wire) > MAX_ENVELOPE_BYTES:
        raise MessageTooLarge(f"envelope of {len(wire)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        outer = msgpack.unpackb(wire, raw=False, max_str_len=0, max_bin_len=MAX_ENVELOPE_BYTES,
                                max_array_len=4, max_map_len=0, max_ext_len=0)
    except Exception as exc:
        raise MalformedMessage(f"envelope is not valid msgpack: {exc}") from exc
    if not isinstance(outer, list) or len(outer) != 4:
        raise MalformedMessage("an envelope is [version, header, ciphertext, signature]")
    version, header_bytes, ct, sig = outer
    if version != ENVELOPE_VERSION:
        raise UnsupportedVersion(f"envelope version {version!r}", path="envelope.version")
    if not all(isinstance(x, bytes) for x in (header_bytes, ct, sig)):
        raise MalformedMessage("header, ciphertext and signature are bytes")
    header = Header.decode(header_bytes)
    if header.consortium != consortium:
        raise WrongConsortium(f"envelope of consortium {header.consortium!r}",
                              sender=header.sender)
    sender = registry.get(header.sender)
    if sender is None:
        raise UnknownSender(f"sender {header.sender!r} is not in the registry")
    party = sender.at(header.sender_epoch)
    if party is None:
        raise UnknownEpoch(f"{header.sender!r} signed with key epoch {header.sender_epoch}, "
                           f"which the registry does not know (current: {sender.epoch})",
                           sender=header.sender)
    try:
        party.signing_key.verify(sig, _signed_bytes(header_bytes, ct))
    except InvalidSignature as exc:
        raise BadSignature(f"signature of {header.sender!r} does not verify",
                           sender=header.sender) from exc
    return Verified(header, ct, digest(wire), wire)


def open_sealed(me: PrivateParty, v: Verified) -> bytes:
    """Decrypt a verified envelope's chunk addressed to `me`; BadCiphertext if it does not,
    UnknownEpoch if it was sealed to a key epoch of `me` that `me` does not hold."""
    held = me.kem_at(v.header.recipient_epoch)
    if held is None:
        raise UnknownEpoch(f"envelope {v.header.seq} of {v.header.sender!r} is sealed to key "
                           f"epoch {v.header.recipient_epoch} of {me.party_id!r}, which it "
                           f"does not hold (current: {me.epoch})", sender=v.header.sender)
    kem, key = held
    try:
        return _SUITES[kem].decrypt(v.ciphertext, key, info=_SEAL_INFO + v.header.encode())
    except (InvalidTag, ValueError) as exc:
        raise BadCiphertext(f"envelope {v.header.seq} of {v.header.sender!r} does not decrypt",
                            sender=v.header.sender) from exc


@dataclass
class _SenderState:
    last_seq: int = -1
    # seq -> (digest of that envelope, its `prev`): enough to tell duplicates, forks and gaps
    seen: OrderedDict[int, tuple[bytes, bytes]] = field(default_factory=OrderedDict)
    epoch: int = 0  # the newest key epoch seen from this sender


@dataclass(frozen=True)
class Delivery:
    """A complete, authentic, decrypted message body from `sender`."""

    sender: str
    round_id: bytes
    kind: MessageKind
    body: bytes
    first_seq: int
    digest: bytes = b""  # of the envelope that completed the message


class Inbox:
    """The receiving side of envelopes for one party: verify, order, decrypt, reassemble."""

    def __init__(self, me: PrivateParty, registry: dict[str, PublicParty], consortium: str,
                 *, max_body_bytes: int = 256 * 1024 * 1024) -> None:
        self.me = me
        self.registry = registry
        self.consortium = consortium
        self.max_body_bytes = max_body_bytes
        self._senders: dict[str, _SenderState] = {}
        self._parts: dict[tuple[str, int], dict[int, tuple[Header, bytes]]] = {}
        self._buffered: dict[str, int] = {}  # bytes of unfinished messages, per sender
        self._arrived: dict[tuple[str, int], int] = {}  # inbox position of a message's 1st part
        self._at = 0
        # (party, key epoch) -> the first inbox position from which that epoch is refused
        self.retired: dict[tuple[str, int], int] = {}
        self.position = NO_POSITION  # of the input being handled
        self.round_id = b""  # of the message being handled (for `signing_keys`)
        # round id -> each sender's newest key epoch seen when the round opened here
        self._floors: OrderedDict[bytes, dict[str, int]] = OrderedDict()

    def retire(self, party: str, epoch: int, from_position: int) -> None:
        """`party`'s key `epoch` is refused in inputs at `from_position` and after (the agent
        recorded it durably; the first record of an epoch stands)."""
        self.retired.setdefault((party, epoch), from_position)

    def is_retired(self, party: str, epoch: int) -> bool:
        """Whether `party`'s key `epoch` is retired at the position of the input in hand (an
        input without a position: by every record)."""
        since = self.retired.get((party, epoch))
        return since is not None and (self.position == NO_POSITION or self.position >= since)

    def open_round(self, round_id: bytes) -> None:
        """A round opens here now: keep each sender's newest key epoch seen so far."""
        self._floors[round_id] = {s: st.epoch for s, st in self._senders.items()}
        self._floors.move_to_end(round_id)
        while len(self._floors) > MAX_ROUND_FLOORS:
            self._floors.popitem(last=False)

    def signing_keys(self, party: PublicParty) -> tuple[PublicParty, ...]:
        """The keys a statement of `party` inside a message of `round_id` may be signed with:
        epochs not retired at this input's position, and none older than the newest epoch of
        `party` seen when the round opened here (or now, for a round not opened here)."""
        floors = self._floors.get(self.round_id)
        if floors is not None:
            floor = floors.get(party.party_id, 0)
        else:
            st = self._senders.get(party.party_id)
            floor = 0 if st is None else st.epoch
        return tuple(k for k in (party, *party.earlier)
                     if k.epoch >= floor and not self.is_retired(party.party_id, k.epoch))

    def receive(self, wire: bytes, position: int = NO_POSITION, *,
                at: int | None = None) -> Delivery | None:
        """One envelope in, read at inbox `position`; a Delivery when it completes a message,
        None while parts are due. `at` is what held parts expire by (the party's count of
        inputs when there is no position); by default `position`.

        Raises an EnvelopeError subclass (or CodecError for a malformed one); a harmless exact
        duplicate raises DuplicateEnvelope so the caller can count it.
        """
        self.position = position
        self._at = at if at is not None else max(position, 0)
        v = verify(wire, self.registry, self.consortium)
        h = v.header
        if h.recipient != self.me.party_id:
            raise WrongRecipient(f"envelope for {h.recipient!r} reached {self.me.party_id!r}",
                                 sender=h.sender)
        self._check_epochs(h, v)
        self._check_sequence(h, v)
        chunk = open_sealed(self.me, v)
        if h.parts == 1:
            return Delivery(h.sender, h.round_id, h.kind, unpad(chunk), h.seq, v.digest)
        return self._reassemble(h, chunk, v.digest)

    def _check_epochs(self, h: Header, v: Verified) -> None:
        """RetiredKey for a retired key epoch of the sender or of this party, or an epoch of
        the sender older than one seen before (see the module's docstring)."""
        st = self._senders.get(h.sender)
        if st is not None and (known := st.seen.get(h.seq)) is not None and known[0] == v.digest:
            return  # an exact duplicate of an accepted envelope: counted as one, not refused
        if self.is_retired(h.sender, h.sender_epoch):
            raise RetiredKey(f"{h.sender!r} signed with its retired key epoch "
                             f"{h.sender_epoch}", sender=h.sender)
        if self.is_retired(self.me.party_id, h.recipient_epoch):
            raise RetiredKey(f"{h.sender!r} sealed to retired key epoch {h.recipient_epoch} "
                             f"of {self.me.party_id!r}", sender=h.sender)
        if st is not None and h.sender_epoch < st.epoch:
            raise RetiredKey(f"envelope {h.seq} of {h.sender!r} is signed with key epoch "
                             f"{h.sender_epoch}, after it was seen signing with epoch "
                             f"{st.epoch}", sender=h.sender)

    def _check_sequence(self, h: Header, v: Verified) -> None:
        st = self._senders.setdefault(h.sender, _SenderState())
        known = st.seen.get(h.seq)
        if known is not None:
            if known[0] == v.digest:
                raise DuplicateEnvelope(f"envelope {h.seq} of {h.sender!r} again",
                                        sender=h.sender)
            raise EquivocationError(f"two different envelopes {h.seq} from {h.sender!r}",
                                    sender=h.sender, evidence=(known[0], v.wire))
        if h.seq <= st.last_seq - SEQ_WINDOW:
            raise ReplayedEnvelope(f"envelope {h.seq} of {h.sender!r} is older than the "
                                   f"window after {st.last_seq}", sender=h.sender)
        before = st.seen.get(h.seq - 1)
        if before is not None and before[0] != h.prev:
            raise BrokenChain(f"envelope {h.seq} of {h.sender!r} does not follow {h.seq - 1}",
                              sender=h.sender)
        after = st.seen.get(h.seq + 1)
        if after is not None and after[1] != v.digest:
            raise BrokenChain(f"envelope {h.seq + 1} of {h.sender!r} does not follow {h.seq}",
                              sender=h.sender)
        st.seen[h.seq] = (v.digest, h.prev)
        st.last_seq = max(st.last_seq, h.seq)
        st.epoch = max(st.epoch, h.sender_epoch)
        while len(st.seen) > SEQ_WINDOW:
            st.seen.popitem(last=False)

    def _reassemble(self, h: Header, chunk: bytes, last: bytes) -> Delivery | None:
        """Collect the parts of a chunked message. Each sender has a quota: at most
        `MAX_PARTIALS_PER_SENDER` unfinished messages and `max_body_bytes` buffered, and an
        unfinished message expires once the sender is `PARTIAL_EXPIRY_SEQ` envelopes past it."""
        first = h.seq - h.part
        key = (h.sender, first)
        self._expire(h.sender, h.seq)
        parts = self._parts.get(key)
        if parts is None:
            open_here = sum(1 for s, _ in self._parts if s == h.sender)
            if open_here >= MAX_PARTIALS_PER_SENDER:
                raise QuotaExceeded(f"{h.sender!r} has {open_here} unfinished chunked "
                                    "messages already", sender=h.sender)
            parts = self._parts[key] = {}
            self._arrived[key] = self._at
        if parts:
            h0 = next(iter(parts.values()))[0]
            if (h0.round_id, h0.kind, h0.parts) != (h.round_id, h.kind, h.parts):
                raise ChunkError(f"part {h.part} of message {first} from {h.sender!r} does not "
                                 "match its other parts", sender=h.sender)
        held = self._buffered.get(h.sender, 0)
        if held + len(chunk) > self.max_body_bytes + 4096:
            self._drop(key)
            raise MessageTooLarge(f"buffered parts of {h.sender!r} would exceed "
                                f"{self.max_body_bytes} bytes", sender=h.sender)
        parts[h.part] = (h, chunk)
        self._buffered[h.sender] = held + len(chunk)
        if len(parts) < h.parts:
            return None
        self._drop(key)
        body = unpad(b"".join(parts[i][1] for i in range(h.parts)))
        return Delivery(h.sender, h.round_id, h.kind, body, first, last)

    def _drop(self, key: tuple[str, int]) -> None:
        self._arrived.pop(key, None)
        parts = self._parts.pop(key, {})
        sender = key[0]
        left = self._buffered.get(sender, 0) - sum(len(c) for _, c in parts.values())
        if left > 0:
            self._buffered[sender] = left
        else:
            self._buffered.pop(sender, None)

    def _expire(self, sender: str, seq: int) -> None:
        stale = [k for k, parts in self._parts.items() if k[0] == sender and (
                 not parts or
                 k[1] + next(iter(parts.values()))[0].parts + PARTIAL_EXPIRY_SEQ < seq)]
        for k in stale:
            self._drop(k)

    def unfinished(self) -> int:
        """Bytes held for unfinished chunked messages, all senders together."""
        return sum(self._buffered.values())

    def partial(self) -> bool:
        """Whether a chunked message is half read (then the inbox cannot be snapshotted)."""
        return bool(self._parts)

    def expire_partials(self, oldest: int) -> list[PartialExpired]:
        """Drop every unfinished chunked message whose first part arrived before inbox
        position `oldest`: a lone part from a hostile sender cannot be held for ever (and
        keep the party from a quiescent state); one error per message dropped."""
        stale = [k for k, at in self._arrived.items() if at < oldest]
        errors = []
        for sender, first in stale:
            parts = self._parts.get((sender, first), {})
            h0 = next(iter(parts.values()))[0] if parts else None
            what = (f"{h0.kind.name} of round {h0.round_id.hex()}, {len(parts)} of {h0.parts} "
                    "parts") if h0 else "no part"
            errors.append(PartialExpired(
                f"chunked message {first} of {sender!r} ({what}) unfinished since inbox "
                f"position {self._arrived[(sender, first)]}; dropped", sender=sender))
            self._drop((sender, first))
        return errors

    def sequences(self) -> dict[str, tuple[int, list[tuple[int, bytes, bytes]], int]]:
        """Per sender: the highest seq seen, the window of (seq, digest, prev) seen, in the
        order they were seen (the oldest leaves the window first), and the newest key epoch
        seen. What a replay would rebuild, and what tells duplicates, forks, gaps and old
        keys; for a snapshot."""
        return {name: (st.last_seq, [(seq, d, p) for seq, (d, p) in st.seen.items()], st.epoch)
                for name, st in self._senders.items()}

    def restore_sequences(
            self, state: dict[str, tuple[int, list[tuple[int, bytes, bytes]], int]]) -> None:
        """Take `sequences()`'s state (a snapshot's) instead of what is held."""
        self._senders = {
            name: _SenderState(last, OrderedDict((seq, (d, p)) for seq, d, p in seen), epoch)
            for name, (last, seen, epoch) in state.items()}


def private_party(party_id: str, *, signing_seed: bytes, kem: KemKind, kem_private: bytes,
                  secret: bytes, epoch: int = 0,
                  earlier_kem: tuple[tuple[int, KemKind, bytes], ...] = ()) -> PrivateParty:
    """A party's private keys from their raw bytes (generated by the caller, e.g. `init`);
    `earlier_kem`: (epoch, kind, private bytes) of past epochs' KEM keys still held."""
    kem_priv, _, _ = kem_keys(kem, kem_private)
    agreement = None if kem is KemKind.X25519 else x25519.X25519PrivateKey.from_private_bytes(
        kem_private[64:])
    return PrivateParty(party_id, ed25519.Ed25519PrivateKey.from_private_bytes(signing_seed),
                        kem, kem_priv, secret, agreement, epoch,
                        tuple((e, k, kem_keys(k, b)[0]) for e, k, b in earlier_kem))


def public_party(party_id: str, *, signing_key: bytes, kem: KemKind, kem_key: bytes,
                 topic: str, epoch: int = 0, earlier: tuple[PublicParty, ...] = (),
                 retired: frozenset[int] = frozenset()) -> PublicParty:
    """A registry entry from raw public key bytes (as stored in the consortium file), with
    the entries of its past epochs (`earlier`) and which of those are `retired`."""
    agreement = None if kem is KemKind.X25519 else x25519.X25519PublicKey.from_public_bytes(
        kem_key[-32:])
    return PublicParty(party_id, ed25519.Ed25519PublicKey.from_public_bytes(signing_key), kem,
                       kem_public_from_bytes(kem, kem_key), topic, agreement, epoch, earlier,
                       retired)
