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


def test_staged_through_survives_acks_and_compaction(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The last inbox offset whose outputs were journaled: what a restart replays quietly."""
    box = Outbox(tmp_path)
    assert box.staged_through() == -1
    chain = Chain()
    box.stage([("t", w) for w in _wires(chain, 1)], through=41)
    box.stage([("t", w) for w in _wires(chain, 1)])  # a timer's output: no inbox offset
    assert box.staged_through() == 41
    box.done(chain)
    box.stage([("t", w) for w in _wires(chain, 1)], through=57)
    monkeypatch.setattr(outbox_mod, "COMPACT_BYTES", 1)
    box.done(chain)  # compacted to the chain head and the last offset
    assert box.log_path.stat().st_size < 100
    assert Outbox(tmp_path).staged_through() == 57
    assert Outbox(tmp_path).load_chain() == chain


def test_the_round_ledger_is_durable_and_cuts_a_torn_record(tmp_path: Path) -> None:
    from agents.ledger import RoundLedger

    ledger = RoundLedger(tmp_path)
    assert ledger.load() == {}
    ledger.append([(b"a" * 16, 5, b"x" * 8), (b"b" * 16, -1, b"y" * 8)])
    assert RoundLedger(tmp_path).load() == {b"a" * 16: (5, b"x" * 8), b"b" * 16: (-1, b"y" * 8)}
    with open(ledger.path, "ab") as fh:
        fh.write(b"c" * 10)  # a crash in the middle of an append
    assert set(RoundLedger(tmp_path).load()) == {b"a" * 16, b"b" * 16}
    ledger.append([(b"d" * 16, 9, b"z" * 8)])  # appends stay aligned after the cut
    assert RoundLedger(tmp_path).load()[b"d" * 16] == (9, b"z" * 8)


def test_the_inbox_position_survives_a_restart_and_a_torn_file_is_named(tmp_path: Path) -> None:
    from agents.position import InboxPosition, PositionError

    pos = InboxPosition(tmp_path / "state")
    assert pos.load() is None  # never saved: a new party, or a state dir of an older version
    pos.save(41)
    pos.save(2**40 + 7)
    assert InboxPosition(tmp_path / "state").load() == 2**40 + 7
    assert not pos.path.with_suffix(".tmp").exists()
    pos.path.write_bytes(b"\0\0\0")  # torn, or not ours
    with pytest.raises(PositionError, match=r"inbox\.position: 3 bytes") as err:
        pos.load()
    assert err.value.path == pos.path
