"""How good this node's links to its peers are: round trip (from membership) and bandwidth.

Bandwidth is measured once per peer process (its boot nonce) by a timed, signed download of a
file a peer serves anyway (a model's tokenizer.json, ~2 MB for SmolLM2, through the shard API),
minus one round trip; a peer holding no model has its round trip only. What goes into the
profile is rounded to two significant digits, so measurement noise does not churn beacons.
"""

from __future__ import annotations

import asyncio
import logging
import time
from math import floor, log10
from urllib.parse import quote

from agent.cluster.peers import PeerClient, PeerError, base_url
from agent.cluster.state import Link, NodeProfile

log = logging.getLogger("flock.cluster")

PROBE_FILES = ("tokenizer.json", "config.json")
MIN_PROBE_BYTES = 64 * 1024  # a smaller file measures latency, not bandwidth


def rounded(value: float, digits: int = 2) -> float:
    """`value` to `digits` significant digits (0 stays 0)."""
    if value <= 0:
        return 0.0
    return round(value, digits - 1 - floor(log10(value)))


def links_from(rtts_ms: dict[str, float], mbps: dict[str, float]) -> dict[str, Link]:
    """The profile's links: every peer with a round trip, with its bandwidth when measured."""
    return {peer: Link(rtt_ms=rounded(rtt), mbps=rounded(mbps.get(peer, 0.0)))
            for peer, rtt in sorted(rtts_ms.items())}


def transfer_mbps(size_bytes: int, seconds: float, rtt_s: float) -> float:
    """Megabits/s of a download of `size_bytes` that took `seconds`, less one round trip."""
    moving = max(seconds - rtt_s, seconds * 0.1, 1e-6)
    return size_bytes * 8 / moving / 1e6


class LinkMeter:
    """Measures each peer's bandwidth once per peer process, in the background."""

    def __init__(self, client: PeerClient) -> None:
        self.client = client
        self.mbps: dict[str, float] = {}
        self._measured: dict[str, int] = {}  # node id -> boot nonce measured
        self._tasks: set[asyncio.Task[None]] = set()

    def links(self, rtts_ms: dict[str, float]) -> dict[str, Link]:
        return links_from(rtts_ms, self.mbps)

    def peer_seen(self, peer: NodeProfile, boot_nonce: int = 0) -> None:
        """Schedule a measurement of `peer` unless this process of it was measured already."""
        if self._measured.get(peer.node_id) == boot_nonce or not peer.addresses or not peer.models:
            return
        self._measured[peer.node_id] = boot_nonce
        task = asyncio.get_running_loop().create_task(self._measure(peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _measure(self, peer: NodeProfile) -> None:
        base = base_url(peer.addresses[0], peer.api_port)
        for model in peer.models:
            for name in PROBE_FILES:
                url = f"{base}/cluster/models/{quote(model, safe='')}/files/{name}"
                try:
                    _, rtt = await self.client.get_profile(base)
                    start = time.perf_counter()
                    answer = await self.client.request("GET", url, timeout_s=30.0)
                    seconds = time.perf_counter() - start
                except PeerError as exc:
                    log.debug("bandwidth probe of %s failed: %s", peer.name, exc)
                    return
                if answer.status_code == 200 and len(answer.content) >= MIN_PROBE_BYTES:
                    self.mbps[peer.node_id] = transfer_mbps(len(answer.content), seconds, rtt)
                    log.info("link to %s: %.0f Mbit/s (%d bytes in %.1f ms)", peer.name,
                             self.mbps[peer.node_id], len(answer.content), seconds * 1e3)
                    return
