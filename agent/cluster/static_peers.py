"""Static peers: the [[nodes]] addresses of cluster.toml, probed over signed HTTP where
multicast cannot reach (routed networks, VPNs, clouds). Each answer becomes a sighting, like a
beacon's, with the request's round trip as its RTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.cluster.membership import Sighting
from agent.cluster.peers import PeerClient, PeerError, base_url

log = logging.getLogger("flock.discovery")

SightingCallback = Callable[[Sighting], None]


def parse_target(target: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or 'http://host:port' -> (host, port)."""
    text = target.strip()
    if "://" in text:
        text = text.split("://", 1)[1].rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


@dataclass
class StaticPeers:
    """Probes the [[nodes]] addresses of cluster.toml over HTTP, where multicast cannot reach
    (routed networks, VPNs, clouds): each answer is a sighting with the request's RTT."""

    targets: Sequence[str]
    client: PeerClient
    cluster: str
    on_sighting: SightingCallback
    self_id: Callable[[], str]
    default_port: int = 52415
    interval_s: float = 1.0
    _down: set[str] = field(default_factory=set, init=False)

    async def probe_once(self) -> list[Sighting]:
        results = await asyncio.gather(*(self._probe(t) for t in self.targets))
        sightings = [s for s in results if s is not None]
        for s in sightings:
            self.on_sighting(s)
        return sightings

    async def _probe(self, target: str) -> Sighting | None:
        try:
            host, port = parse_target(target, self.default_port)
        except ValueError:
            self._mark_down(target, "not host[:port]")
            return None
        try:
            reply, rtt = await self.client.get_profile(base_url(host, port))
        except PeerError as e:
            self._mark_down(target, str(e))
            return None
        if reply.cluster != self.cluster:
            self._mark_down(target, f"belongs to cluster {reply.cluster!r}")
            return None
        if reply.profile.node_id == self.self_id():
            return None  # our own address in the static list
        if target in self._down:
            self._down.discard(target)
            log.info("static peer %s answers again", target)
        return Sighting(profile=reply.profile, boot_nonce=reply.boot_nonce, source=host,
                        via="static", rtt_s=rtt)

    def _mark_down(self, target: str, why: str) -> None:
        if target not in self._down:
            self._down.add(target)
            log.info("static peer %s unreachable: %s", target, why)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.probe_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
