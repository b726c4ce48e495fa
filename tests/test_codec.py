"""The codec: canonical round trips, and only typed errors for anything else."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode, same_content
from protocol.errors import (
    CodecError,
    InvalidField,
    MalformedMessage,
    MessageTooLarge,
    MissingField,
    UnknownField,
    UnsupportedVersion,
    WrongType,
)
from protocol.messages import MESSAGE_TYPES, Contribution, Message
from tests.samples import transcript, variant

MESSAGES: list[Message] = [m for _, m in transcript().messages.values()]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_is_exact_and_canonical(msg: Message) -> None:
    data = encode(msg)
    back = decode(data)
    assert type(back) is type(msg)
    assert encode(back) == data
    assert same_content(back, msg)
    assert not same_content(variant(msg), msg)


def test_every_kind_has_a_sample() -> None:
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES.values())


def _body(msg: Message) -> dict[str, object]:
    body = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(body, dict)
    return body


def _pack(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_missing_unknown_and_mistyped_fields_are_named(msg: Message) -> None:
    body = _body(msg)
    for name in [k for k in body if k not in ("v", "kind")]:
        b = dict(body)
        del b[name]
        with pytest.raises(MissingField, match=name):
            decode(_pack(b))
        b = dict(body)
        b[name] = 1.5
        with pytest.raises(WrongType, match=name):
            decode(_pack(b))
    with pytest.raises(UnknownField, match="surprise"):
        decode(_pack({**body, "surprise": 1}))


def test_versions_kinds_and_shapes() -> None:
    body = _body(MESSAGES[0])
    with pytest.raises(UnsupportedVersion):
        decode(_pack({**body, "v": 2}))
    with pytest.raises(InvalidField, match="kind"):
        decode(_pack({**body, "kind": 99}))
    with pytest.raises(MalformedMessage):
        decode(_pack([1, 2, 3]))
    contribution = _body(transcript().contributions["bank-a"])
    values = contribution["values"]
    assert isinstance(values, list)
    r, c, d = values
    with pytest.raises(InvalidField, match="values"):
        decode(_pack({**contribution, "values": [r, c + 1, d]}))


def test_invalid_values_are_refused_at_decode() -> None:
    body = _body(MESSAGES[0])  # RoundRequest
    with pytest.raises(InvalidField, match="requester"):
        decode(_pack({**body, "requester": "stranger"}))
    with pytest.raises(InvalidField, match="round_id"):
        decode(_pack({**body, "round_id": b"short"}))
    q = body["query"]
    assert isinstance(q, bytes)
    with pytest.raises(InvalidField, match="more than once"):
        decode(_pack({**body, "query": q + q[:16]}))


def test_oversized_and_deeply_nested() -> None:
    data = encode(MESSAGES[0])
    with pytest.raises(MessageTooLarge):
        decode(data, max_bytes=len(data) - 1)
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(CodecError):
        decode(deep)
    huge_list = _pack({"v": 1, "kind": 1, "participants": list(range(5000))})
    with pytest.raises(CodecError):
        decode(huge_list)


@settings(max_examples=3000, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_codec_errors(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode(data)


@settings(max_examples=3000, deadline=None)
@given(idx=st.integers(0, len(MESSAGES) - 1), pos=st.integers(0, 10**6),
       byte=st.integers(0, 255), cut=st.booleans())
def test_mutated_messages_raise_only_codec_errors(idx: int, pos: int, byte: int,
                                                  cut: bool) -> None:
    data = bytearray(encode(MESSAGES[idx]))
    pos %= len(data)
    if cut:
        del data[pos:]
    else:
        data[pos] = byte
    try:
        msg = decode(bytes(data))
    except CodecError:
        return
    assert isinstance(msg, Message)
    assert decode(encode(msg)) is not None


def test_matrices_decode_read_only() -> None:
    c = decode(encode(transcript().contributions["bank-a"]))
    assert isinstance(c, Contribution)
    values = c.values
    with pytest.raises(ValueError, match="read-only"):
        values[0, 0] = 1
