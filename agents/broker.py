"""The embedded local Kafka broker: Apache Kafka's own jars from Maven Central, run with Java 17.

`zerosum broker start | stop | status` and the test fixture both use `LocalBroker`. The jars are
fetched once with Maven into a cache outside the repository; storage is formatted once; the
broker runs in the background as its own process group and is found again through
`<data-dir>/broker.json`. Only the process recorded there is ever stopped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agents.kafka_client import aiokafka_silenced
from agents.security import (
    PRINCIPAL_MAPPING,
    KafkaAccess,
    SecurityError,
    as_access,
    new_password,
    read_credentials,
    write_broker_keystore,
    write_ca,
    write_credentials,
    write_private,
)

KAFKA_VERSION = "4.4.0"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
JVM_OPTS = ("-Xms512m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true")


# `--insecure`: the plaintext listener of old, for experiments only
INSECURE_OVERRIDES = {
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
}
# what `start` adds to server.properties in secure mode: paths and passwords of this data dir
SET_BY_START = ("ssl.keystore.location", "ssl.keystore.password", "ssl.truststore.location",
                "listener.name.controller.plain.sasl.jaas.config",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config")
SECURE_ONLY = {"authorizer.class.name", "allow.everyone.if.no.acl.found", "super.users",
               "listener.name.controller.sasl.enabled.mechanisms"}


class BrokerError(Exception):
    """A local broker could not be set up, started, reached or stopped; the message says why."""


def broker_config_dir() -> Path:
    """`broker_config/` of the repository, or the copy shipped inside an installed wheel."""
    env = os.environ.get("ZEROSUM_BROKER_CONFIG")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "broker_config", here.parent / "broker_config"]
    for c in candidates:
        if (c / "server.properties").is_file() and (c / "pom.xml").is_file():
            return c
    raise BrokerError(f"broker_config/ not found (looked in {', '.join(map(str, candidates))})")


def default_cache_dir() -> Path:
    env = os.environ.get("ZEROSUM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zerosum"


def default_data_dir() -> Path:
    env = os.environ.get("ZEROSUM_BROKER_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zerosum" / "broker"


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java .properties file of simple `key=value` lines (no continuations)."""
    props: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        if "=" not in line:
            raise BrokerError(f"{path}:{lineno}: expected key=value, got {raw!r}")
        key, value = line.split("=", 1)
        props[key.strip()] = value.strip()
    return props


def java_major_version(java: str = "java") -> int:
    """The major version of `java`, or BrokerError naming what is missing."""
    exe = shutil.which(java)
    if exe is None:
        raise BrokerError("Java 17 or newer is required to run Kafka, and `java` is not on PATH "
                          "(Debian: apt-get install openjdk-17-jre-headless)")
    out = subprocess.run([exe, "-version"], capture_output=True, text=True, check=False)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        raise BrokerError(f"could not read the Java version from `{exe} -version`: {out.stderr!r}")
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def check_java() -> None:
    major = java_major_version()
    if major < 17:
        raise BrokerError(f"Kafka {KAFKA_VERSION} needs Java 17 or newer; `java` is Java {major}")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch_jars(cache_dir: Path, config_dir: Path, *, log: logging.Logger) -> Path:
    """Fetch Kafka's runtime jars into `cache_dir/kafka-<version>/libs` once; return that dir.

    The copy is made in a temporary directory and renamed into place, so an interrupted fetch
    never leaves a half-filled libs directory behind.
    """
    target = cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    if (target / ".complete").is_file():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven is required to fetch Kafka's jars from Maven Central, and `mvn` "
                          "is not on PATH (Debian: apt-get install maven)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"libs.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetching Apache Kafka %s jars from Maven Central into %s", KAFKA_VERSION, target)
    t0 = time.monotonic()
    cmd = [mvn, "-B", "-q", "-f", str(config_dir / "pom.xml"),
           f"-Dkafka.version={KAFKA_VERSION}",
           "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise BrokerError(f"Maven could not fetch Kafka {KAFKA_VERSION} "
                          f"(exit {res.returncode}):\n{tail}")
    (tmp / ".complete").write_text(KAFKA_VERSION + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("fetched %d jars in %.1f s", len(list(target.glob("*.jar"))),
             time.monotonic() - t0)
    return target


def kafka_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 chars).

    Like Kafka's own Uuid.randomUuid(), never one that starts with '-': the storage tool's
    argument parser would read it as an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


async def probe(target: str | KafkaAccess, timeout_s: float = 5.0) -> int:
    """Send one metadata request to `target`; return the number of brokers it reports.

    Raises BrokerError when no answer arrives within `timeout_s`.
    """
    from aiokafka import AIOKafkaClient  # local import: the CLI's --help stays fast

    access = as_access(target)
    bootstrap = access.bootstrap
    with aiokafka_silenced():
        client = AIOKafkaClient(**access.aiokafka_kwargs(),
                                request_timeout_ms=int(timeout_s * 1000), metadata_max_age_ms=1000)
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
                brokers = client.cluster.brokers()
                if not brokers:
                    raise BrokerError(f"{bootstrap} answered but reports no broker yet")
                return len(brokers)
        except (TimeoutError, OSError) as exc:
            raise BrokerError(
                f"no Kafka broker answered at {bootstrap}: {exc or 'timed out'}") from exc
        except Exception as exc:
            if isinstance(exc, BrokerError):
                raise
            raise BrokerError(f"no Kafka broker answered at {bootstrap}: {exc}") from exc
        finally:
            await client.close()


@dataclass(frozen=True)
class BrokerInfo:
    """What `broker.json` records about a running broker."""

    pid: int
    port: int
    controller_port: int
    started_at: float
    secure: bool = False
    mtls_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class StartResult:
    bootstrap: str
    seconds: float
    already_running: bool
    secure: bool = True


def admin_access(bootstrap: str, credentials: Path, cafile: Path) -> KafkaAccess:
    """The admin super-user (its SCRAM credential in `credentials`) at `bootstrap`, over TLS
    trusting `cafile`; BrokerError if the credential cannot be read."""
    try:
        user, password = read_credentials(credentials)
    except SecurityError as exc:
        raise BrokerError(str(exc)) from exc
    return KafkaAccess(bootstrap, user, password, cafile)


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One zerosum command at a time in a broker's (or a cluster's) data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BrokerError(f"another zerosum command is using {data_dir}") from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class LocalBroker:
    """One single-node KRaft broker whose files live under `data_dir`."""

    def __init__(self, data_dir: Path | None = None, *, port: int = DEFAULT_PORT,
                 controller_port: int = DEFAULT_CONTROLLER_PORT, cache_dir: Path | None = None,
                 log: logging.Logger | None = None, insecure: bool = False,
                 tls_dir: Path | None = None, mtls_port: int | None = None) -> None:
        self.data_dir = (data_dir or default_data_dir()).resolve()
        self.port = port
        # a second client listener for mutual TLS (certificates instead of SCRAM passwords)
        self.mtls_port = None if insecure else mtls_port
        self.controller_port = controller_port
        self.cache_dir = cache_dir or default_cache_dir()
        self.log = log or logging.getLogger("zerosum.broker")
        self.insecure = insecure
        self.tls_dir = (tls_dir or self.data_dir / "tls").resolve()
        self.jvm_opts: tuple[str, ...] = JVM_OPTS

    def cluster_id(self) -> str:
        """The id the storage is formatted with; a cluster's nodes all use the same one."""
        return kafka_cluster_id()

    # -- files -------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.data_dir / "broker.json"

    @property
    def props_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def kraft_dir(self) -> Path:
        return self.data_dir / "kraft-logs"

    @property
    def admin_credentials(self) -> Path:
        """The admin super-user's SCRAM credential (mode 600), made before the first format."""
        return self.data_dir / "admin.kafka"

    @property
    def cafile(self) -> Path:
        """The CA certificate that clients of this broker trust."""
        return self.tls_dir / "ca.pem"

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return data_dir_lock(self.data_dir)

    def read_info(self) -> BrokerInfo | None:
        try:
            raw = json.loads(self.info_path.read_text())
            return BrokerInfo(pid=int(raw["pid"]), port=int(raw["port"]),
                              controller_port=int(raw["controller_port"]),
                              started_at=float(raw["started_at"]),
                              secure=bool(raw.get("secure", False)),
                              mtls_port=raw.get("mtls_port"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running(self) -> BrokerInfo | None:
        """The recorded broker if its process is alive and is the broker of this data dir."""
        info = self.read_info()
        if info is None:
            return None
        try:
            cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if b"kafka.Kafka" in cmdline and str(self.props_path).encode() in cmdline:
            return info
        return None

    def access(self, info: BrokerInfo | None = None) -> KafkaAccess:
        """How the admin reaches this broker: the admin super-user in secure mode."""
        secure = info.secure if info is not None else not self.insecure
        bootstrap = f"127.0.0.1:{info.port if info is not None else self.port}"
        if not secure:
            return KafkaAccess(bootstrap)
        return admin_access(bootstrap, self.admin_credentials, self.cafile)

    @property
    def secrets_path(self) -> Path:
        """The controller listener's password (mode 600); a cluster's nodes share one."""
        return self.data_dir / "broker-secrets.toml"

    def _secrets(self) -> dict[str, str]:
        """Passwords of this data dir (mode 600), made on the first secure start."""
        path = self.secrets_path
        if not path.is_file():
            write_private(path, f'controller_password = "{new_password()}"\n')
        raw = read_properties(path)
        return {k: v.strip('"') for k, v in raw.items()}

    def _tls(self) -> str:
        """The broker's keystore password; the CA and keystore are made when missing."""
        if not (self.tls_dir / "ca.pem").is_file():
            write_ca(self.tls_dir, "zerosum local broker CA")
        pw_file = self.tls_dir / "broker.password"
        if not (self.tls_dir / "broker.p12").is_file() or not pw_file.is_file():
            write_private(pw_file, write_broker_keystore(self.tls_dir))
        return pw_file.read_text().strip()

    def effective_properties(self) -> dict[str, str]:
        props = read_properties(broker_config_dir() / "server.properties")
        listener = "PLAINTEXT" if self.insecure else "SASL_SSL"
        mtls = f",MTLS://127.0.0.1:{self.mtls_port}" if self.mtls_port else ""
        props.update({
            "listeners": f"{listener}://127.0.0.1:{self.port}{mtls},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"{listener}://127.0.0.1:{self.port}{mtls}",
            "controller.quorum.voters": f"{props.get('node.id', '1')}@127.0.0.1:"
                                        f"{self.controller_port}",
            "log.dirs": str(self.kraft_dir),
        })
        if self.insecure:
            for key in [k for k in props if k in SECURE_ONLY or k.startswith(("sasl.", "ssl."))]:
                del props[key]
            props.update(INSECURE_OVERRIDES)
            return props
        _, admin_pw = read_credentials(self.admin_credentials)
        controller_pw = self._secrets()["controller_password"]
        props.update({
            "ssl.keystore.location": str(self.tls_dir / "broker.p12"),
            "ssl.keystore.password": self._tls(),
            "ssl.truststore.location": str(self.cafile),
            "listener.name.controller.plain.sasl.jaas.config":
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="controller" password="{controller_pw}" '
                f'user_controller="{controller_pw}";',
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="admin" password="{admin_pw}";',
        })
        if self.mtls_port:  # mutual TLS: the certificate's CN is the principal, same ACLs
            props["listener.security.protocol.map"] += ",MTLS:SSL"
            props.update({
                "listener.name.mtls.ssl.client.auth": "required",
                "listener.name.mtls.ssl.principal.mapping.rules": PRINCIPAL_MAPPING,
            })
        return props

    def _write_properties(self) -> None:
        if not self.insecure and not self.admin_credentials.is_file():
            if (self.kraft_dir / "meta.properties").is_file():
                raise BrokerError(f"{self.data_dir} was formatted without an admin credential "
                                  "(by --insecure or an older zerosum); remove that data dir, "
                                  "or start with --insecure")
            write_credentials(self.admin_credentials, "admin", new_password())
        lines = ["# Written by `zerosum broker start` from broker_config/server.properties."]
        lines += [f"{k}={v}" for k, v in self.effective_properties().items()]
        write_private(self.props_path, "\n".join(lines) + "\n")  # it holds passwords

    def _java_cmd(self, libs: Path, main: str, *args: str) -> list[str]:
        cfg = broker_config_dir()
        return ["java", *self.jvm_opts,
                f"-Dlog4j2.configurationFile={cfg / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.log_dir}",
                "-cp", f"{libs}/*", main, *args]

    def _format_once(self, libs: Path) -> None:
        if (self.kraft_dir / "meta.properties").is_file():
            return
        args = ["format", "--cluster-id", self.cluster_id(), "--config", str(self.props_path),
                "--ignore-formatted"]
        secret = None
        if not self.insecure:  # the admin super-user exists from the first moment
            user, secret = read_credentials(self.admin_credentials)
            args += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={secret}]"]
        cmd = self._java_cmd(libs, "kafka.tools.StorageTool", *args)
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            # the tool prints the credential records it writes: never pass them on
            out = "\n".join(line for line in (res.stdout + res.stderr).strip().splitlines()
                            if "SCRAM" not in line.upper() and (not secret or secret not in line))
            raise BrokerError(f"formatting Kafka storage in {self.kraft_dir} failed "
                              f"(exit {res.returncode}): {out}")

    # -- commands ----------------------------------------------------------------------
    def start(self) -> StartResult:
        """Start the broker unless it runs already; return once a metadata request succeeds."""
        with self._lock():
            current = self.running()
            if current is not None:
                return StartResult(current.bootstrap, 0.0, already_running=True,
                                   secure=current.secure)
            t0 = time.monotonic()
            proc, info = self.launch()
            try:
                self._wait_ready(proc, self.access(info))
            except BrokerError:
                self._terminate(proc.pid)
                raise
            return StartResult(info.bootstrap, time.monotonic() - t0, already_running=False,
                               secure=info.secure)

    def launch(self) -> tuple[subprocess.Popen[bytes], BrokerInfo]:
        """Check, fetch, configure, format once and spawn the JVM; do not wait for it.

        The caller holds the lock (`start`) or owns the data dir (a cluster's nodes, which
        must all be spawned before any of them can elect a controller)."""
        check_java()
        for name, p in (("--port", self.port), ("--controller-port", self.controller_port)):
            if port_in_use(p):
                raise BrokerError(f"port {p} on 127.0.0.1 is already in use by another "
                                  f"program; stop it or choose another {name}")
        libs = fetch_jars(self.cache_dir, broker_config_dir(), log=self.log)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_properties()
        self._format_once(libs)
        console = open(self.log_dir / "console.log", "ab")  # noqa: SIM115 - child owns it
        try:
            proc = subprocess.Popen(
                self._java_cmd(libs, "kafka.Kafka", str(self.props_path)),
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.data_dir)
        finally:
            console.close()
        info = BrokerInfo(proc.pid, self.port, self.controller_port, time.time(),
                          secure=not self.insecure, mtls_port=self.mtls_port)
        self.info_path.write_text(json.dumps(info.__dict__) + "\n")
        return proc, info

    def _wait_ready(self, proc: subprocess.Popen[bytes], bootstrap: KafkaAccess,
                    brokers: int = 1) -> None:
        """Until a metadata request through `bootstrap` reports at least `brokers` brokers."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(f"Kafka exited with status {proc.returncode} while starting; "
                                  f"last lines of {self.log_dir}:\n{self.log_tail()}")
            try:
                seen = asyncio.run(probe(bootstrap, timeout_s=2.0))
                if seen >= brokers:
                    return
                last = f"{seen} of {brokers} brokers registered"
            except BrokerError as exc:
                last = str(exc)
            time.sleep(0.25)  # polling a child process; not a test
        raise BrokerError(f"Kafka did not answer within {START_TIMEOUT_S:.0f} s ({last}); "
                          f"see {self.log_dir / 'server.log'}")

    def log_tail(self, lines: int = 20) -> str:
        out: list[str] = []
        for name in ("console.log", "server.log"):
            p = self.log_dir / name
            if p.is_file():
                out += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out[-lines:])

    def _terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            except ChildProcessError:  # not our child: poll for its exit instead
                if not Path(f"/proc/{pid}").exists():
                    return
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                        return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def stop(self) -> bool:
        """Stop the broker this data dir started; False when none was running."""
        with self._lock():
            info = self.running()
            if info is None:
                return False
            self._terminate(info.pid)
            self.info_path.unlink(missing_ok=True)
            return True

    def status(self) -> tuple[BrokerInfo | None, str]:
        info = self.running()
        if info is None:
            return None, f"not running (data dir {self.data_dir})"
        try:
            n = asyncio.run(probe(self.access(info), timeout_s=3.0))
            mode = "SASL_SSL" if info.secure else "PLAINTEXT (insecure)"
            return info, (f"running, pid {info.pid}, bootstrap {info.bootstrap} ({mode}), "
                          f"{n} broker(s)")
        except BrokerError as exc:
            return info, f"process {info.pid} is alive but not answering: {exc}"
