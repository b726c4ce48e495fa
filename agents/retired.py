"""The key epochs this party refuses, and from which inbox position: `key-epochs.retired` in its
state directory.

A record says "party P's key epoch E is retired from inbox position N": inputs at N and after
are refused when signed with it, sealed to it, or carrying a statement signed with it; inputs
below N were handled before the agent knew, and a replay of the inbox after a restart handles
them as the live run did (`protocol.envelope.Inbox.retire`). The agent writes a record when it
loads a consortium file that marks the epoch retired, or when its clock passes the epoch's
`grace_until`, with N the next position it will handle, before it handles any further input.
Records are never removed (the file marking an epoch retired again changes nothing).

The file is JSON, `[[party, epoch, position], ...]`, written whole (temporary file, fsync,
rename, fsync of the directory).
"""

from __future__ import annotations

import json
from pathlib import Path

from agents.config import Consortium
from agents.keys import write_atomic


class RetiredEpochsError(Exception):
    """`key-epochs.retired` is not a list of [party, epoch, position] (a foreign file)."""


class RetiredEpochs:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "key-epochs.retired"

    def load(self) -> dict[tuple[str, int], int]:
        """(party, epoch) -> the first inbox position at which the epoch is refused."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RetiredEpochsError(f"{self.path}: {exc}") from exc
        if not isinstance(raw, list) or not all(
                isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
                and all(type(v) is int and v >= 0 for v in r[1:]) for r in raw):
            raise RetiredEpochsError(f"{self.path}: not a list of [party, epoch, position]")
        return {(p, e): n for p, e, n in raw}

    def save(self, records: dict[tuple[str, int], int]) -> None:
        write_atomic(self.path, json.dumps(sorted([p, e, n] for (p, e), n in records.items())),
                     private=True)


def due(consortium: Consortium, now: float) -> set[tuple[str, int]]:
    """The (party, epoch) pairs retired by `consortium` at time `now` (POSIX seconds): marked
    `retired`, or past their `grace_until`."""
    marked = {(p, e) for p, entry in consortium.registry.items() for e in entry.retired}
    return marked | {k for k, until in consortium.grace_until.items() if until <= now}
