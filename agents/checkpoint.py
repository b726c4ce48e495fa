"""Where a restart may begin replaying the inbox, kept in the party's state directory.

A restart replays the inbox to rebuild the rounds still in flight; the rounds that ended are in
the ledger (`rounds.ledger`) and need nothing more. `inbox.checkpoint` holds the offset of the
first input of the oldest round that had not ended when it was written (or the saved position,
when none ran), and the differencing guard's participant sets recorded before that offset: the
only state a replay from there cannot rebuild. So a restart reads only what it must, however
long the history: its time does not grow with the months of topic behind it.

The file is JSON, written atomically (a temporary file, fsync, rename, fsync of the directory)
at most every `EVERY_S` seconds of work and when the agent stops. A missing, torn or foreign
file means: replay from the beginning (slower, never wrong).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVERY_S = 5.0  # seconds of work between two checkpoints, at most


@dataclass(frozen=True)
class Checkpoint:
    offset: int
    guard: list[tuple[int, list[str]]]  # (inbox position, participants) recorded before offset


class CheckpointFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "inbox.checkpoint"

    def load(self) -> tuple[Checkpoint | None, str]:
        """The checkpoint, or None and why not (missing, or unreadable: then a full replay)."""
        try:
            raw: Any = json.loads(self.path.read_text())
            offset = raw["offset"]
            guard = [(int(at), [str(n) for n in names]) for at, names in raw["guard"]]
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ValueError(f"offset {offset!r}")
        except FileNotFoundError:
            return None, "no checkpoint yet"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{self.path} unreadable ({type(exc).__name__}: {exc})"
        return Checkpoint(offset, guard), ""

    def save(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump({"offset": checkpoint.offset, "guard": checkpoint.guard}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
