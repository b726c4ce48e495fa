"""Arithmetic in Z_2^64 (numpy uint64, wrap-around) and the randomness a round is built from.

All randomness is expanded from 32-byte seeds the caller provides; nothing here draws its own.
Per-round seeds are derived from a party's long-term secret and the round id, so a restarted
party derives the same masks and shares again instead of fresh ones.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

U64 = NDArray[np.uint64]
SEED_BYTES = 32
_ZERO_NONCE = bytes(16)


def derive_seed(secret: bytes, label: str, round_id: bytes, *index: int) -> bytes:
    """A 32-byte seed for one purpose (`label`) of one round, from a party's secret.

    HMAC-SHA256 over a length-prefixed encoding, so distinct (label, round, index) never collide.
    """
    if len(secret) < 32:
        raise ValueError("a party secret has at least 32 bytes")
    parts = [b"zerosum/v1", label.encode(), round_id, *(i.to_bytes(8, "big") for i in index)]
    msg = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def prg(seed: bytes, count: int) -> U64:
    """`count` uniform elements of Z_2^64 expanded from a 32-byte seed with AES-256-CTR."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, not {len(seed)}")
    if count < 0:
        raise ValueError("count must be >= 0")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = enc.update(bytes(count * 8))
    # Little-endian by definition, so the stream means the same on every machine.
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def prg_matrix(seed: bytes, rows: int, cols: int) -> U64:
    """A rows x cols matrix of uniform Z_2^64 elements from a seed."""
    return prg(seed, rows * cols).reshape(rows, cols)


def prg_rows(seed: bytes, start: int, rows: int, cols: int) -> U64:
    """Rows start .. start+rows-1 of the (unbounded) rows x cols expansion of `seed`:
    equal to `prg_matrix(seed, start + rows, cols)[start:]`, but only these rows are
    computed. AES-CTR's counter block is set to the 16-byte block holding the first element
    (a big-endian 128-bit counter, as CTR mode increments it), and the 8 bytes before it in
    that block, if any, are dropped. A round's chunks expand their own row ranges this way."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, not {len(seed)}")
    if start < 0 or rows < 0 or cols < 0:
        raise ValueError("start, rows and cols must be >= 0")
    offset = start * cols * 8
    block, skip = divmod(offset, 16)
    enc = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    stream = enc.update(bytes(skip + rows * cols * 8))
    return np.frombuffer(stream, dtype="<u8", offset=skip).astype(
        np.uint64, copy=False).reshape(rows, cols)


def zero_sum_masks(seed: bytes, n: int, width: int) -> U64:
    """n uniform vectors of Z_2^64^width, subject to their sum being 0 (claims 4-5).

    Row i < n-1 is PRG(derive(seed, i)); the last row is minus the sum of the others.
    """
    if n < 2:
        raise ValueError("masks are drawn for at least two parties")
    masks = np.empty((n, width), dtype=np.uint64)
    for i in range(n - 1):
        masks[i] = prg(derive_seed(seed, "mask", b"", i), width)
    masks[n - 1] = np.uint64(0) - masks[: n - 1].sum(axis=0, dtype=np.uint64)
    return masks


def uniform_below(seed: bytes, bound: int, draws: int) -> list[int]:
    """`draws` integers uniform in [0, bound), by rejection sampling from the PRG."""
    if bound <= 0:
        raise ValueError("bound must be positive")
    limit = (1 << 64) - ((1 << 64) % bound)
    out: list[int] = []
    block = 0
    while len(out) < draws:
        for v in prg(derive_seed(seed, "below", b"", block), 2 * draws + 8).tolist():
            if v < limit:
                out.append(v % bound)
                if len(out) == draws:
                    break
        block += 1
    return out


def permutation(seed: bytes, n: int) -> list[int]:
    """A uniform permutation of range(n) (Fisher-Yates driven by the seed)."""
    perm = list(range(n))
    if n < 2:
        return perm
    draws = [uniform_below(derive_seed(seed, "perm", b"", i), i + 1, 1)[0]
             for i in range(n - 1, 0, -1)]
    for i, j in zip(range(n - 1, 0, -1), draws, strict=True):
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def pairwise_seed(shared_secret: bytes, assignment: bytes, a: str, b: str,
                  attempt: int = 0) -> bytes:
    """s_ab: the seed two institutions share for one round, from their X25519 agreement.

    HKDF-SHA256 with the round's assignment digest, an attempt number and both names (sorted)
    in the info, so no two rounds, attempts or pairs share a seed."""
    lo, hi = sorted((a, b))
    info = b"".join(len(p).to_bytes(4, "big") + p for p in (
        b"zerosum/v1 pairwise", assignment, attempt.to_bytes(8, "big"), lo.encode(),
        hi.encode()))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
                info=info).derive(shared_secret)


def pairwise_mask(index: int, seeds: dict[int, bytes], rows: int, cols: int,
                  start: int = 0) -> U64:
    """m_i = sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) over rows start .. start+rows-1 of a
    matrix of `cols` columns: summed over every participant i, the masks cancel, and nobody
    dealt them (PROTOCOL.md, pairwise mode). `seeds` maps each other participant's index to
    the seed shared with it."""
    out = np.zeros((rows, cols), dtype=np.uint64)
    for j, seed in seeds.items():
        if j == index:
            raise ValueError("a participant shares no seed with itself")
        if j > index:
            np.add(out, prg_rows(seed, start, rows, cols), out=out)
        else:
            np.subtract(out, prg_rows(seed, start, rows, cols), out=out)
    return out


def add_mask(values: U64, mask: U64) -> U64:
    """values + mask mod 2^64, the mask (one element per column) added to every row."""
    return np.add(values, mask[np.newaxis, :], dtype=np.uint64)


def coordinator_share(values_plus_mask: U64, seeds: list[bytes], start: int = 0) -> U64:
    """E_S = (X_L + m_L) - sum_j PRG(seed_j) over rows start .. start+rows-1: the one share
    that travels as a full matrix.

    With the institutions' shares E_j = PRG(seed_j), sum_r E_r = X_L + m_L (claim 3).
    """
    rows, cols = values_plus_mask.shape
    out = np.array(values_plus_mask, dtype=np.uint64, copy=True)
    for s in seeds:
        np.subtract(out, prg_rows(s, start, rows, cols), out=out)
    return out


def sum_matrices(mats: list[U64]) -> U64:
    """Position-by-position sum mod 2^64 of equally shaped matrices (claim 6)."""
    if not mats:
        raise ValueError("nothing to add")
    out = np.array(mats[0], dtype=np.uint64, copy=True)
    for m in mats[1:]:
        np.add(out, m, out=out)
    return out
