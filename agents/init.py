"""`zerosum init`: a working consortium in one directory, keys drawn from the OS."""

from __future__ import annotations

import os
import random
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from agents.config import topic_for
from agents.security import write_consortium_security
from protocol.envelope import KemKind, kem_keys
from protocol.fixedpoint import AttributeSpec
from protocol.messages import MaskMode

DEFAULT_ATTRIBUTES = (
    AttributeSpec("balance", 2, -10**13, 10**13),   # loan balance, +-100 billion at cents
    AttributeSpec("overdue_days", 0, 0, 36_500),
)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _party_keys(directory: Path, name: str, kem: KemKind) -> str:
    """Write `keys/<name>/<name>.key` (mode 600); return the party's [parties] entry.

    Each party's secrets are in a directory of their own, to be handed to that party alone:
    the consortium key (institutions only) is never beside the coordinator's key."""
    signing_seed = os.urandom(32)
    kem_private = os.urandom(32 if kem is KemKind.X25519 else 96)
    _, _, kem_pub = kem_keys(kem, kem_private)
    kem_name = "x25519" if kem is KemKind.X25519 else "mlkem768-x25519"
    _write_private(directory / "keys" / name / f"{name}.key",
                   f'kem = "{kem_name}"\nsigning_seed = "{signing_seed.hex()}"\n'
                   f'kem_private = "{kem_private.hex()}"\nsecret = "{os.urandom(32).hex()}"\n')
    sign_pub = ed25519.Ed25519PrivateKey.from_private_bytes(signing_seed).public_key()
    return (f'[parties.{name}]\nkem = "{kem_name}"\n'
            f'signing_key = "{sign_pub.public_bytes_raw().hex()}"\n'
            f'kem_key = "{kem_pub.hex()}"\n')


def sample_rows(rng: random.Random, customers: int, universe: int,
                attributes: tuple[AttributeSpec, ...] = DEFAULT_ATTRIBUTES) -> list[list[str]]:
    """Sample data: ids drawn from a shared universe so institutions overlap; values within
    each attribute's bounds (negative and fractional where the bounds allow)."""
    chosen = rng.sample(range(universe), min(customers, universe))
    ranges = [(s, max(s.min, -5 * 10**(6 + s.scale)), min(s.max, 2 * 10**(6 + s.scale)))
              for s in attributes]
    return [[f"CUST-{i:08d}", *(s.format(rng.randint(lo, hi)) for s, lo, hi in ranges)]
            for i in sorted(chosen)]


def init_consortium(directory: Path, *, institutions: int, customers: int, bootstrap: str,
                    consortium: str = "demo", kem: KemKind = KemKind.X25519,
                    keep_existing: bool = False,
                    attributes: tuple[AttributeSpec, ...] = DEFAULT_ATTRIBUTES,
                    insecure: bool = False, ca: Path | None = None,
                    masks: MaskMode = MaskMode.DEALT) -> list[Path]:
    """Write consortium.toml, coordinator.toml, bank-N.toml, keys/ and data/ under directory.

    Kafka security (`agents.security.write_consortium_security`): tls/ and one SCRAM credential
    per party, unless `insecure`; `ca` is the CA of an existing broker to trust instead of a new
    consortium CA.

    Returns the party config files. Refuses to overwrite an existing consortium unless
    `keep_existing`, in which case an existing one is left as it is.
    """
    if institutions < 2:
        raise ValueError("a consortium needs at least 2 institutions")
    directory = directory.resolve()
    if (directory / "consortium.toml").exists():
        if keep_existing:
            return sorted(directory.glob("*.toml"))
        raise FileExistsError(f"{directory / 'consortium.toml'} exists; choose another "
                              "directory (or pass --keep-existing)")
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"bank-{i}" for i in range(1, institutions + 1)]
    parts = [f'[consortium]\nid = "{consortium}"\nbootstrap = "{bootstrap}"\n'
             'coordinator = "coordinator"\n',
             "[policy]\n"
             "# The consortium's floors: the coordinator and every institution enforce them,\n"
             "# and a request may only raise them.\n"
             "allow_subsets = false       # true: a round may leave institutions out\n"
             "min_participants = 0        # with subsets: the fewest institutions (0: all)\n"
             "min_holders = 1             # rows held by fewer institutions are withheld\n"
             "max_query = 10000000        # customers in one query, at most\n"
             "difference_window = 10000   # rounds remembered against differencing\n"
             f'masks = "{masks}"{" " * (18 - len(str(masks)))}# dealt (the patent) or pairwise\n'
             "deadline_s = 120\n"]
    for a in attributes:
        parts.append(f'[[attributes]]\nname = "{a.name}"\nscale = {a.scale}\n'
                     f'min = "{a.format(a.min)}"\nmax = "{a.format(a.max)}"\n')
    kafka, party_kafka = write_consortium_security(directory, consortium,
                                                   ["coordinator", *names], insecure=insecure,
                                                   ca=ca)
    parts.insert(1, kafka)
    parts.append(_party_keys(directory, "coordinator", kem))
    ckey = os.urandom(32).hex()
    rng = random.Random()
    universe = max(customers * 2, 10)
    for name in names:
        parts.append(_party_keys(directory, name, kem))
        _write_private(directory / "keys" / name / "consortium.key", f'key = "{ckey}"\n')
        data = directory / "data" / f"{name}.csv"
        data.parent.mkdir(exist_ok=True)
        with open(data, "w") as fh:
            fh.write(",".join(["customer_id", *(a.name for a in attributes)]) + "\n")
            fh.writelines(",".join(r) + "\n"
                          for r in sample_rows(rng, customers, universe, attributes))
    (directory / "consortium.toml").write_text(
        f"# The consortium: shared by every party. Topics: {topic_for(consortium, '<party>')}\n"
        + "\n".join(parts))
    configs = [directory / "coordinator.toml"]
    configs[0].write_text('party = "coordinator"\nconsortium = "consortium.toml"\n'
                          'private_key = "keys/coordinator/coordinator.key"\n'
                          'state_dir = "state/coordinator"\nlog_format = "text"\n'
                          + party_kafka["coordinator"])
    for name in names:
        p = directory / f"{name}.toml"
        p.write_text(f'party = "{name}"\nconsortium = "consortium.toml"\n'
                     f'private_key = "keys/{name}/{name}.key"\n'
                     f'consortium_key = "keys/{name}/consortium.key"\n'
                     f'data = "data/{name}.csv"\nstate_dir = "state/{name}"\n'
                     'log_format = "text"\n' + party_kafka[name])
        configs.append(p)
    return configs
