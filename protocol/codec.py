"""The one codec: messages <-> msgpack, with explicit limits and typed errors naming the field.

A body is a msgpack map: {"v": version, "kind": MessageKind, <field>: <value>, ...}. Matrices are
[rows, cols, raw little-endian uint64 bytes], token lists and vectors raw bytes. Unknown or
missing fields, wrong types, oversized input and over-deep nesting all raise a `CodecError`
subclass; nothing else escapes `decode`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from enum import Enum
from typing import Any

import msgpack
import numpy as np

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
from protocol.fixedpoint import AttributeSpec
from protocol.messages import (
    DIGEST_BYTES,
    MAX_ATTRIBUTES,
    MAX_CHUNKS,
    MAX_DETAIL,
    MAX_QUERY,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SIGNATURE_BYTES,
    FieldKind,
    MaskAssignment,
    Message,
    MessageKind,
)
from protocol.tokens import TOKEN_BYTES, TOKEN_DTYPE, Tokens, tokens_to_bytes

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_STR = 64 * 1024
MAX_LIST = 4096
MAX_MAP = 64
MAX_TUPLE = 256  # participants, attributes, culprits


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    kind: FieldKind | type
    many: bool = False  # tuple[kind, ...]
    # a field with a default is left out of the bytes while it has that value (so messages
    # from before the field existed read as they were written, and encode to the same bytes)
    optional: bool = False
    default: Any = None


_FIELDS: dict[MessageKind, tuple[_Field, ...]] = {}


def _fields(cls: type[Message]) -> tuple[_Field, ...]:
    cached = _FIELDS.get(cls.KIND)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        meta = getattr(hint, "__metadata__", ())
        if meta and isinstance(meta[0], FieldKind):
            field = _Field(f.name, meta[0])
        elif typing.get_origin(hint) is tuple:
            field = _Field(f.name, typing.get_args(hint)[0], many=True)
        else:
            field = _Field(f.name, hint)
        if f.default is not dataclasses.MISSING:
            field = dataclasses.replace(field, optional=True, default=f.default)
        out.append(field)
    _FIELDS[cls.KIND] = tuple(out)
    return _FIELDS[cls.KIND]


def _encode_value(kind: FieldKind | type, value: Any) -> Any:
    if kind is FieldKind.MATRIX:
        m = np.ascontiguousarray(value, dtype="<u8")
        return [int(m.shape[0]), int(m.shape[1]), m.tobytes()]
    if kind in (FieldKind.TOKENS, FieldKind.VECTOR):
        dtype = TOKEN_DTYPE if kind is FieldKind.TOKENS else np.dtype("<u8")
        return np.ascontiguousarray(value, dtype=dtype).tobytes()
    if kind is AttributeSpec:
        return [[a.name, a.scale, a.min, a.max] for a in value]
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Enum):
        return value.value
    return value


def encode(msg: Message) -> bytes:
    """Canonical bytes of a message: equal content gives equal bytes."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": int(msg.KIND)}
    for f in _fields(type(msg)):
        kind = f.kind
        value = getattr(msg, f.name)
        if f.optional and type(value) is type(f.default) and value == f.default:
            continue
        body[f.name] = _encode_value(kind, value)
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def same_content(a: Message, b: Message) -> bool:
    return type(a) is type(b) and encode(a) == encode(b)


def _need(value: Any, typ: type | tuple[type, ...], path: str, what: str) -> None:
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise WrongType(f"expected {what}, got {type(value).__name__}", path=path)


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType(f"expected an integer, got {type(value).__name__}", path=path)
    return value


def _decode_value(kind: FieldKind | type, value: Any, path: str, max_bytes: int) -> Any:
    if kind is FieldKind.MATRIX:
        _need(value, list, path, "[rows, cols, bytes]")
        if len(value) != 3:
            raise WrongType("expected [rows, cols, bytes]", path=path)
        rows, cols = _int(value[0], path + ".rows"), _int(value[1], path + ".cols")
        _need(value[2], bytes, path + ".data", "bytes")
        # every dimension is bounded before anything is computed from it
        if not 0 <= rows <= MAX_QUERY:
            raise InvalidField(f"{rows} rows is not in 0..{MAX_QUERY}", path=path + ".rows")
        if not 0 <= cols <= MAX_ATTRIBUTES + 1:
            raise InvalidField(f"{cols} columns is not in 0..{MAX_ATTRIBUTES + 1}",
                               path=path + ".cols")
        if rows * cols * 8 != len(value[2]):
            raise InvalidField(f"{len(value[2])} bytes do not hold {rows} x {cols} uint64",
                               path=path)
        return np.frombuffer(value[2], dtype="<u8").astype(np.uint64, copy=False).reshape(
            rows, cols)
    if kind is FieldKind.TOKENS:
        _need(value, bytes, path, "bytes")
        if len(value) % TOKEN_BYTES:
            raise InvalidField(f"{len(value)} bytes is not a whole number of tokens", path=path)
        return np.frombuffer(value, dtype=TOKEN_DTYPE)
    if kind is FieldKind.VECTOR:
        _need(value, bytes, path, "bytes")
        if len(value) % 8:
            raise InvalidField(f"{len(value)} bytes is not a whole number of uint64", path=path)
        return np.frombuffer(value, dtype="<u8").astype(np.uint64, copy=False)
    if kind is FieldKind.DIGEST_LIST:
        _need(value, bytes, path, "bytes")
        if len(value) % DIGEST_BYTES or len(value) > DIGEST_BYTES * MAX_CHUNKS:
            raise InvalidField(f"{len(value)} bytes is not a list of at most {MAX_CHUNKS} "
                               "digests", path=path)
        return value
    if kind in (FieldKind.DIGEST, FieldKind.SIGNATURE):
        _need(value, bytes, path, "bytes")
        size = DIGEST_BYTES if kind is FieldKind.DIGEST else SIGNATURE_BYTES
        if len(value) != size:
            raise InvalidField(f"{len(value)} bytes, expected {size}", path=path)
        return value
    if kind in (FieldKind.ROUND_ID, FieldKind.SEED, FieldKind.BITMAP, bytes):
        _need(value, bytes, path, "bytes")
        return value
    if kind is AttributeSpec:
        _need(value, list, path, "a list of [name, scale, min, max]")
        if len(value) > MAX_ATTRIBUTES:
            raise InvalidField(f"at most {MAX_ATTRIBUTES} attributes", path=path)
        specs = []
        for i, item in enumerate(value):
            p = f"{path}[{i}]"
            _need(item, list, p, "[name, scale, min, max]")
            if len(item) != 4:
                raise WrongType("expected [name, scale, min, max]", path=p)
            _need(item[0], str, p + ".name", "a string")
            try:
                specs.append(AttributeSpec(item[0], _int(item[1], p + ".scale"),
                                           _int(item[2], p + ".min"), _int(item[3], p + ".max")))
            except ValueError as exc:
                raise InvalidField(str(exc), path=p) from exc
        return tuple(specs)
    if kind is str:
        _need(value, str, path, "a string")
        return value
    if kind is int:
        return _int(value, path)
    if kind is bool:
        _need(value, bool, path, "true or false")
        return value
    if isinstance(kind, type) and issubclass(kind, Enum):
        if issubclass(kind, str):
            _need(value, str, path, "a string")
        else:
            _int(value, path)
        try:
            return kind(value)
        except ValueError as exc:
            raise InvalidField(f"{value!r} is not a valid {kind.__name__}", path=path) from exc
    raise AssertionError(f"codec has no rule for {kind!r}")  # a bug in messages.py


def _decode_tuple_of_str(value: Any, path: str) -> tuple[str, ...]:
    _need(value, list, path, "a list of strings")
    if len(value) > MAX_TUPLE:
        raise InvalidField(f"at most {MAX_TUPLE} items", path=path)
    for i, item in enumerate(value):
        _need(item, str, f"{path}[{i}]", "a string")
    return tuple(value)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Bytes -> a validated Message, or a CodecError subclass naming what is wrong."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WrongType(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_STR, max_bin_len=max_bytes, max_array_len=MAX_LIST,
            max_map_len=MAX_MAP, max_ext_len=0)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises many types; all mean "not our format"
        raise MalformedMessage(f"not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedMessage(f"a message is a map, got {type(body).__name__}")
    if "v" not in body:
        raise MissingField("missing", path="v")
    version = body.pop("v")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version!r}; this build speaks "
                                 f"{PROTOCOL_VERSION}", path="v")
    if "kind" not in body:
        raise MissingField("missing", path="kind")
    raw_kind = body.pop("kind")
    try:
        kind = MessageKind(_int(raw_kind, "kind"))
    except ValueError as exc:
        raise InvalidField(f"unknown message kind {raw_kind!r}", path="kind") from exc
    cls = MESSAGE_TYPES[kind]
    fields = _fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(body) - names)
    if unknown:
        raise UnknownField("not a field of " + cls.__name__, path=unknown[0])
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in body:
            if f.optional:
                continue
            raise MissingField(f"missing from {cls.__name__}", path=f.name)
        raw = body[f.name]
        try:
            if f.many and f.kind is str:
                kwargs[f.name] = _decode_tuple_of_str(raw, f.name)
            else:
                kwargs[f.name] = _decode_value(f.kind, raw, f.name, max_bytes)
        except CodecError:
            raise
        except Exception as exc:  # last resort: whatever a hostile value breaks is typed
            raise InvalidField(f"{type(exc).__name__}: {exc}", path=f.name) from exc
    try:
        return cls(**kwargs)
    except Exception as exc:  # ValueError by design; anything else is still the sender's fault
        raise InvalidField(str(exc)[:MAX_DETAIL], path=cls.__name__) from exc


def digest_of(label: str, *parts: bytes) -> bytes:
    """SHA-256 over a label and length-prefixed parts: distinct inputs never collide."""
    h = hashlib.sha256(b"zerosum-v1 " + label.encode() + b"\x00")
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.digest()


def query_chunk_digests(query: Tokens, chunk_rows: int) -> bytes:
    """The digest of each chunk of `chunk_rows` tokens of the query, one after the other
    (an empty query is one empty chunk)."""
    starts = range(0, max(query.size, 1), chunk_rows)
    return b"".join(digest_of("query", tokens_to_bytes(query[s:s + chunk_rows]))
                    for s in starts)


def query_digest(chunk_digests: bytes) -> bytes:
    """The digest of the whole query: of the list of its chunks' digests."""
    return digest_of("query chunks", chunk_digests)


def rows_digest(salt: bytes, tokens: Tokens) -> bytes:
    """H(salt || I): binds a round's rows without telling the coordinator which they are."""
    return digest_of("rows", salt, tokens_to_bytes(tokens))


def assignment_digest(a: MaskAssignment) -> bytes:
    """The digest of everything in an assignment but the mask and the attestation: the same
    for every participant of the round, and different for any two rounds that differ at all."""
    core = dataclasses.replace(a, mask=np.zeros_like(a.mask), attestation=bytes(SIGNATURE_BYTES))
    return digest_of("assignment", encode(core))


def attestation_statement(round_id: bytes, assignment: bytes) -> bytes:
    """What the coordinator signs: this is the round's assignment."""
    return digest_of("attestation", round_id, assignment)


def endorsement_statement(round_id: bytes, assignment: bytes, rows_digest: bytes, *,
                          rows: int, chunk: int = 0, last: bool = True) -> bytes:
    """What the leader signs: chunk `chunk` of the round's rows has `rows` rows with this
    salted digest, and is (or is not) the last. The coordinator checks every contribution
    chunk against it, so a contribution over other rows, or a leader that endorsed two
    versions of one chunk, is caught and named."""
    return digest_of("endorsement", round_id, assignment, rows_digest,
                     chunk.to_bytes(8, "big"), rows.to_bytes(8, "big"), bytes([last]))
