"""How far into its inbox a party has handled its input, kept in its own state directory.

`inbox.position` holds one offset: every input below it has been handled and every envelope it
caused acknowledged by the broker. It is written after those acks (atomically: a temporary
file, fsync, rename, fsync of the directory), so after a crash the agent replays the inputs
below it quietly and handles the rest normally.

It replaces Kafka's committed group offset as the agent's source of truth: committing there
needs the group coordinator, a broker the consumer must find first, and a client that keeps
looking for it on a node that stays down (a cluster that lost two of its three nodes, then got
one back) stops the agent for as long as that node is away. A file in the state directory needs
nothing but the disk the journal is on already.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

_OFFSET = struct.Struct(">q")


class PositionError(Exception):
    """`inbox.position` is not an offset (a torn or foreign file)."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(f"{path}: {size} bytes, not an 8-byte offset; remove it to make the "
                         "agent take its position from the consumer group once")
        self.path = path


class InboxPosition:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "inbox.position"

    def load(self) -> int | None:
        """The saved offset, or None if the agent never saved one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != _OFFSET.size:
            raise PositionError(self.path, len(data))
        offset: int = _OFFSET.unpack(data)[0]
        return offset

    def save(self, offset: int) -> None:
        write_atomically(self.path, _OFFSET.pack(offset))


def write_atomically(path: Path, *chunks: bytes) -> None:
    """Replace `path` with `chunks`: a temporary file, fsync, rename, fsync of the directory
    (created if need be); a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
