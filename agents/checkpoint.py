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

import asyncio
import hashlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from agents.position import write_atomically
from protocol.party import CoordinatorParty, InstitutionParty

MAGIC = b"zerosum-checkpoint\n"
VERSION = 1
_HEAD = struct.Struct(f">{len(MAGIC)}sHQ32s")
CHECKPOINT_EVERY_S = 60.0  # of the agent's clock, at most one snapshot while it runs
# kill -9 tests of agents as processes: snapshot at every quiet moment ("0")
EVERY_S_ENV = "ZEROSUM_CHECKPOINT_EVERY_S"


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


class Checkpointer:
    """When an agent snapshots its party, and the saving of those snapshots off the event loop.

    `take()` is called under the agent's lock at the points where everything the handled inputs
    caused is on the bus and the inbox position past them is saved. It snapshots the party when
    it is quiescent, something changed since the last snapshot and `every_s` seconds of the
    agent's clock have passed (a snapshot of a party that keeps 10,000 ended rounds takes about
    0.2 s on the event loop); `force` (a clean stop) skips the wait. The bytes are written in a
    thread, one save after another; a snapshot taken while one is being written replaces any
    that waits its turn. A failed save is logged: the agent carries on, and its next restart
    replays more."""

    def __init__(self, file: CheckpointFile, now: Callable[[], float], log: logging.Logger,
                 every_s: float | None = None) -> None:
        self.file = file
        self.now = now
        self.log = log
        self.every_s = every_s if every_s is not None else float(
            os.environ.get(EVERY_S_ENV, CHECKPOINT_EVERY_S))
        self.saved = 0  # snapshots written
        self._changed = 0  # inputs and deadlines handled since the last snapshot
        self._taken_at = now()
        self._next: bytes | None = None
        self._saving: asyncio.Task[None] | None = None

    def changed(self, inputs: int) -> None:
        self._changed += inputs

    def take(self, party: CoordinatorParty | InstitutionParty, *, force: bool = False) -> bool:
        """Snapshot `party` and have it saved, when it is due and possible; True if taken."""
        if not self._changed or not (force or self.now() - self._taken_at >= self.every_s):
            return False
        if not party.quiescent():
            return False
        self._next = party.snapshot()
        self._changed, self._taken_at = 0, self.now()
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save_all())
        return True

    async def _save_all(self) -> None:
        while self._next is not None:
            data, self._next = self._next, None
            try:
                await asyncio.to_thread(self.file.save, data)
                self.saved += 1
            except OSError as exc:
                self.log.error("the checkpoint %s could not be saved (%s); a restart replays "
                               "from the one before", self.file.path, exc)

    async def drain(self) -> None:
        """Return once every snapshot taken is written."""
        if self._saving is not None:
            await asyncio.shield(self._saving)
