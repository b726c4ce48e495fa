"""The `zerosum` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agents.broker import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_PORT,
    KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    default_data_dir,
)

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user-facing error: printed as `zerosum: error: ...`, exit status 2."""


def _broker(args: argparse.Namespace) -> LocalBroker:
    return LocalBroker(args.data_dir, port=args.port, controller_port=args.controller_port)


def cmd_broker_start(args: argparse.Namespace) -> int:
    broker = _broker(args)
    res = broker.start()
    if res.already_running:
        print(f"Kafka is already running at {res.bootstrap} (data dir {broker.data_dir})")
    else:
        print(f"Kafka {KAFKA_VERSION} is up at {res.bootstrap} after {res.seconds:.1f} s "
              f"(data dir {broker.data_dir}, logs {broker.log_dir})")
    return 0


def cmd_broker_stop(args: argparse.Namespace) -> int:
    broker = _broker(args)
    if broker.stop():
        print(f"stopped the Kafka broker of {broker.data_dir}")
    else:
        print(f"no Kafka broker of {broker.data_dir} was running")
    return 0


def cmd_broker_status(args: argparse.Namespace) -> int:
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
    for name, fn, text in (
        ("start", cmd_broker_start, "start the broker in the background and wait until it "
                                    "answers; prints the bootstrap address and start-up time"),
        ("stop", cmd_broker_stop, "stop the broker that `start` started for this data dir"),
        ("status", cmd_broker_status, "say whether the broker runs and answers (exit 3 if not)"),
    ):
        q = bsub.add_parser(name, help=text, description=text)
        q.add_argument("--data-dir", type=Path, default=default_data_dir(),
                       help="where topics, logs and broker.json live "
                            "(default: %(default)s, or ZEROSUM_BROKER_DIR)")
        q.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help="client port on 127.0.0.1 (default: %(default)s)")
        q.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT,
                       help="KRaft controller port on 127.0.0.1 (default: %(default)s)")
        q.set_defaults(func=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerosum",
        description="Per-customer totals across institutions (total debt, number of lenders) "
                    "without any institution, the coordinator or the Kafka operator seeing "
                    "another institution's figures. Implements CN112217639B on Apache Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_broker(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
