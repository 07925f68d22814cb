"""Replica loads across the cluster: every node asks every peer for its heads' measured loads
(`GET /cluster/load`, signed) and hands them to its router, which routes on them; the leader's
scale-on-load decisions read the same loads.

Twice a second while the cluster is busy (a request ran anywhere within `BUSY_WINDOW_S`, as
this node's books or the last reports say), every `IDLE_POLL_S` while it is idle: an idle
cluster's reports stay fresh (well inside the router's `REPORT_STALE_S`) for the first request
of a burst, whose followers the router counts itself until the next report, and an idle agent
does not spend a core's percent on polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from agent.cluster.peers import PeerClient, PeerError, base_url
from agent.cluster.state import NodeProfile
from agent.serving.balance import ReplicaLoad
from agent.serving.router import Router

log = logging.getLogger("flock.cluster")

LOAD_PATH = "/cluster/load"
POLL_S = 0.5
IDLE_POLL_S = 2.0
BUSY_WINDOW_S = 10.0
_decoder = msgspec.json.Decoder(list[ReplicaLoad])


def load_busy(load: ReplicaLoad) -> bool:
    """Whether a head had work when measured, or got a request within BUSY_WINDOW_S."""
    return bool(load.running or load.queued or load.in_flight) or (
        load.requests_total > 0 and load.idle_s < BUSY_WINDOW_S)


class LoadReports:
    def __init__(self, client: PeerClient, router: Router,
                 peers: Callable[[], list[NodeProfile]], *, interval_s: float = POLL_S,
                 idle_interval_s: float = IDLE_POLL_S) -> None:
        self.client = client
        self.router = router
        self.peers = peers
        self.interval_s = interval_s
        self.idle_interval_s = max(interval_s, idle_interval_s)
        self._peers_busy = False  # the last round's reports showed work somewhere

    def next_interval_s(self) -> float:
        """How long until the next round: short while this node or a peer has work."""
        busy = self._peers_busy or self.router.busy_within(BUSY_WINDOW_S)
        return self.interval_s if busy else self.idle_interval_s

    async def poll_once(self) -> None:
        busy = await asyncio.gather(*(self._poll(p) for p in self.peers()))
        self._peers_busy = any(busy)

    async def _poll(self, peer: NodeProfile) -> bool:
        """Takes `peer`'s report; whether it shows work (True when unknown: stay watchful)."""
        asked = time.monotonic()
        try:
            response = await self.client.request(
                "GET", base_url(peer.addresses[0], peer.api_port) + LOAD_PATH,
                timeout_s=max(0.5, self.interval_s * 2))
            if response.status_code != 200:
                return True
            loads = _decoder.decode(response.content)
        except (PeerError, msgspec.DecodeError) as exc:
            log.debug("no load report from %s: %s", peer.name, exc)
            return True
        # Measured somewhere during the round trip: its middle is the best guess.
        self.router.take_reports(loads, received_at=(asked + time.monotonic()) / 2)
        return any(load_busy(load) for load in loads)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:
                log.exception("load poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.05, self.next_interval_s() - (
                    time.monotonic() - started)))
