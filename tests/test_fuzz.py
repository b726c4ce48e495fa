"""100,000 fuzzed inputs into the decoder and the envelope layer: typed errors only, bounded
memory. Mutations of valid messages and envelopes (bit flips, byte overwrites, truncation,
splices, repeats) with a seeded RNG, so every run is the same and any failure reproduces."""

from __future__ import annotations

import os
import random
import tracemalloc

from protocol.codec import decode, encode
from protocol.driver import CONSORTIUM, keys_for
from protocol.envelope import Chain, Inbox, seal
from protocol.errors import ZerosumError
from protocol.messages import MessageKind
from tests.samples import transcript

COUNT = int(os.environ.get("ZEROSUM_FUZZ_COUNT", "100000"))
MEMORY_LIMIT = 64 * 1024 * 1024


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0 and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 2:
        del b[rng.randrange(len(b) + 1):]
    elif op == 3 and b:
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 32))
    elif op == 4 and b:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[i:i] = b[i:j] * rng.randint(1, 4)
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 256)))
    return bytes(b)


def test_fuzzed_messages_and_envelopes_raise_only_typed_errors() -> None:
    rng = random.Random(20261124)
    bodies = [encode(m) for _, m in transcript().messages.values()]
    alice, _ = keys_for("alice", b"fuzz")
    bob, bob_pub = keys_for("bob", b"fuzz")
    registry = {"alice": keys_for("alice", b"fuzz")[1], "bob": bob_pub}
    wires = [w for body in bodies[:4] for w in seal(
        body, sender=alice, recipient=bob_pub, consortium=CONSORTIUM, round_id=bytes(16),
        kind=MessageKind.CONTRIBUTION, chain=Chain())]
    inbox = Inbox(bob, registry, CONSORTIUM, max_body_bytes=8 * 1024 * 1024)
    accepted = rejected = 0
    tracemalloc.start()
    try:
        for i in range(COUNT):
            if i % 2:
                data = _mutate(rng, rng.choice(bodies))
                try:
                    decode(data)
                    accepted += 1
                except ZerosumError:
                    rejected += 1
            else:
                data = _mutate(rng, rng.choice(wires))
                try:
                    inbox.receive(data)
                    accepted += 1
                except ZerosumError:
                    rejected += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert accepted + rejected == COUNT
    assert rejected > COUNT * 0.9  # the mutations do reach the checks
    assert peak < MEMORY_LIMIT, f"peak traced memory {peak} bytes"
    print(f"\nfuzz: {COUNT} inputs, {rejected} rejected with typed errors, {accepted} valid, "
          f"peak traced memory {peak / 2**20:.1f} MiB")
