"""How a client reaches Kafka: the address, and in secure mode a SCRAM credential and the CA.

`KafkaAccess` is the one description of a connection; it turns into aiokafka's keyword
arguments (`aiokafka_kwargs`) and kafka-python's (`kafka_python_kwargs`, for the admin calls
aiokafka lacks). Its password never appears in a repr, so logging an access logs no secret.

Also here: the consortium's TLS material (a CA and a broker certificate, with `cryptography`'s
x509) and the credential files, each readable only by its owner (mode 600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SASL_MECHANISM = "SCRAM-SHA-512"
AUDITOR = "auditor"
# the names a broker certificate answers to: the local broker (or cluster), and compose's hosts
BROKER_HOSTS = ("localhost", "kafka", "kafka-1", "kafka-2", "kafka-3", "127.0.0.1", "::1")
CERT_DAYS = 825


class SecurityError(Exception):
    """A credential or certificate file is missing, unreadable or not private; says which."""


@dataclass(frozen=True)
class KafkaAccess:
    """Where Kafka is and, in secure mode, who connects: SASL_SSL with SCRAM-SHA-512, or
    mutual TLS (a client certificate signed by the broker's CA, `certfile` and `keyfile`).

    Neither a username nor a certificate: a plaintext connection (`--insecure`)."""

    bootstrap: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    @property
    def secure(self) -> bool:
        return self.username is not None or self.certfile is not None

    @property
    def mutual_tls(self) -> bool:
        return self.certfile is not None

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        kw: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.secure:
            from aiokafka.helpers import create_ssl_context

            ctx = create_ssl_context(cafile=self.cafile, certfile=self.certfile,
                                     keyfile=self.keyfile)
            if self.mutual_tls:
                kw.update(security_protocol="SSL", ssl_context=ctx)
            else:
                kw.update(security_protocol="SASL_SSL", sasl_mechanism=SASL_MECHANISM,
                          sasl_plain_username=self.username,
                          sasl_plain_password=self.password, ssl_context=ctx)
        return kw

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's KafkaAdminClient."""
        kw: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        cafile = str(self.cafile) if self.cafile else None
        if self.mutual_tls:
            kw.update(security_protocol="SSL", ssl_cafile=cafile,
                      ssl_certfile=str(self.certfile), ssl_keyfile=str(self.keyfile))
        elif self.secure:
            kw.update(security_protocol="SASL_SSL", sasl_mechanism=SASL_MECHANISM,
                      sasl_plain_username=self.username, sasl_plain_password=self.password,
                      ssl_cafile=cafile)
        return kw

    def as_user(self, username: str | None, password: str | None) -> KafkaAccess:
        """The same broker and CA, another principal (tests and the admin step)."""
        return KafkaAccess(self.bootstrap, username, password, self.cafile)


def as_access(target: str | KafkaAccess) -> KafkaAccess:
    """A bare bootstrap address is a plaintext connection."""
    return target if isinstance(target, KafkaAccess) else KafkaAccess(target)


def scram_username(consortium: str, party: str) -> str:
    """A party's SCRAM user: the consortium id in front, so that consortia share a cluster."""
    return f"{consortium}.{party}"


def new_password() -> str:
    """A random SCRAM password: 256 bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file readable only by its owner (mode 600), its directory mode 700 if new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
    os.chmod(path, 0o600)


def check_private(path: Path, what: str = "a credential file") -> None:
    """SecurityError unless `path` exists and only its owner may read it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise SecurityError(f"{path}: no such file") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{path}: {what} must be readable only by its owner "
                            f"(chmod 600 {path})")


def write_credentials(path: Path, username: str, password: str) -> None:
    write_private(path, tomli_w.dumps({"username": username, "password": password}))


def read_credentials(path: Path) -> tuple[str, str]:
    """(username, password) of a credential file written by `write_credentials`."""
    check_private(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
        user, password = raw["username"], raw["password"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise SecurityError(f"{path}: not a credential file (username, password): "
                            f"{type(exc).__name__}") from exc
    if not isinstance(user, str) or not isinstance(password, str):
        raise SecurityError(f"{path}: username and password must be strings")
    return user, password


# -- TLS material -------------------------------------------------------------------------------
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zerosum"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_ca(directory: Path, common_name: str = "zerosum consortium CA") -> Path:
    """Write `ca.pem` (the certificate every client trusts) and `ca.key` (mode 600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS * 2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    write_private(directory / "ca.key", _key_pem(key))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem"


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate: `ca.key` and `ca.pem` in `directory`."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{directory / 'ca.key'}: not the EC key `zerosum init` writes")
    return ca_key, x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())


def _leaf(subject: x509.Name, key: ec.EllipticCurvePrivateKey,
          ca: x509.Certificate) -> x509.CertificateBuilder:
    """A certificate for `key`, not a CA, issued by `ca`, valid from five minutes ago (clock
    skew) for CERT_DAYS days; the caller adds its usages and signs."""
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))


def write_broker_keystore(directory: Path, hosts: tuple[str, ...] = BROKER_HOSTS) -> str:
    """Sign a broker certificate with `directory/ca.key`; write `broker.p12` (PKCS#12, mode
    600) and `broker.pem`; return the keystore password (random, for server.properties)."""
    ca_key, ca = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (_leaf(_name("zerosum broker"), key, ca)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    password = new_password()
    p12 = pkcs12.serialize_key_and_certificates(
        b"broker", key, cert, [ca], serialization.BestAvailableEncryption(password.encode()))
    write_private(directory / "broker.p12", p12)
    (directory / "broker.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return password


def write_client_certificate(ca_dir: Path, principal: str, cert_out: Path,
                             key_out: Path) -> None:
    """Mutual TLS: a client certificate with CN = `principal` (the party's SCRAM user name,
    `<consortium>.<party>`), signed by the CA in `ca_dir` (the broker's, or the consortium's
    from `zerosum init`). The broker maps that CN to `User:<principal>`, so the same ACLs
    apply whether a party logs in with SCRAM or with its certificate."""
    ca_key, ca = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_leaf(_name(principal), key, ca)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(key_out, _key_pem(key))
    cert_out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# the broker's rule from a client certificate's subject to its principal: the CN alone
PRINCIPAL_MAPPING = "RULE:^CN=([^,]+),O=zerosum$/$1/,DEFAULT"


# -- the [kafka] tables of consortium.toml and of a party's file ------------------------------
def _kafka_table(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh).get("kafka", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SecurityError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(table, dict):
        raise SecurityError(f"{path}: [kafka] must be a table")
    return table


def _field(table: dict[str, Any], key: str, where: Path) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise SecurityError(f"{where} [kafka]: field {key!r} must be str")
    return value


def load_access(bootstrap: str, consortium_path: Path, *, party_path: Path | None = None,
                credentials: Path | None = None) -> KafkaAccess:
    """How a party (or, with `credentials`, the auditor) connects.

    consortium.toml's `[kafka]` says `security = "SASL_SSL"` (what `zerosum init` writes) or
    `"PLAINTEXT"` (`--insecure`), and `ca`, the CA certificate to trust. A party's file names
    its SCRAM credential file (`[kafka] credentials`, mode 600) and may override `ca`.
    Relative paths are relative to the file that holds them."""
    shared = _kafka_table(consortium_path)
    security = _field(shared, "security", consortium_path) or "PLAINTEXT"
    if security not in ("PLAINTEXT", "SASL_SSL", "SSL"):
        raise SecurityError(f"{consortium_path} [kafka]: security must be SASL_SSL, SSL "
                            "(mutual TLS) or PLAINTEXT")
    if security == "PLAINTEXT":
        return KafkaAccess(bootstrap)
    ca = _field(shared, "ca", consortium_path)
    cafile = (consortium_path.parent / ca).resolve() if ca else None
    if party_path is not None:
        own = _kafka_table(party_path)
        if _field(own, "ca", party_path):
            cafile = (party_path.parent / str(own["ca"])).resolve()
        if security == "SSL":  # mutual TLS: the party's certificate and key
            paths = []
            for key in ("certificate", "key"):
                value = _field(own, key, party_path)
                if value is None:
                    raise SecurityError(f"{party_path}: [kafka] {key} is missing, and "
                                        f"{consortium_path} says the broker is SSL (mutual "
                                        "TLS)")
                paths.append((party_path.parent / value).resolve())
            check_private(paths[1], "a TLS key file")
            return KafkaAccess(bootstrap, cafile=cafile, certfile=paths[0], keyfile=paths[1])
        cred = _field(own, "credentials", party_path)
        if credentials is None:
            if cred is None:
                raise SecurityError(f"{party_path}: [kafka] credentials is missing, and "
                                    f"{consortium_path} says the broker is SASL_SSL")
            credentials = (party_path.parent / cred).resolve()
    if credentials is None:
        raise SecurityError(f"{consortium_path}: the broker is SASL_SSL; a credential is needed")
    user, password = read_credentials(credentials)
    return KafkaAccess(bootstrap, user, password, cafile)


@dataclass(frozen=True)
class KafkaTables:
    """The `[kafka]` table of consortium.toml (with a comment for above it) and of each
    party's file (empty: none)."""

    comment: str
    shared: dict[str, str]
    parties: dict[str, dict[str, str]]


def write_consortium_security(directory: Path, consortium: str, parties: list[str], *,
                              insecure: bool = False, ca: Path | None = None
                              ) -> KafkaTables:
    """`zerosum init`'s part for Kafka: TLS material and one SCRAM credential per party.

    Writes `tls/ca.pem` (copied from `ca`, or a new consortium CA with `ca.key` and a broker
    certificate `broker.p12` + `broker.password` for `zerosum broker start --tls`), and
    `keys/<party>.kafka` for every party and the auditor (random passwords, mode 600).
    Returns consortium.toml's `[kafka]` table and each party file's."""
    if insecure:
        return KafkaTables("--insecure: no TLS, no credentials", {"security": "PLAINTEXT"},
                           {p: {} for p in parties})
    tls = directory / "tls"
    if ca is not None:
        tls.mkdir(parents=True, exist_ok=True)
        (tls / "ca.pem").write_bytes(ca.read_bytes())
    else:
        write_ca(tls)
        write_private(tls / "broker.password", write_broker_keystore(tls))
    for name in [*parties, AUDITOR]:
        write_credentials(directory / "keys" / f"{name}.kafka", scram_username(consortium, name),
                          new_password())
    return KafkaTables("SCRAM-SHA-512 over TLS; the auditor reads every inbox with "
                       "keys/auditor.kafka", {"security": "SASL_SSL", "ca": "tls/ca.pem"},
                       {p: {"credentials": f"keys/{p}.kafka"} for p in parties})
