"""Finding the other nodes: signed UDP beacons by multicast (broadcast as a fallback) on the
allowed interfaces, and HTTP probes of static peers from cluster.toml where multicast cannot go.

Every `interval_s` a node sends one small msgpack beacon per allowed address: cluster name and
tag, node id, version, boot nonce, its profile, and echoes of the beacons it heard since its last
one (how long it held each), from which the original sender computes the link RTT without any
extra packets. Beacons of another cluster, with a bad signature, or from an incompatible version
are not admitted (the last are reported for status).

This module is the beacon loop (`Discovery`): when to beacon, echo and duplicate bookkeeping,
identity clashes, and turning admitted beacons into sightings. Its parts, each with one job:
interfaces.py (which addresses, from `interfaces`: names, CIDRs or single addresses; the default
is every up, non-loopback IPv4 interface), beacon.py (the wire format and its checks, pure),
udp.py (sockets and confinement), static_peers.py (HTTP probes) and discovery_probe.py (a CLI
running discovery alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from agent.cluster.auth import REPLAY_WINDOW_S, cluster_tag
from agent.cluster.beacon import (
    ECHO_ID_CHARS,
    PROTO,
    Beacon,
    Echo,
    decode_beacon,
    encode_beacon,
    fit_beacon,
)
from agent.cluster.identity import IdClaim, NodeIdentity, rekey, resolve_id_clash
from agent.cluster.interfaces import (
    LocalAddress,
    list_local_addresses,
    parse_allow,
    select_addresses,
)
from agent.cluster.membership import IncompatibleSighting, Sighting, lenient_profile
from agent.cluster.state import NodeProfile
from agent.cluster.static_peers import StaticPeers
from agent.cluster.udp import UdpTransport, WarnOnce

# The controller and tests import these from here; each lives in the module of its job.
__all__ = ["DEFAULT_GROUP", "DEFAULT_PORT", "PROTO", "Beacon", "Discovery", "DiscoveryConfig",
           "StaticPeers", "encode_beacon"]

log = logging.getLogger("flock.discovery")

DEFAULT_GROUP = "239.77.52.41"  # organisation-local scope (239/8): never routed off-site
DEFAULT_PORT = 52416


@dataclass(frozen=True)
class DiscoveryConfig:
    """What discovery needs from the node's settings and cluster spec."""

    cluster: str = "flock"
    secret: str | None = None
    interfaces: tuple[str, ...] = ()  # names, CIDRs or addresses; empty: every up non-loopback
    group: str = DEFAULT_GROUP
    port: int = DEFAULT_PORT
    interval_s: float = 1.0
    multicast: bool = True
    broadcast: bool = True
    window_s: float = REPLAY_WINDOW_S
    ttl: int = 1  # one hop: beacons never cross a router

    def __post_init__(self) -> None:
        if not IPv4Address(self.group).is_multicast:
            raise ValueError(f"discovery group {self.group} is not an IPv4 multicast address")
        if self.interval_s <= 0:
            raise ValueError("discovery interval must be positive")
        if not (self.multicast or self.broadcast):
            raise ValueError("enable multicast, broadcast or both")
        parse_allow(self.interfaces)  # fail at start, not at the first beacon

    @property
    def tag(self) -> str:
        return cluster_tag(self.secret, self.cluster)


@dataclass
class _PeerTrack:
    boot_nonce: int
    seq: int
    heard_at: float  # monotonic; for the echo's held time
    pending_echo: bool = True
    echoed_at: float = 0.0


SightingCallback = Callable[[Sighting], None]
IncompatibleCallback = Callable[[IncompatibleSighting], None]
RekeyCallback = Callable[[NodeIdentity], None]


@dataclass
class Discovery:
    """Sends this node's beacons and turns other nodes' beacons into sightings.

    `profile()` is called once per beacon for the node's current profile; its node_id and
    addresses are overwritten with discovery's own (the identity may be re-keyed; the addresses
    are the ones beacons go out on). Callbacks run on the event loop and must not block.
    """

    config: DiscoveryConfig
    identity: NodeIdentity
    profile: Callable[[], NodeProfile]
    on_sighting: SightingCallback
    on_incompatible: IncompatibleCallback | None = None
    on_rekey: RekeyCallback | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    list_addresses: Callable[[], list[LocalAddress]] = list_local_addresses
    stats: Counter[str] = field(default_factory=Counter)

    _udp: UdpTransport = field(init=False)
    _warn_once: WarnOnce = field(default_factory=WarnOnce, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _seq: int = field(default=0, init=False)
    _sent_at: dict[int, float] = field(default_factory=dict, init=False)
    _peers: dict[str, _PeerTrack] = field(default_factory=dict, init=False)
    _last_beacon: float = field(default=float("-inf"), init=False)
    _version: str = field(default="", init=False)

    def __post_init__(self) -> None:
        c = self.config
        self._udp = UdpTransport(c.group, c.port, c.ttl, c.multicast, c.broadcast,
                                 on_datagram=self._received, stats=self.stats,
                                 warn=self._warn_once)

    @property
    def addresses(self) -> list[LocalAddress]:
        return self._udp.addresses

    async def start(self) -> None:
        if self._task is not None:
            return
        if not self.config.secret:
            log.warning(
                "open mode: no cluster secret, so any host on these networks can join cluster "
                "%r; set one (flock init) to authenticate members", self.config.cluster,
            )
        self._version = self.profile().version
        await self._udp.open()
        self._refresh_addresses()
        if not self._udp.addresses:
            log.warning("discovery: no interface matches %s; beacons wait for one",
                        list(self.config.interfaces) or "auto")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flock-discovery")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._udp.close()

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _refresh_addresses(self) -> None:
        """Follow interfaces coming, going and changing addresses (DHCP, Wi-Fi, cables)."""
        try:
            selected = select_addresses(self.list_addresses(), self.config.interfaces)
        except OSError as e:
            log.warning("discovery: cannot list interfaces: %s", e)
            return
        self._udp.use(selected)

    # -- sending --

    async def _run(self) -> None:
        interval = self.config.interval_s
        while not self._stop.is_set():
            try:
                self._refresh_addresses()
                self._send_beacon()
                self._forget_quiet_peers()
            except Exception:  # a failing profile() or netifaces must not end discovery
                log.exception("discovery: beacon round failed; retrying next interval")
            self._wake.clear()
            # Jitter keeps nodes started together from beaconing in lockstep.
            delay = interval * random.uniform(0.9, 1.1)
            deadline = self.clock() + delay
            while not self._stop.is_set():
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                waiters = [asyncio.ensure_future(self._stop.wait()),
                           asyncio.ensure_future(self._wake.wait())]
                try:
                    await asyncio.wait(waiters, timeout=remaining,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                if self._wake.is_set() and self.clock() - self._last_beacon >= interval / 5:
                    break  # a newcomer: answer early so it learns of us (and our echo) fast
                self._wake.clear()

    def _send_beacon(self) -> None:
        addresses = self._udp.addresses
        if not addresses:
            return
        now = self.clock()
        profile = self.profile().model_copy(update={
            "node_id": self.identity.node_id,
            "addresses": [a.address for a in addresses],
        })
        self._seq += 1
        beacon = Beacon(
            proto=PROTO, cluster=self.config.cluster, tag=self.config.tag,
            node_id=self.identity.node_id, version=profile.version, sent_at=self.wall(),
            boot_nonce=self.identity.boot_nonce, fingerprint=self.identity.fingerprint,
            seq=self._seq, api_port=profile.api_port, addresses=list(profile.addresses),
        )
        self._version = profile.version
        data, sent = fit_beacon(beacon, profile, self._echoes(now), self.config.secret)
        for echo in sent.echoes:
            for node_id, track in self._peers.items():
                if node_id.startswith(echo.node) and track.seq == echo.seq:
                    track.pending_echo = False
                    track.echoed_at = now
        self._udp.send(data)
        self._sent_at[self._seq] = now
        if len(self._sent_at) > 64:
            del self._sent_at[min(self._sent_at)]
        self._last_beacon = now

    def _forget_quiet_peers(self) -> None:
        # Echo and duplicate bookkeeping only matters for peers still beaconing.
        horizon = self.clock() - max(60.0, 20 * self.config.interval_s)
        for node_id in [n for n, t in self._peers.items() if t.heard_at < horizon]:
            del self._peers[node_id]

    def _echoes(self, now: float) -> list[Echo]:
        pending = [(t.echoed_at, node_id, t) for node_id, t in self._peers.items()
                   if t.pending_echo]
        pending.sort(key=lambda item: item[0])  # least recently echoed first: all get a turn
        return [Echo(node_id[:ECHO_ID_CHARS], t.seq, max(0, int((now - t.heard_at) * 1e6)))
                for _, node_id, t in pending]

    # -- receiving --

    def _received(self, data: bytes, source: str) -> None:
        """One datagram from inside the selected networks (the transport drops the rest)."""
        now = self.clock()
        verdict = decode_beacon(
            data, tag=self.config.tag, secret=self.config.secret,
            version=self._version, now=self.wall(), window_s=self.config.window_s,
        )
        self.stats[verdict.kind] += 1
        header = verdict.header
        if verdict.kind == "unauthenticated":
            self._warn_once(f"auth {source}",
                            "discovery: dropped beacon from %s claiming cluster %r: %s",
                            source, self.config.cluster, verdict.reason)
            return
        if verdict.kind == "incompatible" and header is not None:
            if header.node_id != self.identity.node_id and self.on_incompatible is not None:
                self.on_incompatible(IncompatibleSighting(
                    header.node_id, header.version, header.proto, list(header.addresses), source,
                ))
            return
        beacon = verdict.beacon
        if verdict.kind != "ok" or beacon is None:
            return
        claim = IdClaim(beacon.node_id, beacon.fingerprint, beacon.boot_nonce)
        clash = resolve_id_clash(self.identity.claim, claim)
        if clash == "self":
            self.stats["self"] += 1
            return
        if clash == "keep":
            self._warn_once(f"clash {beacon.boot_nonce}",
                            "discovery: %s also claims our node id %s; it re-keys, we keep it",
                            source, beacon.node_id)
            return
        if clash == "rekey":
            self._rekey(f"{source} claims the same id with a larger boot nonce")
            return
        track = self._peers.get(beacon.node_id)
        if track is not None and track.boot_nonce == beacon.boot_nonce and \
                beacon.seq <= track.seq:
            self.stats["duplicate"] += 1  # the same beacon by another path, or a replay
            return
        rtt = self._rtt_from(beacon, now)
        self._peers[beacon.node_id] = _PeerTrack(
            beacon.boot_nonce, beacon.seq, now,
            echoed_at=track.echoed_at if track is not None else 0.0,
        )
        if track is None:
            self._wake.set()
        try:
            profile = lenient_profile(beacon.profile)
        except ValueError as e:
            self.stats["bad_profile"] += 1
            self._warn_once(f"profile {beacon.node_id}", "discovery: bad profile from %s: %s",
                            source, e)
            return
        if profile.node_id != beacon.node_id:
            self.stats["bad_profile"] += 1
            return
        self.on_sighting(Sighting(
            profile=profile, boot_nonce=beacon.boot_nonce, source=source, via="beacon",
            rtt_s=rtt, partial=beacon.partial, detail_digest=beacon.detail,
        ))

    def _rtt_from(self, beacon: Beacon, now: float) -> float | None:
        prefix = self.identity.node_id[:ECHO_ID_CHARS]
        for echo in beacon.echoes:
            if echo.node == prefix and echo.seq in self._sent_at:
                return max(0.0, now - self._sent_at[echo.seq] - echo.held_us / 1e6)
        return None

    def _rekey(self, reason: str) -> None:
        self.identity = rekey(self.identity, reason)
        self._sent_at.clear()  # echoes addressed to the old id prefix mean nothing now
        self.stats["rekeyed"] += 1
        if self.on_rekey is not None:
            self.on_rekey(self.identity)
        self._wake.set()
