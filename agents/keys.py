"""`zerosum keys rotate`: a party's new signing and KEM keys, or a new consortium token key,
each as a new epoch, written where `zerosum init` put the first ones.

A party's rotation (`rotate_party`):
1. its key file `keys/<party>/<party>.key` is kept as `keys/<party>/<party>.epoch-<N>.key`
   (mode 600: what was sealed to its KEM key can still be opened, by the agent while peers
   catch up and by an audit with the party's file; delete it to forget those keys);
2. the new keys are written to `keys/<party>/<party>.key` with `epoch = N + 1` (the per-round
   `secret` is kept: it is no key anyone verifies);
3. `consortium.toml` lists the new public keys as the party's current ones and keeps the old
   ones in `[[parties.<party>.earlier]]`: epoch N in its grace, every older epoch
   `retired = true` (refused by every receiver; the audit still verifies with it).
Running agents read `consortium.toml` again when it changes: the rotated party's agent signs
and is sealed to with its new keys from then on. `retire_party` ends the grace at once.

The token key (`rotate_token_key`): one new random key, epoch N + 1, written to every
institution's `keys/<institution>/consortium.key`, which keeps the epoch-N key in `[[earlier]]`
for the rounds asked before the rotation; older ones are deleted (no round can be asked under
them any more). Never written for the coordinator: it must never hold a token key.

Every file is written whole to a temporary file, fsync'ed, then renamed over the old one, so a
reader sees the old file or the new one; private files are mode 600 from their creation.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric import ed25519

from agents.config import (
    KEM_NAME_OF,
    ConfigError,
    archived_key,
    load_consortium,
    load_token_keys,
)
from protocol.envelope import KemKind, kem_keys
from protocol.tokens import CONSORTIUM_KEY_BYTES


def write_atomic(path: Path, text: str, *, private: bool = False) -> None:
    """`text` to `path` whole or not at all (temporary file, fsync, rename); mode 600 when
    `private`, from the moment the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if private:
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def new_party_keys(kem: KemKind, *, epoch: int = 0,
                   secret: bytes | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fresh keys from the OS: (the private key file's table, the public [parties] entry)."""
    signing_seed = os.urandom(32)
    kem_private = os.urandom(32 if kem is KemKind.X25519 else 96)
    _, _, kem_pub = kem_keys(kem, kem_private)
    name = KEM_NAME_OF[kem]
    private: dict[str, Any] = {"kem": name, "signing_seed": signing_seed.hex(),
                               "kem_private": kem_private.hex(),
                               "secret": (secret or os.urandom(32)).hex()}
    sign_pub = ed25519.Ed25519PrivateKey.from_private_bytes(signing_seed).public_key()
    public: dict[str, Any] = {"kem": name, "signing_key": sign_pub.public_bytes_raw().hex(),
                              "kem_key": kem_pub.hex()}
    if epoch:
        private["epoch"] = public["epoch"] = epoch
    return private, public


@dataclass(frozen=True)
class Rotated:
    party: str
    epoch: int  # the new current epoch
    files: tuple[Path, ...]  # written, in order


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc


def _write_parties(consortium: Path, parties: dict[str, Any]) -> None:
    """consortium.toml with its [parties] replaced, the text before them (comments, other
    tables) kept as it is: `zerosum init` writes [parties] last."""
    text = consortium.read_text()
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines)
                  if line.startswith(("[parties.", "[parties]", "[[parties."))), None)
    after = [line for line in lines[start:] if line.startswith("[")] if start is not None else []
    if start is None or any(not line.startswith(("[parties.", "[parties]", "[[parties."))
                            for line in after):
        raise ConfigError(f"{consortium}: [parties] must be the file's last tables to be "
                          "rewritten here (as `zerosum init` writes it); edit it by hand")
    write_atomic(consortium, "".join(lines[:start]) + tomli_w.dumps({"parties": parties}))
    load_consortium(consortium)  # what was written reads back


def rotate_party(consortium: Path, party: str, *, key_file: Path | None = None) -> Rotated:
    """New signing and KEM keys for `party` as a new epoch (see the module's docstring)."""
    c = load_consortium(consortium)
    if party not in c.registry:
        raise ConfigError(f"{consortium}: no party {party!r}")
    key_file = key_file or consortium.parent / "keys" / party / f"{party}.key"
    old = _read(key_file)
    epoch = c.registry[party].epoch
    if old.get("epoch", 0) != epoch:
        raise ConfigError(f"{key_file} holds key epoch {old.get('epoch', 0)}; "
                          f"{consortium} lists {party} at epoch {epoch}")
    kem = c.registry[party].kem
    private, public = new_party_keys(kem, epoch=epoch + 1,
                                     secret=bytes.fromhex(str(old["secret"])))
    archive = archived_key(key_file, epoch)
    write_atomic(archive, tomli_w.dumps(old), private=True)
    write_atomic(key_file, tomli_w.dumps(private), private=True)
    parties = _read(consortium)["parties"]
    entry = parties[party]
    earlier = [dict(e, retired=True) for e in entry.pop("earlier", [])]
    entry.setdefault("epoch", 0)
    parties[party] = public | {"earlier": [*earlier, dict(entry, retired=False)]}
    _write_parties(consortium, parties)
    return Rotated(party, epoch + 1, (archive, key_file, consortium))


def retire_party(consortium: Path, party: str) -> Rotated:
    """End the grace of `party`'s past epochs now: every receiver refuses them (a key that
    leaked, or once the rounds in flight at the rotation have ended)."""
    parties = _read(consortium)["parties"]
    if party not in parties:
        raise ConfigError(f"{consortium}: no party {party!r}")
    entry = parties[party]
    entry["earlier"] = [dict(e, retired=True) for e in entry.get("earlier", [])]
    _write_parties(consortium, parties)
    return Rotated(party, int(entry.get("epoch", 0)), (consortium,))


def rotate_token_key(consortium: Path) -> Rotated:
    """A new consortium token key, epoch N + 1, for every institution (module docstring)."""
    c = load_consortium(consortium)
    files = [consortium.parent / "keys" / p / "consortium.key" for p in c.institutions]
    current = {f: load_token_keys(f) for f in files}
    if len({(e, k) for e, k, _ in current.values()}) != 1:
        raise ConfigError("the institutions' consortium.key files differ: "
                          + ", ".join(f"{f} (epoch {e})" for f, (e, _, _) in current.items()))
    epoch, key, _ = current[files[0]]
    text = tomli_w.dumps({"epoch": epoch + 1, "key": os.urandom(CONSORTIUM_KEY_BYTES).hex(),
                          "earlier": [{"epoch": epoch, "key": key.hex()}]})
    for f in files:
        write_atomic(f, text, private=True)
    return Rotated("consortium", epoch + 1, tuple(files))


def retire_token_keys(consortium: Path) -> Rotated:
    """Forget the past token keys at every institution: rounds asked under them abort."""
    c = load_consortium(consortium)
    files = [consortium.parent / "keys" / p / "consortium.key" for p in c.institutions]
    epoch = 0
    for f in files:
        epoch, key, _ = load_token_keys(f)
        write_atomic(f, tomli_w.dumps({"epoch": epoch, "key": key.hex()}), private=True)
    return Rotated("consortium", epoch, tuple(files))
