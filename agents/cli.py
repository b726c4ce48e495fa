"""The `zerosum` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.broker import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_PORT,
    KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    default_data_dir,
)
from agents.config import KEM_NAMES, ConfigError, PartyConfig, load_party
from agents.kafka_client import quiet_aiokafka
from agents.security import KafkaAccess

if TYPE_CHECKING:
    from agents.cluster import LocalCluster

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user-facing error: printed as `zerosum: error: ...`, exit status 2."""


INSECURE_WARNING = ("zerosum: WARNING: --insecure: plaintext Kafka, no TLS, no credentials, no "
                    "ACLs: anyone who reaches the port reads every inbox and writes anywhere. "
                    "For experiments only.")


def _cluster(args: argparse.Namespace) -> LocalCluster | None:
    """The local cluster when `--nodes` asks for one or the data dir holds one; else None."""
    from agents.cluster import LocalCluster, default_cluster_dir

    data_dir: Path | None = args.data_dir
    if args.nodes > 1 or (data_dir is not None and (data_dir / "cluster.json").is_file()):
        nodes = args.nodes if args.nodes > 1 else 3  # (a recorded cluster keeps its own)
        return LocalCluster(data_dir or default_cluster_dir(), nodes=nodes,
                            port=args.port, controller_port=args.controller_port,
                            insecure=getattr(args, "insecure", False),
                            tls_dir=getattr(args, "tls", None))
    return None


def _broker(args: argparse.Namespace) -> LocalBroker:
    return LocalBroker(args.data_dir, port=args.port, controller_port=args.controller_port,
                       insecure=getattr(args, "insecure", False),
                       tls_dir=getattr(args, "tls", None),
                       mtls_port=getattr(args, "mtls_port", None))


def cmd_broker_start(args: argparse.Namespace) -> int:
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    cluster = _cluster(args)
    if cluster is not None:
        res = cluster.start()
        mode = "SASL_SSL" if res.secure else "PLAINTEXT (insecure)"
        state = "already running" if res.already_running else f"up after {res.seconds:.1f} s"
        print(f"Kafka {KAFKA_VERSION} cluster of {len(cluster.nodes)} nodes {state}, {mode}; "
              f"bootstrap {res.bootstrap} (data dir {cluster.data_dir})")
        if res.secure:
            print(f"clients trust {cluster.cafile}; the admin super-user's credential is "
                  f"{cluster.admin_credentials}")
        return 0
    broker = _broker(args)
    res = broker.start()
    mode = "SASL_SSL" if res.secure else "PLAINTEXT (insecure)"
    if res.already_running:
        print(f"Kafka is already running at {res.bootstrap}, {mode} (data dir {broker.data_dir})")
    else:
        print(f"Kafka {KAFKA_VERSION} is up at {res.bootstrap}, {mode}, after {res.seconds:.1f} s "
              f"(data dir {broker.data_dir}, logs {broker.log_dir})")
    if res.secure:
        print(f"clients trust {broker.cafile}; the admin super-user's credential is "
              f"{broker.admin_credentials}")
    if broker.mtls_port:
        print(f"mutual TLS on 127.0.0.1:{broker.mtls_port} (client certificates from "
              "`zerosum broker client-cert`)")
    return 0


def cmd_broker_client_cert(args: argparse.Namespace) -> int:
    """Mutual TLS: a party's client certificate, signed by the broker's CA."""
    from agents.config import ConfigError, load_consortium
    from agents.security import SecurityError, scram_username, write_client_certificate

    try:
        c = load_consortium(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    if args.party not in c.registry and args.party != "auditor":
        raise CliError(f"{args.config}: no party {args.party!r}")
    ca_dir = args.tls or (args.data_dir / "tls")
    out = args.config.parent / "keys"
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = out / f"{args.party}.crt.pem", out / f"{args.party}.key.pem"
    try:
        write_client_certificate(ca_dir, scram_username(c.id, args.party), cert, key)
    except (OSError, SecurityError) as exc:
        raise CliError(f"cannot sign with the CA in {ca_dir}: {exc}") from exc
    print(f"{cert} and {key} (mode 600): set [kafka] certificate and key in the party's file "
          "and security = \"SSL\" in consortium.toml, bootstrap at the broker's --mtls-port")
    return 0


def _admin_access(args: argparse.Namespace, bootstrap: str) -> KafkaAccess:
    """The admin super-user: --admin-user with --admin-password-env, --admin-credentials, or
    the credential of the local broker's data dir."""
    from agents.security import KafkaAccess, SecurityError, read_credentials

    try:
        if args.admin_user:
            password = os.environ.get(args.admin_password_env or "")
            if not password:
                raise CliError("--admin-user needs --admin-password-env naming a set variable")
            user = args.admin_user
        else:
            creds = args.admin_credentials or LocalBroker(args.data_dir).admin_credentials
            user, password = read_credentials(creds)
    except SecurityError as exc:
        raise CliError(str(exc)) from exc
    ca = args.ca or (args.config.parent / "tls" / "ca.pem")
    return KafkaAccess(bootstrap, user, password, ca.resolve())


def cmd_broker_acl(args: argparse.Namespace) -> int:
    from agents.config import load_consortium
    from agents.kafka_admin import AdminError, provision, revoke
    from agents.security import SecurityError

    try:
        consortium = load_consortium(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    bootstrap = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP") or consortium.bootstrap
    admin = _admin_access(args, bootstrap)
    try:
        if args.revoke:
            for party in args.revoke:
                n = revoke(admin, consortium.id, party, user=not args.no_users)
                print(f"revoked {party}: {n} ACLs deleted" +
                      ("" if args.no_users else ", SCRAM user deleted") + "; its topic is kept")
            return 0
        created = provision(admin, consortium, args.party or None, users=not args.no_users)
    except (AdminError, SecurityError) as exc:
        raise CliError(str(exc)) from exc
    print(f"{consortium.id} on {bootstrap}: {len(created)} topics created, "
          f"{len(args.party or consortium.registry)} parties and the auditor have their "
          "users and ACLs")
    return 0


def cmd_broker_stop(args: argparse.Namespace) -> int:
    broker = _cluster(args) or _broker(args)
    if broker.stop():
        print(f"stopped the Kafka broker of {broker.data_dir}")
    else:
        print(f"no Kafka broker of {broker.data_dir} was running")
    return 0


def cmd_broker_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if cluster is not None:
        nodes = cluster.status()
        for node_id, _, line in nodes:
            print(f"node {node_id}: {line}")
        return 0 if all(info is not None for _, info, _ in nodes) else 3
    info, text = _broker(args).status()
    print(text)
    return 0 if info is not None else 3


def _add_broker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "broker", help="start, stop or inspect the embedded local Kafka broker",
        description=f"The embedded single-node Apache Kafka {KAFKA_VERSION} broker (KRaft) on "
                    "127.0.0.1. Its jars are fetched once from Maven Central with Maven into "
                    "~/.cache/zerosum (ZEROSUM_CACHE_DIR) and run with Java 17 or newer.")
    bsub = p.add_subparsers(dest="broker_cmd", required=True, metavar="{start,stop,status}")
    bsub.metavar = "{start,stop,status,acl}"
    for name, fn, text in (
        ("start", cmd_broker_start, "start the broker in the background and wait until it "
                                    "answers; prints the bootstrap address and start-up time"),
        ("stop", cmd_broker_stop, "stop the broker that `start` started for this data dir"),
        ("status", cmd_broker_status, "say whether the broker runs and answers (exit 3 if not)"),
    ):
        q = bsub.add_parser(name, help=text, description=text)
        q.add_argument("--data-dir", type=Path,
                       help="where topics, logs and broker.json live (default: "
                            f"{default_data_dir()}, or ZEROSUM_BROKER_DIR; with --nodes, "
                            "the cluster directory beside it)")
        q.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help="client port on 127.0.0.1 (default: %(default)s); node i of a "
                            "cluster uses port + 2(i-1)")
        q.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT,
                       help="KRaft controller port on 127.0.0.1 (default: %(default)s); node "
                            "i of a cluster uses controller-port + 2(i-1)")
        q.add_argument("--nodes", type=int, default=1,
                       help="1: the single broker (default); 3 or more: a local KRaft cluster "
                            "of combined broker + controller nodes, replicated 3 ways")
        if name == "start":
            q.add_argument("--insecure", action="store_true",
                           help="plaintext listener without credentials or ACLs, as before "
                                "(experiments only; says so on every start)")
            q.add_argument("--tls", type=Path,
                           help="a consortium's tls/ from `zerosum init` (CA and broker "
                                "certificate); default: the data dir's own, made once")
            q.add_argument("--mtls-port", type=int,
                           help="also listen for mutual TLS on this port: clients present a "
                                "certificate signed by the broker's CA (see `zerosum broker "
                                "client-cert`) instead of a SCRAM password; same ACLs")
        q.set_defaults(func=fn)
    cc = bsub.add_parser(
        "client-cert", help="sign a party's client certificate for mutual TLS",
        description="Mutual TLS instead of SCRAM: a certificate whose CN is the party's "
                    "principal (<consortium>.<party>), signed by the broker's CA, written to "
                    "keys/<party>.crt.pem and keys/<party>.key.pem beside the consortium file.")
    cc.add_argument("--config", type=Path, required=True, help="consortium.toml")
    cc.add_argument("--party", required=True, help="the party (or auditor)")
    cc.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="the broker's data dir, whose tls/ holds its CA (default: %(default)s)")
    cc.add_argument("--tls", type=Path, help="the CA directory instead (a consortium's tls/)")
    cc.set_defaults(func=cmd_broker_client_cert)
    a = bsub.add_parser(
        "acl", help="create a consortium's topics, SCRAM users and ACLs (or revoke a party)",
        description="The admin step on a secured broker, as its super-user: every inbox topic; "
                    "one SCRAM-SHA-512 user per party (from keys/<party>.kafka) that may read "
                    "its own inbox and consumer group and write the other inboxes; a read-only "
                    "auditor. Idempotent: run it again after adding a party. --revoke deletes "
                    "a party's ACLs and user at once; its topic stays for the audit.")
    a.add_argument("--config", type=Path, required=True, help="consortium.toml")
    a.add_argument("--party", action="append",
                   help="only this party (repeatable; default: every party)")
    a.add_argument("--revoke", action="append", metavar="PARTY",
                   help="take this party out: delete its ACLs and SCRAM user (repeatable)")
    a.add_argument("--no-users", action="store_true",
                   help="ACLs and topics only: the cluster's team manages SCRAM users")
    a.add_argument("--bootstrap", help="default: KAFKA_BOOTSTRAP, or the consortium's")
    a.add_argument("--ca", type=Path, help="CA to trust (default: tls/ca.pem beside --config)")
    a.add_argument("--admin-credentials", type=Path,
                   help="the super-user's credential file (default: the local broker's, in "
                        "--data-dir)")
    a.add_argument("--admin-user", help="the super-user's name, with --admin-password-env")
    a.add_argument("--admin-password-env", help="environment variable holding its password")
    a.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="the local broker's data dir (default: %(default)s)")
    a.set_defaults(func=cmd_broker_acl)


def _party(path: Path) -> PartyConfig:
    try:
        return load_party(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def cmd_init(args: argparse.Namespace) -> int:
    from agents.init import init_consortium
    from protocol.messages import MaskMode

    kem = KEM_NAMES[args.kem]
    try:
        consortium = args.consortium or f"zs-{os.urandom(4).hex()}"
        if args.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
        files = init_consortium(args.dir, institutions=args.institutions,
                                customers=args.customers, bootstrap=args.bootstrap,
                                consortium=consortium, kem=kem,
                                keep_existing=args.keep_existing, insecure=args.insecure,
                                ca=args.ca, masks=MaskMode(args.masks))
    except (ValueError, FileExistsError) as exc:
        raise CliError(str(exc)) from exc
    print(f"consortium in {args.dir.resolve()}: " + ", ".join(f.name for f in files))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from agents.data import DataFileError
    from agents.run import run_agent, setup_logging

    cfg = _party(args.config)
    if (args.command == "coordinator") != cfg.is_coordinator:
        raise CliError(f"{args.config} is the configuration of "
                       f"{'the coordinator' if cfg.is_coordinator else 'an institution'}; "
                       f"use `zerosum {'coordinator' if cfg.is_coordinator else 'institution'}`")
    setup_logging(args.log_format or cfg.log_format, args.verbose)
    if args.metrics_port is not None:
        cfg = dataclasses.replace(cfg, metrics_port=args.metrics_port)
    try:
        asyncio.run(run_agent(cfg))
    except DataFileError as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0: the agent answers, ready, with Kafka reachable; 1: it answers, but Kafka is
    away (or its answer is not one); 3: nothing answers on the socket (not running, or still
    recovering: the API opens once the agent is ready)."""
    import asyncio
    import json

    from zerosum import ApiError, Client, ConnectionLost

    cfg = _party(args.config)
    if cfg.is_coordinator:
        raise CliError(f"{args.config} is the coordinator's: it serves no local API; scrape "
                       "its metrics_port instead")

    async def ask() -> dict[str, Any]:
        async with asyncio.timeout(args.timeout), Client(cfg.api_socket) as client:
            return await client.status()

    try:
        status = asyncio.run(ask())
    except ApiError as exc:
        if isinstance(exc, ConnectionLost):  # it went away: nothing answers
            return _no_agent(cfg, exc)
        print(json.dumps({"party": cfg.party, "running": True, "socket": str(cfg.api_socket),
                          "error": f"{type(exc).__name__}: {exc}"}, indent=2))
        return 1
    except (OSError, TimeoutError) as exc:
        return _no_agent(cfg, exc)
    agent = status.get("agent", {})
    print(json.dumps({"party": cfg.party, "running": True, **status}, indent=2))
    return 0 if agent.get("ready") and agent.get("kafka_available", True) else 1


def _no_agent(cfg: PartyConfig, exc: BaseException) -> int:
    import json

    print(json.dumps({"party": cfg.party, "running": False, "socket": str(cfg.api_socket),
                      "error": f"{type(exc).__name__}: {exc}"}, indent=2))
    return 3


def cmd_round(args: argparse.Namespace) -> int:
    from agents.data import DataFileError
    from agents.run import RoundFailed, request_round
    from protocol.messages import Scope

    cfg = _party(args.config)
    parts = tuple(p.strip() for p in args.participants.split(",")) if args.participants else None
    try:
        data = request_round(cfg, args.query, scope=Scope(args.scope), out=args.out,
                             participants=parts, min_holders=args.min_holders,
                             timeout_s=args.timeout)
    except (RoundFailed, DataFileError) as exc:
        print(f"zerosum: {exc}", file=sys.stderr)
        return 1
    print(f"published: {len(data['rows'])} rows, {data['withheld']} withheld, "
          f"in {data['seconds']:.1f} s" + (f"; written to {args.out}" if args.out else ""))
    if args.out is None:
        print(",".join(data["header"]))
        for row in data["rows"][:20]:
            print(",".join(row))
        if len(data["rows"]) > 20:
            print(f"... {len(data['rows']) - 20} more rows (use --out)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agents.demo import run_demo

    return run_demo(institutions=args.institutions, customers=args.customers,
                    rounds=args.rounds, data_dir=args.data_dir, port=args.port,
                    controller_port=args.controller_port)


def _add_agents(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="write a working consortium: configs, keys, sample data",
                       description="Write consortium.toml, coordinator.toml, one bank-N.toml "
                                   "per institution, key files readable only by their owner "
                                   "(keys/), and sample data (data/).")
    p.add_argument("dir", type=Path, help="directory to write (created if missing)")
    p.add_argument("--institutions", type=int, default=3, help="how many (default: 3)")
    p.add_argument("--customers", type=int, default=1000,
                   help="sample customers per institution (default: 1000)")
    p.add_argument("--bootstrap", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help="Kafka bootstrap address the agents use (default: %(default)s)")
    p.add_argument("--consortium",
                   help="consortium id, part of every topic name (default: a new random id, "
                        "so that a new consortium never reuses an old one's topics)")
    p.add_argument("--kem", choices=list(KEM_NAMES), default="x25519",
                   help="HPKE key encapsulation (default: x25519)")
    p.add_argument("--masks", choices=["dealt", "pairwise"], default="dealt",
                   help="dealt: the patent's masks from the coordinator (coordinator and "
                        "leader together can unmask everyone); pairwise: institutions derive "
                        "them pairwise and nobody deals them (default: dealt)")
    p.add_argument("--keep-existing", action="store_true",
                   help="leave an existing consortium in DIR as it is instead of failing")
    p.add_argument("--ca", type=Path,
                   help="trust this CA (an existing broker's or cluster's) instead of making a "
                        "consortium CA and broker certificate in DIR/tls")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no credentials: for a broker started with --insecure")
    p.set_defaults(func=cmd_init)
    for name, text in (("coordinator", "run the coordinator agent until SIGTERM/SIGINT"),
                       ("institution", "run an institution agent until SIGTERM/SIGINT")):
        q = sub.add_parser(name, help=text, description=text + ". It reads its own inbox "
                           "topic, and resumes rounds in flight after a restart.")
        q.add_argument("--config", type=Path, required=True, help="the party's TOML file")
        q.add_argument("--log-format", choices=["text", "json"],
                       help="override log_format of the config file")
        q.add_argument("--metrics-port", type=int,
                       help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: a free "
                            "port, logged); overrides metrics_port of the config file")
        q.set_defaults(func=cmd_agent)
    st = sub.add_parser("status", help="ask a running institution agent how it is",
                        description="Ask the institution agent of CONFIG, through its local "
                                    "API, how it is: ready or not, Kafka reachable, rounds in "
                                    "flight, inbox lag, last data load and its errors, "
                                    "version; printed as JSON. Exit 0 when it is ready, 1 "
                                    "when it answers but is not ready (or Kafka is away), 3 "
                                    "when no agent answers.")
    st.add_argument("--config", type=Path, required=True, help="the institution's TOML file")
    st.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for the answer (default: %(default)s)")
    st.set_defaults(func=cmd_status)
    r = sub.add_parser("round", help="request a round for an institution and wait for it",
                       description="Hand a round request to this institution's running agent "
                                   "(through its local API socket), wait, and print or write "
                                   "customer_id,holders,<attributes...>. Exit 1 on an abort, "
                                   "with its reason.")
    r.add_argument("--config", type=Path, required=True, help="the institution's TOML file")
    r.add_argument("--query", type=Path, required=True,
                   help="CSV with a customer_id column: the customers to total")
    r.add_argument("--scope", choices=["intersection", "query"], default="intersection",
                   help="intersection: the query customers the leader holds (the patent); "
                        "query: every query customer (default: %(default)s)")
    r.add_argument("--out", type=Path, help="write the totals to this CSV")
    r.add_argument("--participants", help="comma-separated institutions (default: all)")
    r.add_argument("--min-holders", type=int,
                   help="withhold rows with fewer holders (default: the consortium policy)")
    r.add_argument("--timeout", type=float, help="deadline in seconds (default: the policy)")
    r.set_defaults(func=cmd_round)
    d = sub.add_parser("demo", help="run a whole consortium on the local broker and check it",
                       description="Start the embedded broker (if not running), create a "
                                   "consortium with generated data, run the agents, submit "
                                   "rounds, print the totals beside a plaintext check, and "
                                   "stop everything it started.")
    d.add_argument("--institutions", type=int, default=4, help="(default: 4)")
    d.add_argument("--customers", type=int, default=2000,
                   help="customers per institution (default: 2000)")
    d.add_argument("--rounds", type=int, default=3, help="(default: 3)")
    d.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="broker data dir (default: %(default)s)")
    d.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    d.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT,
                   help="(default: %(default)s)")
    d.set_defaults(func=cmd_demo)
    a = sub.add_parser("audit", help="replay every party topic and check every round",
                       description="Read every party topic from the beginning (or --since), "
                                   "check signatures, each sender's sequence and hash chain, and "
                                   "each round's transcript. Given a party's file instead of "
                                   "consortium.toml, also check what that party's key opens "
                                   "(the coordinator's: every sum). Exit 1 when a check fails, "
                                   "naming topic, partition, offset and check.")
    a.add_argument("--config", type=Path, required=True,
                   help="consortium.toml (public keys only) or a party's TOML file")
    a.add_argument("--since", help="start at this time: ISO 8601 (UTC) or epoch ms")
    a.add_argument("--json", type=Path, help="also write the report as JSON")
    a.add_argument("--html", type=Path, help="also write an HTML report with a timeline")
    a.add_argument("--credentials", type=Path,
                   help="the auditor's Kafka credential on a secured broker "
                        "(default: keys/auditor.kafka beside consortium.toml)")
    a.set_defaults(func=cmd_audit)
    b = sub.add_parser("bench", help="measure zerosum against the transport floor and Paillier",
                       description="Run the benchmark scenarios on the real broker and print "
                                   "figures and ratios measured in this run: large (one round, "
                                   "each agent its own process, against the transport and "
                                   "compute floors), small (many rounds in flight), credit "
                                   "(1-customer rounds one at a time through the local API), "
                                   "paillier "
                                   "(the same totals with Paillier), peers (MPyC and TenSEAL "
                                   "BFV on the totals of a 100,000 x 4 x 5 round, beside it), "
                                   "scaling (for --plot). "
                                   "Needs the bench extra: pip install -e '.[bench]'.")
    b.add_argument("--scenario", default="large,small,credit,paillier,peers",
                   help="comma-separated: large, small, credit, paillier, peers, scaling "
                        "(default: %(default)s)")
    b.add_argument("--customers", type=int, default=1_000_000,
                   help="customers of the large round (default: %(default)s)")
    b.add_argument("--institutions", type=int, default=5, help="(default: %(default)s)")
    b.add_argument("--attributes", type=int, choices=range(1, 5), default=4,
                   help="(default: %(default)s)")
    b.add_argument("--small-rounds", type=int, default=1000,
                   help="rounds of the small scenario (default: %(default)s)")
    b.add_argument("--paillier-customers", type=int, default=10_000,
                   help="(default: %(default)s)")
    b.add_argument("--json", type=Path, help="write every figure as JSON")
    b.add_argument("--plot", type=Path, help="write the scaling chart (PNG); adds scaling")
    b.add_argument("--bootstrap", help="use this plaintext broker instead of the embedded one")
    b.add_argument("--compare-plaintext", action="store_true",
                   help="run large and small again on a second, --insecure broker and report "
                        "secure beside plaintext (results['security'])")
    b.add_argument("--compare-masks", action="store_true",
                   help="run large and small again with pairwise masks and report them beside "
                        "the dealt masks (results['masks'])")
    b.add_argument("--cluster", action="store_true",
                   help="run large and small again on a local three-node cluster (RF 3, "
                        "min.insync.replicas=2, free ports) and report the cost of replication")
    b.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="embedded broker data dir (default: %(default)s)")
    b.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    b.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT,
                   help="(default: %(default)s)")
    b.set_defaults(func=cmd_bench)


def cmd_audit(args: argparse.Namespace) -> int:
    import asyncio

    from agents.audit import parse_since, read_and_audit, render_table, write_outputs
    from agents.config import load_consortium

    text = args.config.read_text() if args.config.is_file() else ""
    try:
        if text.lstrip().startswith("[consortium]") or "\n[consortium]" in text:
            cfg = None
            consortium = load_consortium(args.config)
            bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or consortium.bootstrap
        else:
            cfg = _party(args.config)
            consortium, bootstrap = cfg.consortium, cfg.bootstrap
        since = parse_since(args.since) if args.since else None
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    from agents.kafka_admin import credential_path
    from agents.security import AUDITOR, SecurityError, load_access

    try:  # the auditor's principal reads every inbox (a party's own may read only its own)
        access = load_access(bootstrap, consortium.path, credentials=args.credentials or
                             credential_path(consortium, AUDITOR))
    except SecurityError as exc:
        raise CliError(str(exc)) from exc
    run = asyncio.run(read_and_audit(consortium, access,
                                     key=cfg.keys if cfg else None, since_ms=since))
    print(render_table(run))
    write_outputs(run, f"zerosum {consortium.id}", args.json, args.html)
    return 0 if run.report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from agents.bench import main as bench_main
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CliError(f"{exc}; install the bench extra: pip install -e '.[bench]'") from exc
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - {"large", "small", "credit", "paillier", "peers",
                                          "scaling"})
    if unknown:
        raise CliError(f"--scenario: unknown {', '.join(unknown)}")
    return bench_main(scenarios=scenarios, customers=args.customers,
                      institutions=args.institutions, attributes=args.attributes,
                      small=args.small_rounds, paillier_customers=args.paillier_customers,
                      json_out=args.json, plot_out=args.plot, bootstrap=args.bootstrap,
                      data_dir=args.data_dir, port=args.port,
                      controller_port=args.controller_port,
                      compare_plaintext=args.compare_plaintext,
                      compare_masks=args.compare_masks,
                      compare_cluster=args.cluster)


def cmd_keys(args: argparse.Namespace) -> int:
    from agents import keys

    if (args.party is None) == (not args.token_key):
        raise CliError("name one of --party P or --token-key")
    try:
        if args.keys_cmd == "rotate":
            done = (keys.rotate_party(args.config, args.party, grace_s=args.grace)
                    if args.party else keys.rotate_token_key(args.config))
        else:
            done = (keys.retire_party(args.config, args.party) if args.party
                    else keys.retire_token_keys(args.config))
    except (ConfigError, OSError, KeyError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    what = f"{done.party}'s keys" if args.party else "the consortium token key"
    print(f"{what}: epoch {done.epoch}; wrote " + ", ".join(str(f) for f in done.files))
    return 0


def _add_keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="rotate a party's keys or the consortium token key",
                       description="Rotate keys as a new epoch, in a consortium directory "
                       "written by `zerosum init`. Running agents pick the new files up by "
                       "themselves.")
    ksub = p.add_subparsers(dest="keys_cmd", required=True, metavar="{rotate,retire}")
    for name, text in (
            ("rotate", "new keys as a new epoch; the previous epoch stays in its grace "
                       "until grace_until (rounds in flight finish), older ones are retired; "
                       "run it again after a crash to complete it"),
            ("retire", "end the grace now: past epochs are refused from here on")):
        q = ksub.add_parser(name, help=text, description=text)
        q.add_argument("--config", type=Path, required=True, metavar="CONSORTIUM_TOML",
                       help="consortium.toml (keys are under keys/ beside it)")
        q.add_argument("--party", help="the party whose signing and KEM keys rotate")
        q.add_argument("--token-key", action="store_true",
                       help="the institutions' consortium token key instead")
        if name == "rotate":
            q.add_argument("--grace", type=float, metavar="SECONDS",
                           help="with --party: how long the previous epoch stays accepted "
                           "(grace_until = now + SECONDS; default: the policy's "
                           "max_deadline_s)")
        q.set_defaults(func=cmd_keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerosum",
        description="Per-customer totals across institutions (total debt, number of lenders) "
                    "without any institution, the coordinator or the Kafka operator seeing "
                    "another institution's figures. Implements CN112217639B on Apache Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_broker(sub)
    _add_agents(sub)
    _add_keys(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the Kafka client's own chatter only with --verbose
        quiet_aiokafka()
    func: Handler = args.func
    try:
        return func(args)
    except (BrokerError, CliError) as exc:
        print(f"zerosum: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
