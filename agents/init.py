"""`zerosum init`: a working consortium in one directory, keys drawn from the OS."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import tomli_w

from agents.config import topic_for
from agents.keys import new_party_keys, write_atomic
from agents.security import write_consortium_security
from protocol.envelope import KemKind
from protocol.fixedpoint import AttributeSpec
from protocol.messages import MaskMode, check_party

DEFAULT_ATTRIBUTES = (
    AttributeSpec("balance", 2, -10**13, 10**13),   # loan balance, +-100 billion at cents
    AttributeSpec("overdue_days", 0, 0, 36_500),
)


def _toml(table: dict[str, Any], comment: str = "") -> str:
    """TOML text written by tomli_w (every string escaped), after `comment` as # lines."""
    lines = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return lines + tomli_w.dumps(table)


def _party_keys(directory: Path, name: str, kem: KemKind) -> dict[str, str]:
    """Write `keys/<name>/<name>.key` (mode 600); return the party's [parties] entry.

    Each party's secrets are in a directory of their own, to be handed to that party alone:
    the consortium key (institutions only) is never beside the coordinator's key."""
    private, public = new_party_keys(kem)
    write_atomic(directory / "keys" / name / f"{name}.key", _toml(private), private=True)
    return public


POLICY_COMMENT = """The consortium's floors: the coordinator and every institution enforce them,
and a request may only raise them.
allow_subsets      true: a round may leave institutions out
min_participants   with subsets: the fewest institutions (0: all)
min_holders        rows held by fewer institutions are withheld
max_query          customers in one query, at most
difference_window  rounds remembered against differencing
masks              dealt (the patent) or pairwise"""


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
    check_party(consortium, "consortium id")  # ValueError, as load_consortium would say
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"bank-{i}" for i in range(1, institutions + 1)]
    kafka = write_consortium_security(directory, consortium, ["coordinator", *names],
                                      insecure=insecure, ca=ca)
    parties = {"coordinator": _party_keys(directory, "coordinator", kem)}
    ckey = os.urandom(32).hex()
    rng = random.Random()
    universe = max(customers * 2, 10)
    for name in names:
        parties[name] = _party_keys(directory, name, kem)
        write_atomic(directory / "keys" / name / "consortium.key", _toml({"key": ckey}),
                     private=True)
        data = directory / "data" / f"{name}.csv"
        data.parent.mkdir(exist_ok=True)
        with open(data, "w") as fh:
            fh.write(",".join(["customer_id", *(a.name for a in attributes)]) + "\n")
            fh.writelines(",".join(r) + "\n"
                          for r in sample_rows(rng, customers, universe, attributes))
    # one document in sections, each with its comment; `attributes` first: a key after a
    # [table] header would belong to that table
    (directory / "consortium.toml").write_text("\n".join([
        _toml({"attributes": [{"name": a.name, "scale": a.scale, "min": a.format(a.min),
                               "max": a.format(a.max)} for a in attributes]},
              "The consortium: shared by every party. Topics: "
              f"{topic_for(consortium, '<party>')}\n\nThe attributes summed: decimal places "
              "(scale) and bounds"),
        _toml({"consortium": {"id": consortium, "bootstrap": bootstrap,
                              "coordinator": "coordinator"}}),
        _toml({"kafka": kafka.shared}, kafka.comment),
        _toml({"policy": {"allow_subsets": False, "min_participants": 0, "min_holders": 1,
                          "max_query": 10_000_000, "difference_window": 10_000,
                          "masks": str(masks), "deadline_s": 120}}, POLICY_COMMENT),
        _toml({"parties": parties})]))
    configs = []
    for name in ["coordinator", *names]:
        p = directory / f"{name}.toml"
        own: dict[str, Any] = {"party": name, "consortium": "consortium.toml",
                               "private_key": f"keys/{name}/{name}.key"}
        if name != "coordinator":
            own |= {"consortium_key": f"keys/{name}/consortium.key",
                    "data": f"data/{name}.csv"}
        own |= {"state_dir": f"state/{name}", "log_format": "text"}
        if kafka.parties[name]:
            own["kafka"] = kafka.parties[name]
        p.write_text(_toml(own))
        configs.append(p)
    return configs
