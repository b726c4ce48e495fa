"""`zerosum demo`: a whole consortium on the embedded broker, checked against plaintext."""

from __future__ import annotations

import asyncio
import csv
import logging
import os
import random
import shutil
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from agents.broker import LocalBroker
from agents.config import load_party
from agents.kafka_admin import init_on_broker
from agents.kafka_client import quiet_aiokafka
from agents.run import agents_in_process, setup_logging
from protocol.machine import Ended, Outcome
from protocol.messages import Scope
from protocol.tokens import normalise_id, tokenize, tokens_to_bytes


def plaintext(data_dir: Path,
              columns: tuple[str, ...] = ("balance", "overdue_days")) -> dict[str, list[Decimal]]:
    """customer id -> [holders, *columns], summed in the clear from the CSVs."""
    totals: dict[str, list[Decimal]] = {}
    for f in sorted(data_dir.glob("*.csv")):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                t = totals.setdefault(normalise_id(row["customer_id"]),
                                      [Decimal(0)] * (1 + len(columns)))
                t[0] += 1
                for i, c in enumerate(columns, start=1):
                    t[i] += Decimal(row[c])
    return totals


async def _demo(configs: list[Path], expected: dict[str, list[Decimal]], rounds: int,
                customers: int) -> bool:
    ok = True
    universe = sorted({f"CUST-{i:08d}" for i in range(customers * 2)})
    async with agents_in_process([load_party(c) for c in configs]) as by_name:
        agents = list(by_name.values())
        institutions = [a for a in agents if not a.cfg.is_coordinator]
        key = institutions[0].cfg.consortium_key
        assert key is not None
        rng = random.Random()
        for r in range(rounds):
            requester = institutions[r % len(institutions)]
            scope = Scope.INTERSECTION if r % 2 == 0 else Scope.QUERY
            query_ids = rng.sample(universe, min(500, len(universe)))
            tokens = tokenize(query_ids, key)
            by_token = {tokens_to_bytes(tokens[i:i + 1]): c for i, c in enumerate(query_ids)}
            t0 = time.monotonic()
            res = await requester.submit(
                os.urandom(16), tokens, participants=requester.cfg.consortium.institutions,
                attributes=("balance", "overdue_days"), scope=scope, min_holders=1)
            took = time.monotonic() - t0
            if isinstance(res, Ended) or res is None:
                print(f"round {r + 1}: ABORTED {res}")
                ok = False
                continue
            assert isinstance(res, Outcome)
            mismatches = 0
            print(f"\nround {r + 1}: requested by {requester.cfg.party}, scope {scope}, "
                  f"{len(query_ids)} customers asked, {res.tokens.size} rows published, "
                  f"{res.withheld} withheld, {took:.2f} s")
            print(f"  {'customer':<15} {'holders':>7} {'total balance':>18} "
                  f"{'plaintext balance':>18} {'overdue days':>12}")
            for i, t in enumerate(res.tokens):
                cid = by_token[bytes(t)]
                holders, bal, days = (int(v) for v in res.totals[i])
                want = expected.get(normalise_id(cid), [Decimal(0)] * 3)
                got = [Decimal(holders), Decimal(bal).scaleb(-2), Decimal(days)]
                if got != want:
                    mismatches += 1
                if i < 5:
                    print(f"  {cid:<15} {holders:>7} {got[1]:>18} {want[1]:>18} {days:>12}")
            print(f"  plaintext check: {'PASSED' if mismatches == 0 else 'FAILED'} "
                  f"({res.tokens.size - mismatches}/{res.tokens.size} rows equal)")
            ok = ok and mismatches == 0
    return ok


def run_demo(*, institutions: int, customers: int, rounds: int, data_dir: Path, port: int,
             controller_port: int) -> int:
    setup_logging("text", verbose=False)
    logging.getLogger().setLevel(logging.WARNING)
    # the group coordinator is not there for the first moments of a fresh broker: aiokafka
    # logs that as an error and retries; the demo's output is the rounds
    quiet_aiokafka(logging.CRITICAL)
    broker = LocalBroker(data_dir, port=port, controller_port=controller_port)
    started = broker.start()
    print(f"Kafka at {started.bootstrap}" + (" (already running)" if started.already_running
                                              else f", started in {started.seconds:.1f} s"))
    directory = Path(tempfile.mkdtemp(prefix="zerosum-demo-"))
    try:
        init_on_broker(directory, broker.access(broker.running()), institutions=institutions,
                       customers=customers, consortium=f"demo-{os.urandom(4).hex()}")
        print(f"consortium of {institutions} institutions x {customers} customers in "
              f"{directory}")
        configs = [c for c in sorted(directory.glob("*.toml")) if c.name != "consortium.toml"]
        ok = asyncio.run(_demo(configs, plaintext(directory / "data"), rounds, customers))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if not started.already_running:
            broker.stop()
            print("\nstopped the broker the demo started")
    print("\ndemo " + ("PASSED: every published total equals the plaintext sum" if ok
                       else "FAILED"))
    return 0 if ok else 1
