"""What an agent tells Prometheus: rounds, stages, messages, bytes, lag, journal, data.

One `AgentMetrics` per agent, on its own registry (several agents may share a process: the demo,
the tests), served over HTTP on `metrics_port` when the operator asks for it. Names follow the
Prometheus conventions: the `zerosum_` prefix, base units (seconds, bytes), `_total` counters.
No label carries a customer, a round id or any figure of a round: only outcomes, abort reasons,
rejection reasons, stage names and the agent's own party and role.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

# a credit check takes tens of milliseconds, a 10M-customer round minutes
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)
MAX_TRACKED_ROUNDS = 100_000  # rounds whose start is remembered for their duration


class AgentMetrics:
    """The agent's counters, gauges and histograms; `serve()` exposes them."""

    def __init__(self, party: str, role: str, version: str, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.version = version
        r = self.registry
        Info("zerosum_agent", "The agent: its party, role and version.", registry=r).info(
            {"party": party, "role": role, "version": version})
        self.rounds = Counter("zerosum_rounds", "Rounds this agent saw end, by outcome "
                              "(published, result, aborted) and abort reason.",
                              ["outcome", "reason"], registry=r)
        self.round_seconds = Histogram("zerosum_round_duration_seconds",
                                       "From the round's first input here to its end here.",
                                       ["outcome"], buckets=DURATION_BUCKETS, registry=r)
        self.stage_seconds = Histogram("zerosum_stage_duration_seconds",
                                       "From the round's first input here to each message "
                                       "this agent sent for it, by message kind.",
                                       ["stage"], buckets=DURATION_BUCKETS, registry=r)
        self.in_flight = Gauge("zerosum_rounds_in_flight", "Rounds open at this agent.",
                               registry=r)
        self.received = Counter("zerosum_messages_received", "Envelopes read from the inbox.",
                                registry=r)
        self.received_bytes = Counter("zerosum_received_bytes",
                                      "Bytes of envelopes read from the inbox.", registry=r)
        self.rejected = Counter("zerosum_messages_rejected",
                                "Inputs refused, by the typed error's name.", ["reason"],
                                registry=r)
        self.duplicates = Counter("zerosum_messages_duplicate",
                                  "Exact copies of envelopes already handled (dropped).",
                                  registry=r)
        self.sent = Counter("zerosum_messages_sent", "Envelopes produced and acknowledged.",
                            registry=r)
        self.sent_bytes = Counter("zerosum_sent_bytes",
                                  "Bytes of envelopes produced and acknowledged.", registry=r)
        self.lag = Gauge("zerosum_consumer_lag_messages",
                         "Records in the inbox beyond what this agent has handled.", registry=r)
        self.outbox_pending = Gauge("zerosum_outbox_pending_messages",
                                    "Envelopes journaled and not yet acknowledged.", registry=r)
        self.snapshot_rows = Gauge("zerosum_data_snapshot_rows",
                                   "Customers in the data snapshot in use.", registry=r)
        self.snapshot_loaded = Gauge("zerosum_data_snapshot_loaded_timestamp_seconds",
                                     "When the data snapshot in use was loaded (Unix time).",
                                     registry=r)
        self.snapshot_age = Gauge("zerosum_data_snapshot_age_seconds",
                                  "Seconds since the data snapshot in use was loaded.",
                                  registry=r)
        self.snapshot_age.set_function(self._snapshot_age)
        self.data_errors = Counter("zerosum_data_load_errors",
                                   "Data files that could not be loaded (the last good "
                                   "snapshot stays in use).", registry=r)
        self._loaded_at: float | None = None
        self._started: dict[bytes, float] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- rounds ------------------------------------------------------------------------------
    def round_opened(self, round_id: bytes) -> None:
        if round_id in self._started or len(self._started) >= MAX_TRACKED_ROUNDS:
            return
        self._started[round_id] = self.clock()
        self.in_flight.set(len(self._started))

    def stage(self, round_id: bytes, stage: str) -> None:
        started = self._started.get(round_id)
        if started is not None:
            self.stage_seconds.labels(stage).observe(max(self.clock() - started, 0.0))

    def round_ended(self, round_id: bytes, outcome: str, reason: str = "") -> None:
        self.rounds.labels(outcome, reason).inc()
        started = self._started.pop(round_id, None)
        self.in_flight.set(len(self._started))
        if started is not None:
            self.round_seconds.labels(outcome).observe(max(self.clock() - started, 0.0))

    # -- data --------------------------------------------------------------------------------
    def snapshot(self, rows: int) -> None:
        self._loaded_at = self.clock()
        self.snapshot_rows.set(rows)
        self.snapshot_loaded.set(self._loaded_at)

    @property
    def snapshot_loaded_at(self) -> float | None:
        """When the data snapshot in use was loaded (Unix time), if one was."""
        return self._loaded_at

    def _snapshot_age(self) -> float:
        return 0.0 if self._loaded_at is None else max(self.clock() - self._loaded_at, 0.0)

    # -- exposition --------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on addr:port (0: a free port) in a thread; returns the port."""
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        return int(self._server.server_port)

    @property
    def port(self) -> int | None:
        """The port /metrics is served on, while it is."""
        return None if self._server is None else int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
