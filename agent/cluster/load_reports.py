"""Replica loads across the cluster: every node asks every peer for its heads' measured loads
(`GET /cluster/load`, signed) twice a second and hands them to its router, which routes on them;
the leader's scale-on-load decisions read the same loads.
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
_decoder = msgspec.json.Decoder(list[ReplicaLoad])


class LoadReports:
    def __init__(self, client: PeerClient, router: Router,
                 peers: Callable[[], list[NodeProfile]], *, interval_s: float = POLL_S) -> None:
        self.client = client
        self.router = router
        self.peers = peers
        self.interval_s = interval_s

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(p) for p in self.peers()))

    async def _poll(self, peer: NodeProfile) -> None:
        asked = time.monotonic()
        try:
            response = await self.client.request(
                "GET", base_url(peer.addresses[0], peer.api_port) + LOAD_PATH,
                timeout_s=max(0.5, self.interval_s * 2))
            if response.status_code != 200:
                return
            loads = _decoder.decode(response.content)
        except (PeerError, msgspec.DecodeError) as exc:
            log.debug("no load report from %s: %s", peer.name, exc)
            return
        # Measured somewhere during the round trip: its middle is the best guess.
        self.router.take_reports(loads, received_at=(asked + time.monotonic()) / 2)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:
                log.exception("load poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.05, self.interval_s - (
                    time.monotonic() - started)))
