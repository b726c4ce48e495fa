"""Counters for the fault tests, printed at the end of the run (conftest.py).

`make soak` runs the same tests with the full counts (ZEROSUM_SOAK=1)."""

from __future__ import annotations

import os
from collections import Counter

FULL = os.environ.get("ZEROSUM_SOAK") == "1"
KILLS = 100 if FULL else 6
BROKER_RESTARTS = 5 if FULL else 1
DUPLICATE_ROUNDS = 20 if FULL else 3
LEADER_KILLS = 20 if FULL else 2  # kill -9 of an inbox's leader node on the 3-node cluster
ROLLING_RESTARTS = 3 if FULL else 1  # passes of kill -9 + restart over every node
QUORUM_LOSSES = 5 if FULL else 1  # two of three nodes down, then back

COUNTERS: Counter[str] = Counter()
ORDER = ("kills survived", "broker restarts", "cluster node kills", "quorum losses",
         "agents stopped while Kafka away",
         "duplicates injected", "hostile inputs tried",
         "rounds checked", "rounds aborted (typed)", "rounds lost", "wrong totals")
