"""The durable record of every round id a party has opened: round ids are unique forever.

`rounds.ledger` in the party's state directory is append-only: 16 bytes of round id, 8 bytes of
the inbox offset (signed, big-endian; -1 when unknown) of the envelope that opened the round and
the first 8 bytes of that envelope's SHA-256 (so a recreated topic cannot pass another envelope
off as the one at an old offset).
Entries are fsync'ed before the outputs of that input are produced, so a restarted agent, and
one that has run for months, refuses an id it has used, while the replay of its own inbox
(the same input at the same offset) rebuilds the round as before. A torn last record is
ignored: its outputs were never produced.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from protocol.messages import ROUND_ID_BYTES

_RECORD = struct.Struct(f">{ROUND_ID_BYTES}sq8s")


class RoundLedger:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "rounds.ledger"

    def load(self) -> dict[bytes, tuple[int, bytes]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        whole = len(data) - len(data) % _RECORD.size
        if whole != len(data):  # cut a torn last record, so that appends stay aligned
            with open(self.path, "r+b") as fh:
                fh.truncate(whole)
        return {rid: (pos, env) for rid, pos, env in _RECORD.iter_unpack(data[:whole])}

    def append(self, entries: list[tuple[bytes, int, bytes]]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path, "ab") as fh:
            fh.write(b"".join(_RECORD.pack(rid, pos, env) for rid, pos, env in entries))
            fh.flush()
            os.fsync(fh.fileno())
