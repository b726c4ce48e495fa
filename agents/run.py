"""Running agents (with their local API and app bus), signals, logging, and the `round`
command's client."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents.agent import SUBMIT_MARGIN_S, Agent
from agents.api import ApiServer, ApiSettings, RoundScheduler
from agents.api.agent_service import AgentService
from agents.api.appbus import AppBridge
from agents.config import PartyConfig, load_party
from agents.data import load_query
from agents.health import KafkaWatch
from agents.kafka_client import quiet_aiokafka
from protocol.messages import Scope
from zerosum.results import RoundResult


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an exception's traceback goes in `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_aiokafka()


async def serve_party(agent: Agent, *, api: bool = True) -> None:
    """Run `agent` until `agent.stop()`: for an institution, with its local API (unless not
    `api`) and, when its TOML has [app], its application bus, both started once the agent is
    ready and stopped with it. A socket or bus that cannot start stops the agent too."""
    cfg = agent.cfg
    servers: list[ApiServer | AppBridge] = []
    if not cfg.is_coordinator and (api or cfg.app is not None):
        scheduler = RoundScheduler(AgentService(agent), cfg.consortium.policy.max_in_flight)
        if api:
            servers.append(ApiServer(scheduler, ApiSettings(
                cfg.api_socket, tcp_port=cfg.api.tcp_port, token=cfg.api.token),
                log=logging.getLogger(f"zerosum.{cfg.party}.api")))
        if cfg.app is not None:
            servers.append(AppBridge(scheduler, cfg.app, id_key=cfg.keys.secret,
                                     log=logging.getLogger(f"zerosum.{cfg.party}.appbus")))
    failed: list[Exception] = []
    try:
        await _serve(agent, servers, failed)
    except BaseExceptionGroup as group:  # what stopped the agent, as callers expect it
        raise group.exceptions[0] from None
    if failed:
        raise failed[0]


async def _serve(agent: Agent, servers: list[ApiServer | AppBridge],
                 failed: list[Exception]) -> None:
    cfg = agent.cfg

    def stop_servers(_: object = None) -> None:
        for s in servers:
            s.stop()

    async def door(server: ApiServer | AppBridge) -> None:
        """A door that fails stops the agent gracefully (never cancelled mid-produce)."""
        try:
            await server.run()
        except Exception as exc:
            failed.append(exc)
            agent.stop()

    async with asyncio.TaskGroup() as tg:
        running = tg.create_task(agent.run())
        running.add_done_callback(stop_servers)
        ready = tg.create_task(agent.ready.wait())
        await asyncio.wait({ready, running}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not running.done():
            opening = [tg.create_task(door(s)) for s in servers]
            started = tg.create_task(_all_set([s.started for s in servers]))
            await asyncio.wait({running, *opening, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if not failed and not running.done():
                doors = [f"API on {cfg.api_socket}" if isinstance(s, ApiServer) else
                         f"app bus on {cfg.app.requests_topic if cfg.app else ''}"
                         for s in servers]
                agent.serving.set()  # the line below is what process managers wait for
                agent.log.info("%s serving%s", cfg.party,
                               f": {', '.join(doors)}" if doors else "")


async def _all_set(events: list[asyncio.Event]) -> None:
    for e in events:
        await e.wait()


@contextlib.asynccontextmanager
async def agents_in_process(configs: list[PartyConfig], ready_s: float = 120, *,
                            api: bool = False) -> AsyncIterator[dict[str, Agent]]:
    """Run several agents as tasks of this event loop (demo, bench, tests), institutions with
    their local API when `api`; stop them all on exit, each finishing the batch in hand."""
    agents = {c.party: Agent(c) for c in configs}
    tasks = [asyncio.create_task(serve_party(a, api=api), name=n) for n, a in agents.items()]
    watch = KafkaWatch(configs[0].kafka.bootstrap) if configs else None
    watcher = asyncio.create_task(watch.run()) if watch else None
    try:
        async with asyncio.timeout(ready_s):
            for a, t in zip(agents.values(), tasks, strict=True):
                waiter = asyncio.create_task(a.serving.wait())
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
    agent.kafka_watch = watch
    watcher = asyncio.create_task(watch.run())
    try:
        await serve_party(agent)
    finally:
        watch.stop()
        await watcher


class RoundFailed(Exception):
    """The round ended in an abort (or an error); the message carries the reason."""


def request_round(cfg: PartyConfig, query: Path, *, scope: Scope, out: Path | None,
                  participants: tuple[str, ...] | None, min_holders: int | None,
                  timeout_s: float | None, progress_s: float = 5.0) -> dict[str, Any]:
    """Ask this institution's running agent, through its local API, for a round over the
    customers of `query` and wait for it; write the totals to `out` when given."""
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
    print(f"round: {len(ids)} customers, {len(parts)} institutions, scope {scope}",
          file=sys.stderr)
    t0 = time.monotonic()
    result = asyncio.run(_ask(cfg, ids, scope=scope, participants=parts, min_holders=holders,
                              deadline_s=timeout, progress_s=progress_s))
    names = list(result.attributes)
    rows = [[row.customer_id or row.token, str(row.holders),
             *(format(row.totals[n], "f") for n in names)] for row in result.rows]
    header = ["customer_id", "holders", *names]
    if out is not None:
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return {"status": "published", "round_id": result.round_id, "withheld": result.withheld,
            "rows": rows, "header": header, "seconds": time.monotonic() - t0}


async def _ask(cfg: PartyConfig, ids: list[str], *, scope: Scope, participants: tuple[str, ...],
               min_holders: int, deadline_s: float, progress_s: float) -> RoundResult:
    """One round through the agent's API, with a line on stderr every `progress_s`. The agent
    bounds its own wait (the deadline, then a margin); this bounds the client's."""
    from zerosum import ApiError, Client, RequestRefused, RoundAborted

    socket = cfg.api_socket
    t0 = time.monotonic()
    try:
        async with Client(socket) as client:
            asking = asyncio.create_task(client.round(
                ids, scope="query" if scope is Scope.QUERY else "intersection",
                participants=participants, min_holders=min_holders, deadline_s=deadline_s))
            async with asyncio.timeout(deadline_s + 2 * SUBMIT_MARGIN_S):
                while not asking.done():
                    await asyncio.wait({asking}, timeout=progress_s)
                    if not asking.done():
                        print(f"  waiting for the result ({time.monotonic() - t0:.0f} s)",
                              file=sys.stderr)
            result = asking.result()
            print(f"round {result.round_id}", file=sys.stderr)
            return result
    except RoundAborted as exc:
        raise RoundFailed(f"round aborted: {exc.reason}: {exc.detail}") from exc
    except RequestRefused as exc:
        raise RoundFailed(f"the agent refused the round: {exc}") from exc
    except TimeoutError as exc:
        raise RoundFailed(f"no result after {time.monotonic() - t0:.0f} s") from exc
    except (OSError, ApiError) as exc:
        raise RoundFailed(f"cannot reach the agent's API at {socket} ({exc}); is `zerosum "
                          f"institution --config {cfg.path}` running?") from exc
