"""The party's last snapshot on disk, so that a restart replays only the inbox after it.

`party.snapshot` in the party's state directory holds the bytes of `party.snapshot()`
(`protocol.snapshot`), framed so that a torn or altered file is told from a good one:

    magic "zerosum-checkpoint\\n" | version (u16) | length (u64) | SHA-256 of the payload | payload

It is written atomically: a temporary file, fsync, rename over the old one, fsync of the
directory. A crash at any point leaves the old checkpoint or the new one, never a mix.
`load()` gives None when there is none and raises `CheckpointError` when the file is not a
whole checkpoint of this format (then the agent replays its inbox from the beginning, slower
and right, and its next save replaces the file).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from agents.position import write_atomically

MAGIC = b"zerosum-checkpoint\n"
VERSION = 1
_HEAD = struct.Struct(f">{len(MAGIC)}sHQ32s")


class CheckpointError(Exception):
    """`party.snapshot` exists but is not a whole checkpoint (torn, altered, another format)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}; the agent replays its inbox from the beginning")
        self.path = path


class CheckpointFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "party.snapshot"

    def load(self) -> bytes | None:
        """The snapshot's bytes, or None if none was ever saved."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _HEAD.size:
            raise CheckpointError(self.path, f"{len(data)} bytes, shorter than its header")
        magic, version, length, checksum = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise CheckpointError(self.path, "not a zerosum checkpoint")
        if version != VERSION:
            raise CheckpointError(self.path, f"checkpoint version {version}; this build reads "
                                  f"version {VERSION}")
        payload = data[_HEAD.size:]
        if len(payload) != length:
            raise CheckpointError(self.path, f"{len(payload)} bytes of snapshot, its header "
                                  f"says {length} (torn)")
        if hashlib.sha256(payload).digest() != checksum:
            raise CheckpointError(self.path, "the snapshot does not match its checksum")
        return payload

    def save(self, snapshot: bytes) -> None:
        """Replace the checkpoint with `snapshot`, atomically and durably."""
        write_atomically(self.path, _HEAD.pack(MAGIC, VERSION, len(snapshot),
                                               hashlib.sha256(snapshot).digest()), snapshot)
