"""`party.snapshot` on disk: absent, whole, torn, altered, foreign, replaced."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agents.checkpoint import MAGIC, CheckpointError, CheckpointFile
from tests.test_snapshot import fresh, play, state, world


def test_none_until_saved_then_the_bytes_saved(tmp_path: Path) -> None:
    f = CheckpointFile(tmp_path / "state")
    assert f.load() is None
    f.save(b"first")
    assert f.load() == b"first"
    f.save(b"second, longer")  # replaced whole
    assert f.load() == b"second, longer"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["party.snapshot"]


@pytest.mark.parametrize("damage", ["torn", "flipped", "grown", "foreign", "newer", "empty"])
def test_a_damaged_file_is_a_typed_error(tmp_path: Path, damage: str) -> None:
    f = CheckpointFile(tmp_path)
    f.save(b"x" * 1000)
    data = bytearray(f.path.read_bytes())
    if damage == "torn":
        data = data[:-1]
    elif damage == "flipped":
        data[-10] ^= 1
    elif damage == "grown":
        data += b"\0"
    elif damage == "foreign":
        data[:len(MAGIC)] = b"{" * len(MAGIC)
    elif damage == "newer":
        data[len(MAGIC):len(MAGIC) + 2] = struct.pack(">H", 2)
    else:
        data = bytearray()
    f.path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(f.path)):
        f.load()


def test_a_party_restored_from_its_file_is_the_party(tmp_path: Path) -> None:
    w = world(11)
    play(w, "coordinator", [("round", 0, 0, 0), ("round", 1, 1, 0), ("dup", 2, 0, 0)])
    live = w.net.coordinator
    assert live.quiescent()
    f = CheckpointFile(tmp_path)
    f.save(live.snapshot())
    data = f.load()
    assert data is not None
    again = fresh(live)
    again.ledger = dict(live.ledger)
    assert again.restore(data) == live.last_position + 1
    assert state(again) == state(live)
