"""Configuration: the consortium file shared by all, one TOML per party, private key files.

Errors name the file and the field (`ConfigError`). Relative paths in a party file are relative
to that file's directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from agents.security import (
    KafkaAccess,
    SecurityError,
    check_private,
    load_access,
    read_credentials,
)
from protocol.envelope import (
    MAX_EPOCH,
    KemKind,
    PrivateParty,
    PublicParty,
    private_party,
    public_party,
)
from protocol.fixedpoint import AttributeSpec, parse_decimal
from protocol.messages import (
    DEFAULT_CHUNK_ROWS,
    MAX_CHUNK_ROWS,
    MAX_CHUNKS,
    MAX_QUERY,
    MaskMode,
    check_party,
    chunk_count,
)
from protocol.policy import (
    DEFAULT_DIFFERENCE_WINDOW,
    DEFAULT_EXPIRE_AFTER,
    DEFAULT_MAX_QUERY,
    ConsortiumPolicy,
)
from protocol.tokens import CONSORTIUM_KEY_BYTES

# `[policy] expire_after` at most: a message a hostile member holds outside any round (a share for
# a round that never opens, one part of a chunked message) keeps a party from a checkpoint for
# this many inbox positions
MAX_EXPIRE_AFTER = 1_000_000
KEM_NAMES = {"x25519": KemKind.X25519, "mlkem768-x25519": KemKind.MLKEM768_X25519}
"""The `kem` names of the config files and of `zerosum init --kem`."""
KEM_NAME_OF = {kind: name for name, kind in KEM_NAMES.items()}


class ConfigError(Exception):
    """A configuration or key file is missing, unreadable, or has a bad field."""


def topic_for(consortium: str, party: str) -> str:
    return f"zerosum.{consortium}.{party}"


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc


def _get(table: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing field {key!r}")
    value = table[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: field {key!r} must be {typ.__name__}, "
                          f"got {type(value).__name__}")
    return value


def _kem(table: dict[str, Any], where: str) -> KemKind:
    """The KEM named by the table's `kem` field (one of KEM_NAMES)."""
    name = _get(table, "kem", str, where)
    if name not in KEM_NAMES:
        raise ConfigError(f"{where}: kem must be one of {sorted(KEM_NAMES)}")
    return KEM_NAMES[name]


def _hex(table: dict[str, Any], key: str, where: str, size: int | None = None) -> bytes:
    raw = _get(table, key, str, where)
    try:
        data = bytes.fromhex(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: field {key!r} is not hex") from exc
    if size is not None and len(data) != size:
        raise ConfigError(f"{where}: field {key!r} must be {size} bytes, got {len(data)}")
    return data


def _table(table: Any, where: str, known: Iterable[str]) -> dict[str, Any]:
    """`table` as a TOML table of `known` fields only; ConfigError naming the first other."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    known = tuple(known)
    if unknown := sorted(set(table) - set(known)):
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: "
                          f"{', '.join(known)})")
    return table


@dataclass(frozen=True)
class Policy:
    """[policy] of consortium.toml: the consortium's floors (a request may only raise them)."""

    min_participants: int  # 0: every institution
    deadline_s: float
    min_holders: int
    allow_subsets: bool = False
    max_query: int = DEFAULT_MAX_QUERY
    difference_window: int = DEFAULT_DIFFERENCE_WINDOW
    masks: str = "dealt"
    max_in_flight: int = 32  # rounds one institution's API runs at once; the rest queue
    # the longest a round may run at a party, whatever deadline its request asked for
    max_deadline_s: float = 86_400.0
    # inbox positions after which a message held outside any round is dropped
    expire_after: int = DEFAULT_EXPIRE_AFTER
    chunk_rows: int = DEFAULT_CHUNK_ROWS  # rows of each chunk of a round's query and sums


@dataclass(frozen=True)
class Consortium:
    path: Path
    id: str
    bootstrap: str
    coordinator: str
    policy: Policy
    attributes: dict[str, AttributeSpec]
    registry: dict[str, PublicParty]
    # (party, past key epoch) -> when its grace ends (POSIX seconds, from `grace_until`): an
    # agent whose clock passes it records the epoch retired (`agents.retired`)
    grace_until: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def institutions(self) -> tuple[str, ...]:
        return tuple(p for p in self.registry if p != self.coordinator)

    def round_policy(self) -> ConsortiumPolicy:
        """The policy every party enforces, the coordinator and each institution alike."""
        p = self.policy
        return ConsortiumPolicy(frozenset(self.institutions), self.attributes,
                                min_participants=p.min_participants, min_holders=p.min_holders,
                                allow_subsets=p.allow_subsets, max_query=p.max_query,
                                difference_window=p.difference_window,
                                masks=MaskMode(p.masks), expire_after=p.expire_after,
                                chunk_rows=p.chunk_rows)


MIN_CHUNK_ROWS = 1024  # the least `[policy] chunk_rows` a consortium.toml may set
_POLICY_FIELDS: dict[str, tuple[type, Any, Any]] = {
    # field: (type, default, smallest allowed)
    "min_participants": (int, 0, 0),
    "deadline_s": (float, 60.0, 1),
    "min_holders": (int, 1, 1),
    "allow_subsets": (bool, False, 0),
    "max_query": (int, DEFAULT_MAX_QUERY, 1),
    "difference_window": (int, DEFAULT_DIFFERENCE_WINDOW, 0),
    "masks": (str, "dealt", None),
    "max_in_flight": (int, 32, 1),
    "max_deadline_s": (float, 86_400.0, 1),
    "expire_after": (int, DEFAULT_EXPIRE_AFTER, 1),
    # a floor: chunks of a few rows would tell when single rows of I were shared
    "chunk_rows": (int, DEFAULT_CHUNK_ROWS, MIN_CHUNK_ROWS),
}


def _policy(pol: Any, where: str) -> Policy:
    pol = _table(pol, where, _POLICY_FIELDS)
    values: dict[str, Any] = {}
    for key, (typ, default, least) in _POLICY_FIELDS.items():
        value: Any = pol.get(key, default)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: field {key!r} must be {typ.__name__}, "
                              f"got {type(value).__name__}")
        if least is not None and typ is not bool and value < least:
            raise ConfigError(f"{where}: field {key!r} must be at least {least}")
        values[key] = value
    if values["masks"] not in {m.value for m in MaskMode}:
        raise ConfigError(f"{where}: field 'masks' must be one of "
                          f"{', '.join(repr(m.value) for m in MaskMode)}")
    if values["max_deadline_s"] < values["deadline_s"]:
        raise ConfigError(f"{where}: field 'max_deadline_s' must be at least 'deadline_s'")
    if values["max_query"] > MAX_QUERY:
        raise ConfigError(f"{where}: field 'max_query' must be at most {MAX_QUERY}")
    if values["expire_after"] > MAX_EXPIRE_AFTER:
        raise ConfigError(f"{where}: field 'expire_after' must be at most {MAX_EXPIRE_AFTER}")
    if values["chunk_rows"] > MAX_CHUNK_ROWS or chunk_count(
            values["max_query"], values["chunk_rows"]) > MAX_CHUNKS:
        raise ConfigError(f"{where}: field 'chunk_rows' must be at most {MAX_CHUNK_ROWS}, and "
                          f"max_query / chunk_rows at most {MAX_CHUNKS} chunks")
    return Policy(**values)


_ENTRY_FIELDS = ("kem", "signing_key", "kem_key", "epoch")


def _epoch(table: dict[str, Any], where: str) -> int:
    epoch: int = _get(table, "epoch", int, where) if "epoch" in table else 0
    if not 0 <= epoch <= MAX_EPOCH:
        raise ConfigError(f"{where}: field 'epoch' must be in 0..{MAX_EPOCH}")
    return epoch


def _party_entry(p: Any, where: str, name: str, topic: str
                 ) -> tuple[PublicParty, dict[int, float]]:
    """A [parties.<name>] entry: the current keys (`epoch`, 0 when absent) and, in
    [[parties.<name>.earlier]], the public keys of every past epoch (`retired = true`: no
    longer accepted by a receiver; still what the audit verifies old envelopes with;
    `grace_until`, a date-time with its UTC offset: retired from then on), with the grace
    ends by epoch."""
    p = _table(p, where, (*_ENTRY_FIELDS, "earlier"))
    earlier: list[PublicParty] = []
    retired: set[int] = set()
    grace: dict[int, float] = {}
    for i, e in enumerate(_get(p, "earlier", list, where) if "earlier" in p else []):
        ewhere = f"{where} earlier #{i + 1}"
        e = _table(e, ewhere, (*_ENTRY_FIELDS, "retired", "grace_until"))
        if "epoch" not in e:
            raise ConfigError(f"{ewhere}: missing field 'epoch'")
        earlier.append(_public(e, ewhere, name, topic))
        if e.get("retired", False) is True:
            retired.add(earlier[-1].epoch)
        if "grace_until" in e:
            until = e["grace_until"]
            if not isinstance(until, datetime) or until.tzinfo is None:
                raise ConfigError(f"{ewhere}: field 'grace_until' must be a date-time with "
                                  "its UTC offset (1979-05-27T07:32:00Z)")
            grace[earlier[-1].epoch] = until.timestamp()
    current = _public(p, where, name, topic)
    epochs = [current.epoch, *(e.epoch for e in earlier)]
    if len(set(epochs)) != len(epochs) or any(e >= current.epoch for e in epochs[1:]):
        raise ConfigError(f"{where}: every earlier epoch must be distinct and below the "
                          f"current epoch {current.epoch}")
    return replace(current, earlier=tuple(earlier), retired=frozenset(retired)), grace


def _public(p: dict[str, Any], where: str, name: str, topic: str) -> PublicParty:
    kem = _kem(p, where)
    try:
        return public_party(name, signing_key=_hex(p, "signing_key", where, 32), kem=kem,
                            kem_key=_hex(p, "kem_key", where), topic=topic,
                            epoch=_epoch(p, where))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_consortium(path: Path) -> Consortium:
    raw = _load(path)
    w = str(path)
    head = _get(raw, "consortium", dict, w)
    cid = _get(head, "id", str, f"{w} [consortium]")
    try:
        check_party(cid, "consortium id")
    except ValueError as exc:
        raise ConfigError(f"{w} [consortium]: {exc}") from exc
    policy = _policy(raw.get("policy", {}), f"{w} [policy]")
    attributes: dict[str, AttributeSpec] = {}
    for i, a in enumerate(_get(raw, "attributes", list, w)):
        where = f"{w} [[attributes]] #{i + 1}"
        name = _get(a, "name", str, where)
        scale = _get(a, "scale", int, where)
        try:
            spec = AttributeSpec(name, scale, parse_decimal(str(_get(a, "min", str, where)), scale),
                                 parse_decimal(str(_get(a, "max", str, where)), scale))
        except (ValueError, ArithmeticError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        attributes[name] = spec
    registry: dict[str, PublicParty] = {}
    grace: dict[tuple[str, int], float] = {}
    for name, p in _get(raw, "parties", dict, w).items():
        where = f"{w} [parties.{name}]"
        try:
            check_party(name)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        registry[name], until = _party_entry(p, where, name, topic_for(cid, name))
        grace.update({(name, e): t for e, t in until.items()})
    coordinator = _get(head, "coordinator", str, f"{w} [consortium]")
    if coordinator not in registry:
        raise ConfigError(f"{w}: coordinator {coordinator!r} has no [parties] entry")
    return Consortium(path, cid, _get(head, "bootstrap", str, f"{w} [consortium]"), coordinator,
                      policy, attributes, registry, grace)


MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with its NUL
API_SOCKET_NAME = "api.sock"


@dataclass(frozen=True)
class ApiConfig:
    """[api] of a party's TOML: the local API's Unix socket (default
    `<state_dir>/api.sock`, mode 600) and, optionally, a TCP port on 127.0.0.1 that asks
    for the token in `token_file` (mode 600)."""

    socket: Path | None = None  # None: <state_dir>/api.sock
    tcp_port: int | None = None
    token: str | None = field(default=None, repr=False)


_API_FIELDS = ("socket", "tcp_port", "token_file")


def _api(table: Any, where: str, base: Path) -> ApiConfig:
    table = _table(table, where, _API_FIELDS)
    socket = None
    if "socket" in table:
        socket = (base / _get(table, "socket", str, where)).resolve()
        if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
            raise ConfigError(f"{where}: field 'socket' ({socket}) is longer than the "
                              f"{MAX_SOCKET_PATH} bytes a Unix socket path may have")
    port = token = None
    if "tcp_port" in table:
        port = _get(table, "tcp_port", int, where)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{where}: field 'tcp_port' must be 0..65535")
        if "token_file" not in table:
            raise ConfigError(f"{where}: field 'tcp_port' needs field 'token_file' (the "
                              "token a TCP client must present)")
    if "token_file" in table:
        tpath = (base / _get(table, "token_file", str, where)).resolve()
        _check_private_file(tpath)
        try:
            token = tpath.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: field 'token_file': cannot read {tpath}: "
                              f"{exc}") from exc
        if len(token) < 16:
            raise ConfigError(f"{where}: field 'token_file': {tpath} holds fewer than 16 "
                              "characters")
    return ApiConfig(socket, port, token)


@dataclass(frozen=True)
class AppConfig:
    """[app] of an institution's TOML: the application bus on the institution's own Kafka
    (never the consortium's): round requests from `requests_topic`, every delivery to
    `results_topic`. `kafka` is built as the consortium's access is (`security` PLAINTEXT,
    SASL_SSL with a SCRAM `credentials` file, or SSL with `certificate` and `key`; `ca`)."""

    kafka: KafkaAccess
    requests_topic: str
    results_topic: str
    group: str  # the consumer group that holds the requests' committed offsets
    max_pending: int = 256  # requests taken from the topic and not yet ended
    results_queue: int = 1024  # deliveries waiting for the results topic; more are dropped


_APP_FIELDS: dict[str, tuple[type, Any]] = {
    # field: (type, default; None: required or absent)
    "bootstrap": (str, None),
    "requests_topic": (str, None),
    "results_topic": (str, None),
    "group": (str, None),
    "security": (str, "PLAINTEXT"),
    "ca": (str, None),
    "credentials": (str, None),
    "certificate": (str, None),
    "key": (str, None),
    "max_pending": (int, 256),
    "results_queue": (int, 1024),
}
_APP_SECURITY = ("PLAINTEXT", "SASL_SSL", "SSL")


def _app(table: Any, where: str, base: Path, party: str) -> AppConfig:
    table = _table(table, where, _APP_FIELDS)
    v: dict[str, Any] = {}
    for key, (typ, default) in _APP_FIELDS.items():
        v[key] = _get(table, key, typ, where) if key in table else default
        if isinstance(v[key], str) and not v[key].strip():
            raise ConfigError(f"{where}: field {key!r} is empty")
    for key in ("bootstrap", "requests_topic", "results_topic"):
        if v[key] is None:
            raise ConfigError(f"{where}: missing field {key!r}")
    if v["requests_topic"] == v["results_topic"]:
        raise ConfigError(f"{where}: field 'results_topic' must differ from 'requests_topic'")
    for key in ("max_pending", "results_queue"):
        if v[key] < 1:
            raise ConfigError(f"{where}: field {key!r} must be at least 1")
    security = v["security"]
    if security not in _APP_SECURITY:
        raise ConfigError(f"{where}: field 'security' must be one of "
                          f"{', '.join(_APP_SECURITY)}")

    def path(key: str) -> Path | None:
        return None if v[key] is None else (base / v[key]).resolve()

    def needed(key: str) -> Path:
        found = path(key)
        if found is None:
            raise ConfigError(f"{where}: field {key!r} is missing: security {security!r} "
                              "needs it")
        return found

    try:
        if security == "PLAINTEXT":
            for key in ("ca", "credentials", "certificate", "key"):
                if v[key] is not None:
                    raise ConfigError(f"{where}: field {key!r} needs security SASL_SSL or SSL")
            access = KafkaAccess(v["bootstrap"])
        elif security == "SSL":
            certfile, keyfile = needed("certificate"), needed("key")
            check_private(keyfile, "a TLS key file")
            access = KafkaAccess(v["bootstrap"], cafile=path("ca"), certfile=certfile,
                                 keyfile=keyfile)
        else:
            user, password = read_credentials(needed("credentials"))
            access = KafkaAccess(v["bootstrap"], user, password, path("ca"))
    except SecurityError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return AppConfig(access, v["requests_topic"], v["results_topic"],
                     v["group"] or f"zerosum-app.{party}", v["max_pending"], v["results_queue"])


@dataclass(frozen=True)
class PartyConfig:
    path: Path
    party: str
    consortium: Consortium
    keys: PrivateParty
    state_dir: Path
    bootstrap: str
    log_format: str
    consortium_key: bytes | None = field(repr=False)  # institutions only
    data: Path | None  # institutions only
    kafka: KafkaAccess  # bootstrap and, in secure mode, the party's SCRAM credential
    api: ApiConfig = ApiConfig()
    app: AppConfig | None = None  # institutions only: [app], the application bus
    metrics_port: int | None = None  # /metrics on 127.0.0.1 (0: a free port); None: off
    private_key: Path | None = None  # the key file (past epochs: `archived_key` beside it)
    consortium_key_path: Path | None = None  # institutions only
    token_epoch: int = 0  # of `consortium_key`
    # the token keys of past epochs still held (rounds asked before a rotation), by epoch
    earlier_token_keys: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def api_socket(self) -> Path:
        """The local API's Unix socket: [api] socket, or <state_dir>/api.sock."""
        return self.api.socket or self.state_dir / API_SOCKET_NAME

    @property
    def is_coordinator(self) -> bool:
        return self.party == self.consortium.coordinator

    @property
    def topic(self) -> str:
        return topic_for(self.consortium.id, self.party)


def _check_private_file(path: Path) -> None:
    try:
        check_private(path, "a key file")
    except SecurityError as exc:
        raise ConfigError(str(exc)) from exc


def archived_key(path: Path, epoch: int) -> Path:
    """Where `zerosum keys rotate` keeps the KEM private key of a past `epoch` of the key file
    `path` (`bank-1.key` -> `bank-1.epoch-0.key`), mode 600; never its signing seed."""
    return path.with_name(f"{path.stem}.epoch-{epoch}{path.suffix}")


def pending_key(path: Path) -> Path:
    """Where `zerosum keys rotate` writes the next epoch's keys before it lists them in the
    consortium file, and from where it then replaces `path` (`bank-1.key.next`)."""
    return path.with_name(f"{path.name}.next")


def _archived_epochs(path: Path) -> list[int]:
    found = []
    for p in path.parent.glob(f"{path.stem}.epoch-*{path.suffix}"):
        tail = p.name[len(path.stem) + len(".epoch-"):len(p.name) - len(path.suffix)]
        if tail.isdigit():
            found.append(int(tail))
    return sorted(found)


def _private_file(path: Path) -> tuple[dict[str, Any], int]:
    _check_private_file(path)
    raw = _load(path)
    return raw, _epoch(raw, str(path))


def load_private_key(path: Path, party: str, epoch: int | None = None) -> PrivateParty:
    """The private keys of `party` in the key file `path` (of the `epoch` the consortium file
    names: the file itself, or an archived one beside it), with the KEM keys of every past
    epoch archived beside it (what was sealed to them can still be opened)."""
    main = path
    raw, found = _private_file(path)
    if epoch is not None and epoch != found:
        # a rotation between its steps: the consortium file lists the new keys already, the
        # key file is replaced last (`agents.keys`)
        if not pending_key(main).exists():
            raise ConfigError(f"{main}: holds key epoch {found}, the consortium file lists "
                              f"{party} at epoch {epoch} (an interrupted `zerosum keys "
                              "rotate`: run it again; or a consortium file not yet updated)")
        path = pending_key(main)
        raw, found = _private_file(path)
        if found != epoch:
            raise ConfigError(f"{path}: holds key epoch {found}, not {epoch}")
    w = str(path)
    earlier = []
    for e in _archived_epochs(main):
        if e < found:
            old, _ = _private_file(archived_key(main, e))
            where = str(archived_key(main, e))
            earlier.append((e, _kem(old, where), _hex(old, "kem_private", where)))
    try:
        return private_party(party, signing_seed=_hex(raw, "signing_seed", w, 32),
                             kem=_kem(raw, w), kem_private=_hex(raw, "kem_private", w),
                             secret=_hex(raw, "secret", w, 32), epoch=found,
                             earlier_kem=tuple(earlier))
    except ValueError as exc:
        raise ConfigError(f"{w}: {exc}") from exc


def load_token_keys(path: Path) -> tuple[int, bytes, dict[int, bytes]]:
    """The consortium (token) key file: its current epoch and key, and the keys of the past
    epochs it still holds ([[earlier]] tables of epoch and key)."""
    _check_private_file(path)
    raw = _load(path)
    w = str(path)
    raw = _table(raw, w, ("key", "epoch", "earlier"))
    epoch = _epoch(raw, w)
    earlier: dict[int, bytes] = {}
    for i, e in enumerate(_get(raw, "earlier", list, w) if "earlier" in raw else []):
        where = f"{w} earlier #{i + 1}"
        e = _table(e, where, ("key", "epoch"))
        if "epoch" not in e:
            raise ConfigError(f"{where}: missing field 'epoch'")
        earlier[_epoch(e, where)] = _hex(e, "key", where, CONSORTIUM_KEY_BYTES)
    if epoch in earlier:
        raise ConfigError(f"{w}: epoch {epoch} is both current and earlier")
    return epoch, _hex(raw, "key", w, CONSORTIUM_KEY_BYTES), earlier


def with_keys(cfg: PartyConfig, consortium: Consortium) -> PartyConfig:
    """`cfg` under `consortium`, with the party's private keys of the epoch `consortium`
    lists for it and the token keys as their file says now. ConfigError if `consortium` no
    longer lists the party, or its private keys of that epoch are not there or do not match."""
    entry = consortium.registry.get(cfg.party)
    if entry is None:
        raise ConfigError(f"{consortium.path} no longer lists {cfg.party}")
    keys = cfg.keys
    if cfg.private_key is not None:
        keys = load_private_key(cfg.private_key, cfg.party, entry.epoch)
    if keys.epoch != entry.epoch or \
            keys.signing_key.public_key() != entry.signing_key:
        raise ConfigError(f"{cfg.private_key}: the private key of {cfg.party} does not match "
                          f"its public key (epoch {entry.epoch}) in {consortium.path}")
    cfg = replace(cfg, consortium=consortium, keys=keys)
    if cfg.consortium_key_path is not None:
        epoch, key, earlier = load_token_keys(cfg.consortium_key_path)
        cfg = replace(cfg, consortium_key=key, token_epoch=epoch, earlier_token_keys=earlier)
    return cfg


def load_party(path: Path) -> PartyConfig:
    raw = _load(path)
    w = str(path)
    base = path.parent

    def rel(key: str) -> Path:
        value: str = _get(raw, key, str, w)
        return (base / value).resolve()

    party = _get(raw, "party", str, w)
    consortium = load_consortium(rel("consortium"))
    if party not in consortium.registry:
        raise ConfigError(f"{w}: party {party!r} is not in {consortium.path}")
    private = rel("private_key")
    keys = load_private_key(private, party, consortium.registry[party].epoch)
    if keys.signing_key.public_key() != consortium.registry[party].signing_key:
        raise ConfigError(f"{w}: private_key does not match {party}'s public key in "
                          f"{consortium.path}")
    ckey = data = kpath = None
    token_epoch, earlier_tokens = 0, dict[int, bytes]()
    if party != consortium.coordinator:
        kpath = rel("consortium_key")
        token_epoch, ckey, earlier_tokens = load_token_keys(kpath)
        data = rel("data")
    log_format = raw.get("log_format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"{w}: log_format must be 'text' or 'json'")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or raw.get("bootstrap") or consortium.bootstrap
    try:
        kafka = load_access(str(bootstrap), consortium.path, party_path=path)
    except SecurityError as exc:
        raise ConfigError(str(exc)) from exc
    api = _api(raw.get("api", {}), f"{w} [api]", base)
    app = None
    if "app" in raw:
        if party == consortium.coordinator:
            raise ConfigError(f"{w} [app]: the coordinator has no application bus")
        app = _app(raw["app"], f"{w} [app]", base, party)
    metrics_port = None
    if "metrics_port" in raw:
        metrics_port = _get(raw, "metrics_port", int, w)
        if not 0 <= metrics_port <= 65535:
            raise ConfigError(f"{w}: field 'metrics_port' must be 0..65535")
    return PartyConfig(path, party, consortium, keys, rel("state_dir"), str(bootstrap),
                       log_format, ckey, data, kafka, api, app, metrics_port, private, kpath,
                       token_epoch, earlier_tokens)


class ConsortiumFile:
    """The consortium file as last loaded, read again when it changes: a party added or
    removed, a policy changed. A file that no longer loads keeps the last good one."""

    def __init__(self, consortium: Consortium) -> None:
        self.current = consortium
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        return file_stamp(self.current.path)

    def refresh(self) -> Consortium | None:
        """The new consortium when the file changed and loads, else None. ConfigError when it
        changed but cannot be used (the caller logs it and keeps the last good one)."""
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return None
        self._stamp = stamp
        new = load_consortium(self.current.path)
        old = self.current
        if (new.id, new.coordinator) != (old.id, old.coordinator):
            raise ConfigError(f"{new.path}: the consortium id and coordinator cannot change "
                              "while agents run")
        self.current = new
        return new


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a file changed (a file replaced by a rename is a new inode)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class PartyFiles:
    """What a running agent reads again when it changes: the consortium file (parties,
    policy, everyone's key epochs: a rotated party's agent takes its new private keys from
    there) and, at an institution, its consortium key file (token key epochs)."""

    def __init__(self, cfg: PartyConfig) -> None:
        self.cfg = cfg
        self._consortium = ConsortiumFile(cfg.consortium)
        self._tokens = file_stamp(cfg.consortium_key_path)

    def refresh(self) -> PartyConfig | None:
        """The party's configuration when one of the files changed and it loads, else None.
        ConfigError when a file changed but cannot be used: the caller logs it and keeps the
        last good configuration (which this then keeps too)."""
        new = self._consortium.refresh()
        tokens = file_stamp(self.cfg.consortium_key_path)
        if new is None and tokens == self._tokens:
            return None
        self._tokens = tokens
        try:
            self.cfg = with_keys(self.cfg, new or self.cfg.consortium)
        except ConfigError:
            self._consortium.current = self.cfg.consortium
            raise
        return self.cfg
