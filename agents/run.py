"""Running agents: signals, logging, the `round` command's spool, and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents.agent import Agent, load_outcome
from agents.config import PartyConfig, load_party
from agents.data import load_query
from agents.health import KafkaWatch
from protocol.fixedpoint import format_decimal
from protocol.messages import Scope
from protocol.tokens import Tokens, tokens_to_bytes


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


@contextlib.asynccontextmanager
async def agents_in_process(configs: list[PartyConfig],
                            ready_s: float = 120) -> AsyncIterator[dict[str, Agent]]:
    """Run several agents as tasks of this event loop (demo, bench, tests); stop them all on
    exit, each finishing the batch in hand."""
    agents = {c.party: Agent(c) for c in configs}
    tasks = [asyncio.create_task(a.run(), name=n) for n, a in agents.items()]
    watch = KafkaWatch(configs[0].kafka.bootstrap) if configs else None
    watcher = asyncio.create_task(watch.run()) if watch else None
    try:
        async with asyncio.timeout(ready_s):
            for a, t in zip(agents.values(), tasks, strict=True):
                waiter = asyncio.create_task(a.ready.wait())
                await asyncio.wait({waiter, t}, return_when=asyncio.FIRST_COMPLETED)
                if t.done():
                    t.result()  # raises what stopped the agent
        yield agents
    finally:
        for a in agents.values():
            a.stop()
        if watch is not None:
            watch.stop()
        async with asyncio.timeout(120):
            results = await asyncio.gather(*tasks, return_exceptions=True)
            if watcher is not None:
                await watcher
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:  # an agent that died must not pass unnoticed
            raise failed[0]


def party_configs(directory: Path) -> list[PartyConfig]:
    """Every party file of a consortium directory written by `zerosum init`."""
    return [load_party(p) for p in sorted(directory.glob("*.toml"))
            if p.name != "consortium.toml"]


async def run_agent(cfg: PartyConfig) -> None:
    """Run one agent until SIGTERM or SIGINT, then stop gracefully."""
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    watch = KafkaWatch(cfg.kafka.bootstrap)  # says when Kafka cannot be reached, and when over
    watcher = asyncio.create_task(watch.run())
    try:
        await agent.run()
    finally:
        watch.stop()
        await watcher


class RoundFailed(Exception):
    """The round ended in an abort (or an error); the message carries the reason."""


def spool_request(cfg: PartyConfig, tokens: Tokens, *, participants: tuple[str, ...],
                  scope: Scope, min_holders: int, timeout_s: float) -> bytes:
    """Leave a round request for this institution's agent in <state_dir>/requests; return
    the round id. The deadline is fixed here, so a request re-sent after a crash is the same."""
    rid = os.urandom(16)
    spool = cfg.state_dir / "requests"
    spool.mkdir(parents=True, exist_ok=True)
    (spool / f"{rid.hex()}.tokens").write_bytes(tokens_to_bytes(tokens))
    tmp = spool / f"{rid.hex()}.tmp"
    tmp.write_text(json.dumps({
        "round_id": rid.hex(), "participants": list(participants),
        "attributes": list(cfg.consortium.attributes), "scope": str(scope),
        "min_holders": min_holders, "timeout_s": timeout_s,
        "deadline_ms": int((time.time() + timeout_s) * 1000)}))
    tmp.replace(spool / f"{rid.hex()}.json")
    return rid


def request_round(cfg: PartyConfig, query: Path, *, scope: Scope, out: Path | None,
                  participants: tuple[str, ...] | None, min_holders: int | None,
                  timeout_s: float | None, progress_s: float = 5.0) -> dict[str, Any]:
    """Hand a round request to this institution's running agent and wait for the result."""
    if cfg.is_coordinator:
        raise RoundFailed("rounds are requested by an institution, not by the coordinator")
    assert cfg.consortium_key is not None
    ids, tokens = load_query(query, cfg.consortium_key)
    c = cfg.consortium
    parts = participants or c.institutions
    timeout = timeout_s or c.policy.deadline_s
    holders = c.policy.min_holders if min_holders is None else min_holders
    # the coordinator and every institution enforce the policy; say so before asking
    if problem := c.round_policy().problem(parts, holders, tokens.size):
        raise RoundFailed(f"the consortium's policy ({c.path}) refuses this round: {problem}")
    rid = spool_request(cfg, tokens, participants=parts, scope=scope, min_holders=holders,
                        timeout_s=timeout)
    spool = cfg.state_dir / "requests"
    result_path = cfg.state_dir / "results" / f"{rid.hex()}.json"
    t0 = time.monotonic()
    last = t0
    print(f"round {rid.hex()}: {len(ids)} customers, {len(parts)} institutions, scope {scope}",
          file=sys.stderr)
    while not result_path.exists():
        now = time.monotonic()
        if now - t0 > timeout + 30:
            picked = not (spool / f"{rid.hex()}.json").exists()
            raise RoundFailed(f"no result after {now - t0:.0f} s" + (
                "" if picked else f"; is `zerosum institution --config {cfg.path}` running?"))
        if now - last >= progress_s:
            print(f"  waiting for the result ({now - t0:.0f} s)", file=sys.stderr)
            last = now
        time.sleep(0.1)  # polling a file the agent writes
    data, got_tokens, totals = load_outcome(result_path)
    if data["status"] != "published" or got_tokens is None or totals is None:
        raise RoundFailed(f"round aborted: {data.get('reason', 'ERROR')}: {data.get('detail')}")
    by_token = {bytes(t): cid for t, cid in zip(tokens, ids, strict=True)}
    attrs = [(str(n), int(s)) for n, s in data["attributes"]]
    rows = [[by_token[bytes(t)], str(v[0]), *(format_decimal(x, s) for x, (_, s) in
                                              zip(v[1:], attrs, strict=True))]
            for t, v in zip(got_tokens, totals.tolist(), strict=True)]
    header = ["customer_id", "holders", *(n for n, _ in attrs)]
    if out is not None:
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    data["rows"] = rows
    data["header"] = header
    data["seconds"] = time.monotonic() - t0
    return data
