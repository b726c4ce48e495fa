"""The write-ahead journal keeps the sender's chain across crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

import agents.outbox as outbox_mod
from agents.outbox import Outbox
from protocol.driver import CONSORTIUM, keys_for
from protocol.envelope import Chain, digest, seal
from protocol.messages import MessageKind


def _wires(chain: Chain, n: int) -> list[bytes]:
    alice, _ = keys_for("alice", b"o")
    _, bob = keys_for("bob", b"o")
    return [w for _ in range(n) for w in seal(b"body", sender=alice, recipient=bob,
                                               consortium=CONSORTIUM, round_id=bytes(16),
                                               kind=MessageKind.CONTRIBUTION, chain=chain)]


def test_staged_envelopes_are_pending_until_done(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.load_chain() == Chain()
    chain = Chain()
    wires = _wires(chain, 3)
    box.stage([("t", w) for w in wires])
    assert box.pending() == [("t", w) for w in wires]
    # a crash now: the chain continues after the staged envelopes, never reusing their seqs
    assert box.load_chain() == Chain(3, digest(wires[-1]))
    box.done(chain)
    assert box.pending() == []
    assert Outbox(tmp_path).load_chain() == chain


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    chain = Chain()
    first = _wires(chain, 1)
    box.stage([("t", first[0])])
    box.done(chain)
    second = _wires(chain, 1)
    box.stage([("t", second[0])])
    data = box.log_path.read_bytes()
    box.log_path.write_bytes(data[:-10])  # the crash cut the last write
    assert box.pending() == []
    assert box.load_chain() == Chain(1, digest(first[0]))


def test_compaction_keeps_only_the_chain_head(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_mod, "COMPACT_BYTES", 1)
    box = Outbox(tmp_path)
    chain = Chain()
    box.stage([("t", w) for w in _wires(chain, 2)])
    box.done(chain)
    assert box.log_path.stat().st_size < 100
    assert Outbox(tmp_path).load_chain() == chain
