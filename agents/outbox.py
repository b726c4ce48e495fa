"""The sender's write-ahead journal: envelopes are on disk before they are on the bus.

Each envelope extends the sender's hash chain, so a crash between sealing and producing must
not make the restarted agent reuse a sequence number. `outbox.log` is append-only:

    I <offset> -              the E records after it were caused by inbox inputs up to offset
    E <topic> <envelope>      staged: fsync'ed before the envelope is produced
    A <next_seq> <prev>       acknowledged: every E before it is on the bus

`staged_through()` is the last inbox offset whose outputs were staged: after a crash, inputs up
to it are replayed with their outputs suppressed and the journaled envelopes themselves are
sent again if the bus lacks them, so a receiver sees the very same bytes, never a second copy
sealed anew.

`stage` appends E records and fsyncs (one fsync per batch); `done` appends an A record without
fsync: losing it in a crash only means the restarted agent checks the bus for envelopes that
are already there (see Agent._landed). When the log passes `COMPACT_BYTES`, `done` rewrites it
as a single A record.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgpack

from protocol.envelope import Chain, Header, digest
from protocol.errors import ZerosumError

# every start reads the whole log (a few times): kept small, so a restart's time does not grow with
# the history (one small rewrite and fsync per MiB of envelopes)
COMPACT_BYTES = 1024 * 1024
_E, _A, _I = b"E", b"A", b"I"


class Outbox:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path = self.dir / "outbox.log"

    def _records(self) -> list[tuple[bytes, bytes, bytes]]:
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        out: list[tuple[bytes, bytes, bytes]] = []
        pos = 0
        while pos + 9 <= len(data):
            kind = data[pos:pos + 1]
            alen, blen = struct.unpack_from(">II", data, pos + 1)
            end = pos + 9 + alen + blen
            if end > len(data) or kind not in (_E, _A, _I):
                break  # a torn last record: it was never acknowledged
            out.append((kind, data[pos + 9:pos + 9 + alen], data[pos + 9 + alen:end]))
            pos = end
        return out

    def _tail(self) -> tuple[Chain, list[tuple[str, bytes]]]:
        chain = Chain()
        pending: list[tuple[str, bytes]] = []
        for kind, a, b in self._records():
            if kind == _A:
                chain = Chain(int(a), b)
                pending = []
            elif kind == _E:
                pending.append((a.decode(), b))
        for _, wire in pending:
            h = _header(wire)
            if h.seq + 1 > chain.next_seq:
                chain = Chain(h.seq + 1, digest(wire))
        return chain, pending

    def load_chain(self) -> Chain:
        """The chain head: after the last staged envelope if any, else the last acknowledged."""
        return self._tail()[0]

    def staged_through(self) -> int:
        """The last inbox offset whose outputs were staged, or -1."""
        last = -1
        for kind, a, _ in self._records():
            if kind == _I:
                last = max(last, int(a))
        return last

    def pending(self) -> list[tuple[str, bytes]]:
        """(topic, envelope) staged but not known to be acknowledged, in order."""
        return self._tail()[1]

    @staticmethod
    def _record(kind: bytes, a: bytes, b: bytes) -> bytes:
        return kind + struct.pack(">II", len(a), len(b)) + a + b

    def stage(self, items: list[tuple[str, bytes]], through: int | None = None) -> None:
        """Journal envelopes (fsync) before they are produced; `through`: the last inbox
        offset among the inputs that caused them."""
        head = b"" if through is None else self._record(_I, str(through).encode(), b"")
        with open(self.log_path, "ab") as fh:
            fh.write(head + b"".join(self._record(_E, t.encode(), w) for t, w in items))
            fh.flush()
            os.fsync(fh.fileno())

    def done(self, chain: Chain) -> None:
        record = self._record(_A, str(chain.next_seq).encode(), chain.prev)
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < COMPACT_BYTES:
            with open(self.log_path, "ab") as fh:
                fh.write(record)
            return
        through = self.staged_through()
        tmp = self.log_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            if through >= 0:
                fh.write(self._record(_I, str(through).encode(), b""))
            fh.write(record)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.log_path)


def _header(wire: bytes) -> Header:
    outer = msgpack.unpackb(wire, raw=False)
    try:
        return Header.decode(outer[1])
    except (ZerosumError, IndexError, TypeError) as exc:
        raise RuntimeError(f"outbox.log holds an envelope that is not ours: {exc}") from exc
