"""The peers of `zerosum bench`: the same per-customer totals computed by two other real systems.

Each peer is given every institution's values already aligned by customer (row k is the same
customer everywhere, 0 where the institution does not hold it): the join, which a zerosum round
does on tokens, is given to them for free. They sum the same columns a zerosum round publishes
(the holder count, then each attribute in scaled units), and their totals are checked, value by
value, against the plaintext sums.

- MPyC (`mpyc`): an n-party MPC secure sum. One OS process per institution, connected over TCP on
  localhost with mutually authenticated TLS; each secret-shares its matrix (Shamir, threshold
  (n-1)//2, 64-bit secure integers) and every party opens the sum.
- TenSEAL BFV (`tenseal`): the key holder makes a BFV context and gives its public part to the
  institutions; each institution, in its own worker process, encrypts its matrix in batched
  ciphertexts (one slot per value); an aggregator adds them homomorphically and the key holder
  decrypts the sum.

A peer's seconds run from the moment its parties are ready (processes connected; keys made) to
the totals at every receiver, as a zerosum round's run from its request to its results at every
institution. Its `speedup` is its seconds divided by zerosum's seconds for the same totals in the
same run: above 1, zerosum is that many times faster.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agents.bench import HOLD, SEED, SPECS, Say, institution_values, large_round
from agents.security import KafkaAccess
from protocol.fixedpoint import AttributeSpec

Matrix = np.ndarray[Any, np.dtype[np.int64]]
SIZE = (100_000, 4, 5)  # customers, attributes, institutions: the same totals
MPYC_BITS = 64  # bit length of MPyC's secure integers: the width of zerosum's ring
BFV_DEGREE = 8192  # TenSEAL's polynomial degree: 8,192 slots per ciphertext


def aligned_inputs(institutions: int, customers: int, specs: tuple[AttributeSpec, ...],
                   hold: float = HOLD, seed: int = SEED) -> list[Matrix]:
    """Each institution's values of the bench's data (`institution_values`, same draws as the
    Parquet files of a round), aligned by customer: row k is customer k, 0 where the institution
    does not hold it; the holder flag, then each attribute in scaled units."""
    out = []
    for held, values in institution_values(institutions, customers, specs, hold, seed):
        m = np.zeros((customers, 1 + len(specs)), dtype=np.int64)
        m[held, 0] = 1
        for j, (s, v) in enumerate(zip(specs, values, strict=True), start=1):
            m[held, j] = v * 10**s.scale
        out.append(m)
    return out


def plaintext_totals(inputs: list[Matrix]) -> Matrix:
    """The sums the peers must reproduce, in plain numpy."""
    total: Matrix = np.sum(np.stack(inputs), axis=0, dtype=np.int64)
    return total


def exact(got: Any, inputs: list[Matrix]) -> bool:
    """Whether `got` is, value by value, the plaintext sum of `inputs` (same shape too)."""
    want = plaintext_totals(inputs)
    out = np.asarray(got)
    return bool(out.shape == want.shape and np.array_equal(out.astype(np.int64), want))


# -- MPyC --------------------------------------------------------------------------------------
def _mpyc_party() -> None:
    """One party of the MPyC sum, run as `python -m agents.bench_peers IN OUT <mpyc options>`:
    reads its matrix from IN (.npy), writes the opened sum and its start and end times to OUT
    (.npz)."""
    from mpyc.runtime import mpc  # parses (and strips) MPyC's own options from sys.argv

    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    values = np.load(source)

    async def run() -> None:
        secint = mpc.SecInt(MPYC_BITS)
        await mpc.start()  # returns once every party is connected
        t0 = time.time()
        shares = mpc.input(secint.array(values))  # one secure array per party
        total = shares[0]
        for s in shares[1:]:
            total = total + s
        opened = await mpc.output(total)
        t1 = time.time()
        await mpc.shutdown()
        np.savez(target, totals=np.asarray(opened).astype(np.int64), times=np.array([t0, t1]))

    mpc.run(run())


def _mpyc_tls(d: Path, parties: int) -> None:
    """The files MPyC's `--ssl` reads from `.config` in its working directory: a CA and, for each
    party, a certificate (CN `MPyC party <i>`, the name its peers check) and its key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ExtendedKeyUsage
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from agents.security import _key_pem, _leaf, _load_ca, _name, write_ca

    config = d / ".config"
    (config / "mpyc_ca.crt").write_bytes(write_ca(config, "MPyC bench CA").read_bytes())
    ca_key, ca = _load_ca(config)
    usages = ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for i in range(parties):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(_name(f"MPyC party {i}"), key, ca).add_extension(
            usages, critical=False).sign(ca_key, hashes.SHA256())
        (config / f"party_{i}.key").write_bytes(_key_pem(key))
        (config / f"party_{i}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


async def mpyc_sum(inputs: list[Matrix], *, tls: bool = True,
                   timeout_s: float = 1800) -> dict[str, Any]:
    """The MPyC secure sum of `inputs`, one process per institution on localhost ports; with
    `tls`, every connection is mutually authenticated TLS (MPyC's `--ssl`)."""
    from agents.broker import free_port

    n = len(inputs)
    ports = [free_port() for _ in range(n)]
    options = [a for p in ports for a in ("-P", f"localhost:{p}")] + ["--ssl"] * tls
    with tempfile.TemporaryDirectory(prefix="zerosum-mpyc-") as tmp:
        d = Path(tmp)
        if tls:
            _mpyc_tls(d, n)
        for i, m in enumerate(inputs):
            np.save(d / f"in-{i}.npy", m)
        t = time.perf_counter()
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents.bench_peers", str(d / f"in-{i}.npy"),
            str(d / f"out-{i}.npz"), *options, "-I", str(i), "--no-log", cwd=d,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            for i in range(n)]
        try:
            async with asyncio.timeout(timeout_s):
                ends = await asyncio.gather(*(p.communicate() for p in procs))
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
        wall = time.perf_counter() - t
        for i, (p, (_, err)) in enumerate(zip(procs, ends, strict=True)):
            if p.returncode != 0:
                raise RuntimeError(f"MPyC party {i} exited with {p.returncode}:\n"
                                   f"{err.decode(errors='replace')[-2000:]}")
        outs = [np.load(d / f"out-{i}.npz") for i in range(n)]
        starts = [float(o["times"][0]) for o in outs]
        finish = [float(o["times"][1]) for o in outs]
        correct = all(exact(o["totals"], inputs) for o in outs)
    return {"parties": n, "threshold": (n - 1) // 2, "bit_length": MPYC_BITS, "tls": tls,
            "seconds": max(finish) - min(starts), "wall_s": wall, "correct": correct}


# -- TenSEAL BFV -------------------------------------------------------------------------------
def bfv_modulus_bits(inputs: list[Matrix]) -> int:
    """Bits of the BFV plaintext modulus: every partial sum of the inputs is a centred residue
    (|x| < t/2), so a sum is exact whatever the order of the additions."""
    bound = int(np.max(np.sum(np.abs(np.stack(inputs)), axis=0)))
    return max(20, (2 * bound + 1).bit_length() + 1)


def _bfv_encrypt(args: tuple[bytes, Matrix]) -> tuple[list[bytes], float]:
    """One institution's work (in a worker process): encrypt its matrix, 8,192 values a
    ciphertext, with the public context; returns the serialized ciphertexts and the seconds."""
    import tenseal as ts

    public, values = args
    t0 = time.perf_counter()
    ctx = ts.context_from(public)
    flat = values.reshape(-1)
    cts = [ts.bfv_vector(ctx, flat[k:k + BFV_DEGREE].tolist()).serialize()
           for k in range(0, len(flat), BFV_DEGREE)]
    return cts, time.perf_counter() - t0


def tenseal_sum(inputs: list[Matrix], *, workers: int | None = None) -> dict[str, Any]:
    """The TenSEAL BFV sum of `inputs`: encrypted by each institution in its own process, added
    by an aggregator holding only the public context, decrypted by the key holder."""
    import tenseal as ts
    from tenseal import sealapi

    bits = bfv_modulus_bits(inputs)
    t_key = time.perf_counter()
    plain_modulus = sealapi.PlainModulus.Batching(BFV_DEGREE, bits).value()
    secret = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=BFV_DEGREE,
                        plain_modulus=plain_modulus)
    public_ctx = secret.copy()
    public_ctx.make_context_public()
    public = public_ctx.serialize()
    keys_s = time.perf_counter() - t_key
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers or min(len(inputs), os.cpu_count() or 2)) as pool:
        encrypted = list(pool.map(_bfv_encrypt, [(public, m) for m in inputs]))
    t_enc = time.perf_counter()
    acc = [ts.bfv_vector_from(public_ctx, c) for c in encrypted[0][0]]
    for cts, _ in encrypted[1:]:
        for k, c in enumerate(cts):
            acc[k] += ts.bfv_vector_from(public_ctx, c)
    sealed = [a.serialize() for a in acc]
    t_add = time.perf_counter()
    flat = [v for c in sealed for v in ts.bfv_vector_from(secret, c).decrypt()]
    totals = np.array(flat, dtype=np.int64).reshape(inputs[0].shape)
    t1 = time.perf_counter()
    return {"poly_modulus_degree": BFV_DEGREE, "plain_modulus_bits": bits,
            "ciphertexts_per_institution": len(encrypted[0][0]),
            "ciphertext_bytes_per_institution": sum(len(c) for c in encrypted[0][0]),
            "plaintext_bytes_per_institution": int(inputs[0].nbytes),
            "keys_s": keys_s, "seconds": t1 - t0, "encrypt_s": t_enc - t0,
            "encrypt_s_by_institution": [s for _, s in encrypted],
            "add_s": t_add - t_enc, "decrypt_s": t1 - t_add,
            "correct": exact(totals, inputs)}


# -- the scenario ------------------------------------------------------------------------------
async def peers(inputs: list[Matrix], zerosum_seconds: float, say: Say) -> dict[str, Any]:
    """Both peers on `inputs`, each beside `zerosum_seconds` (zerosum's round on the same data,
    measured in the same run)."""
    customers, width = inputs[0].shape
    out: dict[str, Any] = {"customers": customers, "columns": width,
                           "institutions": len(inputs), "zerosum_s": zerosum_seconds}
    say(f"  MPyC: {len(inputs)} processes over TLS on localhost")
    out["mpyc"] = await mpyc_sum(inputs)
    say("  TenSEAL BFV: encryption in worker processes, addition, decryption")
    out["tenseal"] = await asyncio.to_thread(tenseal_sum, inputs)
    for name in ("mpyc", "tenseal"):
        r = out[name]
        r["speedup"] = r["seconds"] / zerosum_seconds
        say(f"  {name}: {r['seconds']:.2f} s, totals "
            f"{'equal' if r['correct'] else 'DIFFER FROM'} plaintext; zerosum "
            f"{zerosum_seconds:.2f} s; speedup {r['speedup']:.2f}x")
    return out


async def beside_zerosum(bootstrap: KafkaAccess, large: dict[str, Any] | None, *,
                         say: Say) -> dict[str, Any]:
    """The `peers` scenario: both peers on the data of zerosum's large round at SIZE, beside
    that round's seconds; the round is the large scenario's if it had this size (and the
    default data), else one run here."""
    customers, attributes, institutions = SIZE
    if large is None or (large["customers"], large["attributes"],
                         large["institutions"]) != SIZE:
        say(f"zerosum at the peers' size: {customers:,} customers x {attributes} attributes x "
            f"{institutions} institutions")
        large = await large_round(bootstrap, customers=customers, institutions=institutions,
                                  attributes=attributes, say=say)
    say("peers on the same totals (aligned vectors given to them)")
    inputs = aligned_inputs(institutions, customers, SPECS[:attributes])
    out = await peers(inputs, large["seconds"], say)
    out["zerosum_correct"] = large["correct"]
    return out


def draw(by_customers: Any, by_institutions: Any, figures: dict[str, Any]) -> None:
    """The peers as single points on the scaling chart's two panels (matplotlib axes)."""
    for name, label, marker in (("mpyc", "MPyC secure sum", "D"),
                                ("tenseal", "TenSEAL BFV", "P")):
        if name in figures:
            by_customers.plot([figures["customers"]], [figures[name]["seconds"]], marker,
                              markersize=9, label=f"{label} ({figures['institutions']} inst.)")
            by_institutions.plot([figures["institutions"]], [figures[name]["seconds"]], marker,
                                 markersize=9, label=f"{label} ({figures['customers']:,})")


if __name__ == "__main__":
    _mpyc_party()
