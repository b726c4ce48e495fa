"""The sender's write-ahead journal: envelopes are on disk before they are on the bus.

Each envelope extends the sender's hash chain, so a crash between sealing and producing must
not make the restarted agent reuse a sequence number. `Outbox.stage` appends the envelopes to
`outbox.log` and fsyncs; after the broker acknowledged them, `Outbox.done` records the chain
head in `chain.json` (atomic rename) and empties the log. On start, whatever is still in the
log is produced again byte for byte; receivers drop exact duplicates.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import msgpack

from protocol.envelope import Chain, Header, digest
from protocol.errors import ZerosumError


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path = self.dir / "outbox.log"
        self.chain_path = self.dir / "chain.json"

    def load_chain(self) -> Chain:
        """The chain head: after the last staged envelope if any, else the last acknowledged."""
        chain = Chain()
        if self.chain_path.exists():
            raw = json.loads(self.chain_path.read_text())
            chain = Chain(int(raw["next_seq"]), bytes.fromhex(raw["prev"]))
        for _, wire in self.pending():
            h = _header(wire)
            if h.seq + 1 > chain.next_seq:
                chain = Chain(h.seq + 1, digest(wire))
        return chain

    def pending(self) -> list[tuple[str, bytes]]:
        """(topic, envelope) staged but not known to be acknowledged, in order."""
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        out: list[tuple[str, bytes]] = []
        pos = 0
        while pos + 8 <= len(data):
            tlen, wlen = struct.unpack_from(">II", data, pos)
            end = pos + 8 + tlen + wlen
            if end > len(data):
                break  # a torn last record: never acknowledged, never produced
            topic = data[pos + 8:pos + 8 + tlen].decode()
            out.append((topic, data[pos + 8 + tlen:end]))
            pos = end
        return out

    def stage(self, items: list[tuple[str, bytes]]) -> None:
        with open(self.log_path, "ab") as fh:
            for topic, wire in items:
                t = topic.encode()
                fh.write(struct.pack(">II", len(t), len(wire)) + t + wire)
            fh.flush()
            os.fsync(fh.fileno())

    def done(self, chain: Chain) -> None:
        tmp = self.chain_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next_seq": chain.next_seq, "prev": chain.prev.hex()}))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.chain_path)
        self.log_path.unlink(missing_ok=True)


def _header(wire: bytes) -> Header:
    outer = msgpack.unpackb(wire, raw=False)
    try:
        return Header.decode(outer[1])
    except (ZerosumError, IndexError, TypeError) as exc:
        raise RuntimeError(f"outbox.log holds an envelope that is not ours: {exc}") from exc
