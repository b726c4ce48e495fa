"""The local API's frames, shared by the agent's server and `zerosum.Client`.

A frame is one JSON object on one line (newline-delimited JSON, UTF-8). JSON rather than
length-prefixed msgpack: the payloads are customer ids and decimal strings, not binary; a
client in any language (or `socat` and a person) can speak it with its standard library; and
JSON escapes every newline inside a string, so the newline alone delimits frames and a reader
can skip a bad or oversized frame to the next newline and carry on, in sync. Decimals travel as
strings, never as JSON numbers, so no client parses a total into a binary float.

Every frame carries `"v": VERSION`. A request carries `op` and an `id` chosen by the client;
every answer to it echoes that `id`.
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from typing import Any

VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024  # a request; the policy's max_query is the finer limit
CLIENT_MAX_FRAME_BYTES = 1024 * 1024 * 1024  # a result of a large round
_CHUNK = 256 * 1024


class Op(StrEnum):
    """What a client asks for."""

    HELLO = "hello"  # the token, first on a TCP connection
    ROUND = "round"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    STATUS = "status"


class FrameType(StrEnum):
    """What the server sends."""

    WELCOME = "welcome"  # answer to hello
    ACCEPTED = "accepted"  # a round request is queued; carries its round id
    RESULT = "result"  # the round's end (published or aborted), to the connection that asked
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    DELIVERY = "delivery"  # a round this institution took part in, to every subscriber
    LAGGED = "lagged"  # the subscriber fell too far behind: its subscription has ended
    STATUS = "status"
    ERROR = "error"


class ErrorCode(StrEnum):
    """Why the server refused a frame. `field` names the request field when there is one."""

    MALFORMED_FRAME = "malformed_frame"  # not a JSON object
    UNKNOWN_VERSION = "unknown_version"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_OP = "unknown_op"
    INVALID_FIELD = "invalid_field"  # missing, or of the wrong type or range
    QUERY_TOO_LARGE = "query_too_large"  # more customers than the policy's max_query
    BELOW_FLOOR = "below_floor"  # min_holders or participants below the consortium's floors
    UNKNOWN_ATTRIBUTE = "unknown_attribute"
    UNKNOWN_PARTICIPANT = "unknown_participant"
    UNAUTHORIZED = "unauthorized"  # TCP: no hello, or a wrong token; the connection closes
    SERVICE_FAILED = "service_failed"  # the agent could not run the request


class Role(StrEnum):
    """What this institution was in a round it took part in."""

    REQUESTER = "requester"
    LEADER = "leader"
    CONTRIBUTOR = "contributor"


ROLE_ORDER = (Role.REQUESTER, Role.LEADER, Role.CONTRIBUTOR)


class FrameTooLarge(Exception):
    """A frame longer than the limit; the reader skipped it up to its newline."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a frame of at least {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


def encode_json(value: Any) -> bytes:
    """Compact JSON, ASCII only: a lone surrogate in a string (valid JSON, not UTF-8) still
    encodes, and no byte of it is a newline."""
    return json.dumps(value, separators=(",", ":")).encode()


def encode_frame(frame: dict[str, Any], **encoded: bytes) -> bytes:
    """One frame as a line, with the version. `encoded` fields are JSON already
    (`encode_json`): a large body made once for many frames."""
    head = encode_json({"v": VERSION, **frame})
    tail = b"".join(b',"' + name.encode() + b'":' + value for name, value in encoded.items())
    return head[:-1] + tail + b"}\n"


def version_of(frame: dict[str, Any]) -> int | None:
    """The frame's version: an integer (JSON's true is not 1), or None."""
    v = frame.get("v")
    return v if type(v) is int else None


def decode_frame(line: bytes) -> dict[str, Any]:
    """A line as a JSON object; ValueError if it is not one (the version is checked by the
    caller, who answers with the frame's id)."""
    try:
        frame = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(frame, dict):
        raise ValueError(f"a frame is a JSON object, not {type(frame).__name__}")
    return frame


class FrameReader:
    """Lines of a stream, at most `limit` bytes each, without waiting for more than one.

    `asyncio.StreamReader.readline` cannot skip an oversized line and stay in sync; this
    reader drops it up to its newline, in bounded memory, and then raises `FrameTooLarge`,
    so the next frame reads cleanly."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._skipped = 0  # > 0 while dropping an oversized frame

    async def next(self) -> bytes | None:
        """The next frame without its newline; None at the end of the stream."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                self._scanned = 0
                if self._skipped or len(line) > self.limit:
                    size, self._skipped = self._skipped + len(line), 0
                    raise FrameTooLarge(size, self.limit)
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > self.limit:
                self._skipped += len(self._buf)
                self._buf.clear()
                self._scanned = 0
            chunk = await self._reader.read(_CHUNK)
            if not chunk:
                return None
            self._buf += chunk
