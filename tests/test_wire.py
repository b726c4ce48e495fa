"""The API's frame reader: whatever the chunking, every frame comes out whole, and an
oversized one is skipped to its newline with the stream still in sync."""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from zerosum.wire import FrameReader, FrameTooLarge, decode_frame, encode_frame, version_of

LIMIT = 40
TOO_LARGE = "too large"


async def _read_all(data: bytes, cuts: list[int]) -> list[bytes | str]:
    stream = asyncio.StreamReader()
    at = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        stream.feed_data(data[at:max(cut, at)])
        at = max(cut, at)
    stream.feed_data(data[at:])
    stream.feed_eof()
    frames = FrameReader(stream, LIMIT)
    out: list[bytes | str] = []
    while True:
        try:
            line = await frames.next()
        except FrameTooLarge:
            out.append(TOO_LARGE)
            continue
        if line is None:
            return out
        out.append(line)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=3 * LIMIT).map(lambda b: b.replace(b"\n", b"")),
                max_size=12),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
@example([b"a" * LIMIT, b"b" * (LIMIT + 1), b"", b"c" * (3 * LIMIT)], [LIMIT, LIMIT + 5, 100])
@example([b"d" * (LIMIT + 1), b"e"], [])
def test_frames_survive_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    got = asyncio.run(_read_all(data, cuts))
    assert got == [line if len(line) <= LIMIT else TOO_LARGE for line in lines]


def test_a_frame_round_trips_with_its_version() -> None:
    frame = decode_frame(encode_frame({"op": "status", "id": "\ud800 é\n"}))
    assert frame == {"v": 1, "op": "status", "id": "\ud800 é\n"}
    assert version_of(frame) == 1
    assert version_of({"v": True}) is None
    assert version_of({}) is None
