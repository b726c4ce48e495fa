"""`zerosum keys rotate`: a party's new signing and KEM keys, or a new consortium token key,
each as a new epoch, written where `zerosum init` put the first ones.

A party's rotation (`rotate_party`), from epoch N to N + 1, in steps that a re-run after a crash
at any of them completes (each step is done again or found done):
1. the new keys go to `keys/<party>/<party>.key.next` (epoch N + 1; the per-round `secret` is
   kept: it is no key anyone verifies), unless a crashed run left them there already;
2. the KEM private key of epoch N (and nothing else: not its signing seed) is kept as
   `keys/<party>/<party>.epoch-<N>.key`, mode 600: what was sealed to it can still be opened,
   by the agent while peers catch up and by an audit with the party's file; delete it to
   forget it;
3. `consortium.toml` lists the new public keys as the party's current ones and keeps the old
   ones in `[[parties.<party>.earlier]]`: epoch N with `grace_until` (now + `--grace`, by
   default the policy's `max_deadline_s`: the rounds in flight end by then), every older
   epoch `retired = true`. The file is checked before it replaces the old one;
4. `<party>.key.next` replaces `<party>.key` (an agent that reads the consortium file between
   3 and 4 takes its keys from `.next`).
Running agents read `consortium.toml` again when it changes: the rotated party's agent signs
and is sealed to with its new keys from then on. Each agent records a past epoch retired from
its next inbox position once its clock passes `grace_until`, or once the file marks it
`retired` (`retire_party` does that at once: a leaked key). Until then, whoever holds the old
signing key can still sign with it (receivers refuse it from a sender once they have seen that
sender's newer key).

The token key (`rotate_token_key`): one new random key, epoch N + 1, written to every
institution's `keys/<institution>/consortium.key`, which keeps the epoch-N key in `[[earlier]]`
for the rounds asked before the rotation; older ones are deleted (no round can be asked under
them any more). Never written for the coordinator: it must never hold a token key. A run that
crashed after some of the files is completed by the next run (the new key is read back from a
file already written).

One `zerosum keys` command at a time: each holds a lock on `consortium.toml.lock` (released by
the system if the process dies). Every file is written whole to a temporary file, fsync'ed,
then renamed over the old one, so a reader sees the old file or the new one; private files are
mode 600 from their creation.
"""

from __future__ import annotations

import fcntl
import os
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    pending_key,
)
from protocol.envelope import KemKind, kem_keys
from protocol.tokens import CONSORTIUM_KEY_BYTES


def write_atomic(path: Path, text: str, *, private: bool = False,
                 check: Callable[[Path], object] | None = None) -> None:
    """`text` to `path` whole or not at all (temporary file, fsync, rename); mode 600 when
    `private`, from the moment the file exists. `check` reads the temporary file before it
    replaces `path` (it raises to leave `path` as it was)."""
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
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _install(pending: Path, path: Path) -> None:
    """`pending` becomes `path` (a rename: a reader sees one file or the other)."""
    os.replace(pending, path)
    _fsync_dir(path.parent)


@contextmanager
def lock(consortium: Path) -> Iterator[None]:
    """One `zerosum keys` command at a time on a consortium (an flock on
    `consortium.toml.lock`: the system releases it when the process ends, even by a crash)."""
    path = consortium.with_name(f"{consortium.name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"{path}: another `zerosum keys` command is running on this "
                              "consortium; try again when it is done") from exc
        yield
    finally:
        os.close(fd)


def new_party_keys(kem: KemKind, *, epoch: int = 0,
                   secret: bytes | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fresh keys from the OS: (the private key file's table, the public [parties] entry)."""
    signing_seed = os.urandom(32)
    kem_private = os.urandom(32 if kem is KemKind.X25519 else 96)
    name = KEM_NAME_OF[kem]
    private: dict[str, Any] = {"kem": name, "signing_seed": signing_seed.hex(),
                               "kem_private": kem_private.hex(),
                               "secret": (secret or os.urandom(32)).hex()}
    if epoch:
        private["epoch"] = epoch
    return private, public_entry(private, kem)


def public_entry(private: dict[str, Any], kem: KemKind) -> dict[str, Any]:
    """The [parties] entry of the public keys of a private key file's table."""
    _, _, kem_pub = kem_keys(kem, bytes.fromhex(str(private["kem_private"])))
    sign_pub = ed25519.Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(str(private["signing_seed"]))).public_key()
    public: dict[str, Any] = {"kem": private["kem"],
                              "signing_key": sign_pub.public_bytes_raw().hex(),
                              "kem_key": kem_pub.hex()}
    if private.get("epoch", 0):
        public["epoch"] = private["epoch"]
    return public


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
    write_atomic(consortium, "".join(lines[:start]) + tomli_w.dumps({"parties": parties}),
                 check=load_consortium)  # what replaces the file reads back first


def rotate_party(consortium: Path, party: str, *, key_file: Path | None = None,
                 grace_s: float | None = None, now: datetime | None = None) -> Rotated:
    """New signing and KEM keys for `party` as a new epoch (see the module's docstring); the
    previous epoch's grace ends `grace_s` after `now` (default: the policy's max_deadline_s
    after the present time)."""
    with lock(consortium):
        c = load_consortium(consortium)
        if party not in c.registry:
            raise ConfigError(f"{consortium}: no party {party!r}")
        listed = c.registry[party]
        key_file = key_file or consortium.parent / "keys" / party / f"{party}.key"
        old = _read(key_file)
        epoch = int(old.get("epoch", 0))
        pending = pending_key(key_file)
        if pending.exists():  # a run that crashed: complete it with the keys it wrote
            new = _read(pending)
            if new.get("epoch") != epoch + 1:
                raise ConfigError(f"{pending} holds key epoch {new.get('epoch')}, not "
                                  f"{epoch + 1}: remove it and run again")
        else:
            if epoch != listed.epoch:
                raise ConfigError(f"{key_file} holds key epoch {epoch}; {consortium} lists "
                                  f"{party} at epoch {listed.epoch}")
            new, _ = new_party_keys(listed.kem, epoch=epoch + 1,
                                    secret=bytes.fromhex(str(old["secret"])))
            write_atomic(pending, tomli_w.dumps(new), private=True)
        public = public_entry(new, listed.kem)
        archive = archived_key(key_file, epoch)
        write_atomic(archive, tomli_w.dumps({"epoch": epoch, "kem": old["kem"],
                                             "kem_private": old["kem_private"]}),
                     private=True)
        if listed.epoch == epoch:
            grace = c.policy.max_deadline_s if grace_s is None else grace_s
            until = (now or datetime.now(UTC)) + timedelta(seconds=grace)
            parties = _read(consortium)["parties"]
            entry = parties[party]
            earlier = [_retired(e) for e in entry.pop("earlier", [])]
            entry.setdefault("epoch", 0)
            parties[party] = public | {"earlier": [
                *earlier, dict(entry, retired=False, grace_until=until.astimezone(UTC))]}
            _write_parties(consortium, parties)
        elif (listed.epoch, listed.signing_key.public_bytes_raw().hex()) != (
                epoch + 1, public["signing_key"]):
            raise ConfigError(f"{consortium} lists {party} at epoch {listed.epoch} with "
                              f"other keys than {pending}")
        _install(pending, key_file)
    return Rotated(party, epoch + 1, (pending, archive, consortium, key_file))


def _retired(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "grace_until"} | {"retired": True}


def retire_party(consortium: Path, party: str) -> Rotated:
    """End the grace of `party`'s past epochs now: every agent records them retired from its
    next inbox position (a key that leaked, or once the rounds in flight have ended)."""
    with lock(consortium):
        parties = _read(consortium)["parties"]
        if party not in parties:
            raise ConfigError(f"{consortium}: no party {party!r}")
        entry = parties[party]
        entry["earlier"] = [_retired(e) for e in entry.get("earlier", [])]
        _write_parties(consortium, parties)
    return Rotated(party, int(entry.get("epoch", 0)), (consortium,))


def rotate_token_key(consortium: Path) -> Rotated:
    """A new consortium token key, epoch N + 1, for every institution (module docstring)."""
    with lock(consortium):
        c = load_consortium(consortium)
        files = [consortium.parent / "keys" / p / "consortium.key" for p in c.institutions]
        current = {f: load_token_keys(f) for f in files}
        epoch, key, earlier = max(current.values(), key=lambda t: t[0])
        lagging = [f for f, (e, k, _) in current.items() if (e, k) != (epoch, key)]
        if not lagging:  # a new rotation
            earlier = {epoch: key}
            epoch, key, lagging = epoch + 1, os.urandom(CONSORTIUM_KEY_BYTES), files
        elif any((e, k) != (epoch - 1, earlier.get(epoch - 1)) for f in lagging
                 for e, k, _ in [current[f]]):
            raise ConfigError("the institutions' consortium.key files differ: " + ", ".join(
                f"{f} (epoch {e})" for f, (e, _, _) in current.items()))
        # else: a run that crashed after some files: the others get the key it wrote
        text = tomli_w.dumps({"epoch": epoch, "key": key.hex(), "earlier": [
            {"epoch": epoch - 1, "key": earlier[epoch - 1].hex()}]})
        for f in lagging:
            write_atomic(f, text, private=True)
    return Rotated("consortium", epoch, tuple(lagging))


def retire_token_keys(consortium: Path) -> Rotated:
    """Forget the past token keys at every institution: rounds asked under them abort."""
    with lock(consortium):
        c = load_consortium(consortium)
        files = [consortium.parent / "keys" / p / "consortium.key" for p in c.institutions]
        epoch = 0
        for f in files:
            epoch, key, _ = load_token_keys(f)
            write_atomic(f, tomli_w.dumps({"epoch": epoch, "key": key.hex()}), private=True)
    return Rotated("consortium", epoch, tuple(files))
