"""What differs between the coordinator's agent and an institution's, behind one small surface
the `Agent` uses: the party it drives, a new policy, the data snapshot (an institution's), and
the requests (only an institution asks for rounds).
"""

from __future__ import annotations

import asyncio
import os

from agents.config import PartyConfig
from agents.data import Snapshot
from agents.metrics import AgentMetrics
from protocol.envelope import Chain
from protocol.party import CoordinatorParty, InstitutionParty
from protocol.policy import ConsortiumPolicy


class CoordinatorRole:
    name = "coordinator"
    snapshot: Snapshot | None = None  # the coordinator holds no data

    def __init__(self, cfg: PartyConfig, chain: Chain, metrics: AgentMetrics) -> None:
        c = cfg.consortium
        self.party = CoordinatorParty(cfg.keys, c.registry, c.id, c.round_policy(), chain=chain)

    def set_policy(self, policy: ConsortiumPolicy) -> None:
        self.party.policy = policy

    async def refresh_data(self) -> None:
        pass

    def requester(self) -> InstitutionParty:
        raise TypeError("only an institution requests rounds")


class InstitutionRole:
    name = "institution"

    def __init__(self, cfg: PartyConfig, chain: Chain, metrics: AgentMetrics) -> None:
        c = cfg.consortium
        assert cfg.data is not None
        assert cfg.consortium_key is not None
        self.metrics = metrics
        self._data_seen = (0, 0)  # the snapshot's (loads, errors) the metrics have counted
        # None: the table stays as it was set (a test's hostile member)
        self.snapshot: Snapshot | None = Snapshot(
            cfg.data, c.attributes, cfg.consortium_key, epoch=cfg.token_epoch,
            earlier_keys=cfg.earlier_token_keys)
        self.party = InstitutionParty(cfg.keys, c.registry, c.id, coordinator=c.coordinator,
                                      table=self.snapshot.refresh(), policy=c.round_policy(),
                                      chain=chain)
        self.party.set_table(self.snapshot.refresh(), cfg.token_epoch, self.snapshot.earlier)
        self._count_data()

    def set_policy(self, policy: ConsortiumPolicy) -> None:
        self.party.policy = policy
        self.party.attributes = policy.attributes

    async def refresh_data(self) -> None:
        """The data file, read again when it changed (between batches of inputs). A changed
        file is read and tokenised in a thread: a large reload does not stall the event loop
        (the API, the timers, the other agents of the process) while the agent holds its
        lock. The unchanged case is one stat, here."""
        snap = self.snapshot
        if snap is None:
            return
        try:
            st = os.stat(snap.path)
            changed = (st.st_mtime_ns, st.st_size) != snap.stamp
        except OSError:
            changed = True  # `refresh` says why, and keeps the last good snapshot
        if changed:
            table = await asyncio.to_thread(snap.refresh)
            self.party.set_table(table, snap.epoch, snap.earlier)
            self._count_data()

    def _count_data(self) -> None:
        snap = self.snapshot
        if snap is None or (snap.loads, snap.errors) == self._data_seen:
            return
        if snap.loads != self._data_seen[0] and snap.table is not None:
            self.metrics.snapshot(len(snap.table))
        self.metrics.data_errors.inc(snap.errors - self._data_seen[1])
        self._data_seen = (snap.loads, snap.errors)

    def requester(self) -> InstitutionParty:
        return self.party


Role = CoordinatorRole | InstitutionRole
