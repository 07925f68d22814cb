"""Finding the other nodes: signed UDP beacons by multicast (broadcast as a fallback) on the
allowed interfaces, and HTTP probes of static peers from cluster.toml where multicast cannot go.

Every `interval_s` a node sends one small msgpack beacon per allowed address: cluster name and
tag, node id, version, boot nonce, its profile, and echoes of the beacons it heard since its last
one (how long it held each), from which the original sender computes the link RTT without any
extra packets. Beacons of another cluster, with a bad signature, or from an incompatible version
are not admitted (the last are reported for status).

Confinement: beacons leave only through sockets bound to the selected addresses, with
IP_MULTICAST_IF set to them and TTL 1, and multicast groups are joined only there; datagrams whose
source lies outside the selected networks are dropped. `interfaces` picks the addresses (names,
CIDRs or single addresses); the default is every up, non-loopback IPv4 interface. Loopback works
for several agents on one machine: multicast on `lo` with IP_MULTICAST_LOOP delivers to every
socket that joined on 127.0.0.1, and SO_REUSEPORT lets them all bind the one port (verified on
Linux 6.x and in network namespaces; macOS's lo0 is multicast-capable too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import random
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

import msgspec
import netifaces

from agent.cluster.auth import REPLAY_WINDOW_S, cluster_tag, sign, verify
from agent.cluster.identity import IdClaim, NodeIdentity, rekey, resolve_id_clash
from agent.cluster.membership import (
    DETAIL_FIELDS,
    IncompatibleSighting,
    Sighting,
    detail_digest,
    lenient_profile,
)
from agent.cluster.peers import PeerClient, PeerError, base_url
from agent.cluster.state import NodeProfile

log = logging.getLogger("flock.discovery")

DEFAULT_GROUP = "239.77.52.41"  # organisation-local scope (239/8): never routed off-site
DEFAULT_PORT = 52416
PROTO = 1  # beacon wire protocol; a different one is incompatible whatever the version says
MAGIC = b"FLK1"
# One Ethernet frame (1500) minus IP and UDP headers, with margin for tunnels: no fragmentation,
# which multicast over Wi-Fi handles badly.
MAX_DATAGRAM = 1400
ECHO_ID_CHARS = 8  # echoes name their target by a prefix of its id: a rare collision costs one RTT
BEACON_CONTEXT = "beacon"


# -- configuration --------------------------------------------------------------------------


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


# -- interfaces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalAddress:
    interface: str
    address: str
    network: IPv4Network
    broadcast: str | None

    @property
    def loopback(self) -> bool:
        return IPv4Address(self.address).is_loopback


def list_local_addresses() -> list[LocalAddress]:
    """Every IPv4 address on this host, with its network and broadcast address (netifaces)."""
    found: list[LocalAddress] = []
    for name in netifaces.interfaces():
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            addr = entry.get("addr")
            if not addr:
                continue
            netmask = entry.get("netmask") or "255.255.255.255"
            try:
                network = ipaddress.ip_interface(f"{addr}/{netmask}").network
            except ValueError:
                continue
            assert isinstance(network, IPv4Network)
            found.append(LocalAddress(name, addr, network,
                                      _usable_broadcast(addr, network, entry.get("broadcast"))))
    return found


def _usable_broadcast(address: str, network: IPv4Network, broadcast: str | None) -> str | None:
    """The interface's broadcast address, or None where it has none.

    getifaddrs reports the address itself (or the peer's, on point-to-point links) when no
    broadcast address is configured; sending "broadcasts" there would only talk to ourselves.
    """
    if not broadcast or broadcast == address:
        return None
    try:
        ip = IPv4Address(broadcast)
    except ValueError:
        return None
    if ip == IPv4Address("255.255.255.255"):
        return None  # limited broadcast leaves by whatever interface the OS picks: unconfined
    return broadcast if ip in network and ip != network.network_address else None


_SIOCGIFFLAGS = 0xC0206911 if sys.platform == "darwin" else 0x8913
_IFF_UP = 0x1


def interface_is_up(name: str) -> bool:
    """Whether the interface is administratively up (SIOCGIFFLAGS); True when it cannot tell."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = struct.pack("16sH22x", name.encode()[:15], 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, ifreq))[1]
    except OSError:
        return True
    return bool(flags & _IFF_UP)


def parse_allow(entries: Sequence[str]) -> tuple[frozenset[str], tuple[IPv4Network, ...]]:
    """Split `interfaces` entries into interface names and networks (an address is a /32)."""
    names: set[str] = set()
    networks: list[IPv4Network] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            raise ValueError("empty entry in discovery interfaces")
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if any(c in entry for c in "/ ") or len(entry) > 15:
                raise ValueError(
                    f"discovery interface {entry!r} is neither a name nor a CIDR"
                ) from None
            names.add(entry)
            continue
        if not isinstance(net, IPv4Network):
            raise ValueError(f"discovery is IPv4 only; {entry!r} is IPv6")
        networks.append(net)
    return frozenset(names), tuple(networks)


def select_addresses(
    available: Sequence[LocalAddress],
    allow: Sequence[str],
    *,
    is_up: Callable[[str], bool] = interface_is_up,
) -> list[LocalAddress]:
    """The addresses discovery may use. Pure given `available` and `is_up`.

    With `allow` empty: every up interface's non-loopback addresses, or loopback alone when
    there are none (a laptop offline still forms a cluster of local agents).
    """
    up = [a for a in available if is_up(a.interface)]
    if allow:
        names, networks = parse_allow(allow)
        return [
            a for a in up
            if a.interface in names or any(IPv4Address(a.address) in n for n in networks)
        ]
    chosen = [a for a in up if not a.loopback]
    return chosen or [a for a in up if a.loopback]


# -- wire format ----------------------------------------------------------------------------


class Echo(msgspec.Struct, array_like=True, frozen=True):
    node: str  # first ECHO_ID_CHARS of the node id whose beacon this answers
    seq: int
    held_us: int  # how long the echoing node held it before this beacon left


class BeaconHeader(msgspec.Struct, kw_only=True, frozen=True):
    """The fields every protocol version keeps, so an incompatible node can still be named."""

    proto: int
    cluster: str
    tag: str
    node_id: str
    version: str
    sent_at: float
    boot_nonce: int = 0
    fingerprint: str = ""
    addresses: list[str] = []


class Beacon(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    proto: int
    cluster: str
    tag: str
    node_id: str
    version: str
    sent_at: float  # wall clock: the signature's freshness window
    boot_nonce: int
    fingerprint: str
    seq: int
    api_port: int
    addresses: list[str] = []
    profile: dict[str, Any] = {}
    partial: bool = False  # profile without its detail fields (too big for one datagram)
    detail: str = ""  # digest of the detail fields, full or not
    echoes: list[Echo] = []


_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder(tuple[bytes, str])
_header_decoder = msgspec.msgpack.Decoder(BeaconHeader)
_beacon_decoder = msgspec.msgpack.Decoder(Beacon)


def encode_beacon(beacon: Beacon, secret: str | None) -> bytes:
    """MAGIC + msgpack [body, signature]; the signature is empty in open mode."""
    body = _encoder.encode(beacon)
    signature = sign(secret, body, beacon.sent_at, context=BEACON_CONTEXT) if secret else ""
    return MAGIC + _encoder.encode((body, signature))


VerdictKind = Literal["ok", "foreign", "unauthenticated", "incompatible", "malformed"]


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    beacon: Beacon | None = None
    header: BeaconHeader | None = None
    reason: str = ""


def versions_compatible(ours: str, theirs: str) -> bool:
    """Same major version (same minor while the major is 0, as semver promises nothing then)."""

    def major_minor(v: str) -> tuple[int, int] | None:
        parts = v.split(".")
        try:
            return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return None

    a, b = major_minor(ours), major_minor(theirs)
    if a is None or b is None:
        return ours == theirs
    return a == b if a[0] == 0 or b[0] == 0 else a[0] == b[0]


def decode_beacon(
    data: bytes,
    *,
    tag: str,
    secret: str | None,
    version: str,
    now: float,
    window_s: float = REPLAY_WINDOW_S,
) -> Verdict:
    """Judge one datagram. Pure. Cheapest checks first: a LAN full of other clusters' beacons
    costs one small decode each, never an HMAC."""
    if not data.startswith(MAGIC):
        return Verdict("malformed", reason="not a flock beacon")
    try:
        body, signature = _envelope.decode(data[len(MAGIC):])
        header = _header_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return Verdict("malformed", reason=str(e))
    if header.tag != tag:
        return Verdict("foreign", header=header)
    if secret:
        # Open mode skips freshness too: it would only add a clock requirement, no security.
        error = verify(secret, body, header.sent_at, signature, now=now, window_s=window_s,
                       context=BEACON_CONTEXT)
        if error:
            return Verdict("unauthenticated", header=header, reason=error)
    if header.proto != PROTO or not versions_compatible(version, header.version):
        return Verdict("incompatible", header=header,
                       reason=f"version {header.version} protocol {header.proto}")
    try:
        beacon = _beacon_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return Verdict("malformed", header=header, reason=str(e))
    return Verdict("ok", beacon=beacon, header=header)


def fit_beacon(
    beacon: Beacon, profile: NodeProfile, echoes: Sequence[Echo], secret: str | None,
    limit: int = MAX_DATAGRAM,
) -> tuple[bytes, Beacon]:
    """The largest beacon under `limit` bytes: full profile if possible, then as many echoes
    as fit (the caller orders them, least recently echoed first)."""
    full = profile.model_dump(mode="json")
    digest = detail_digest(profile)
    variants = [
        msgspec.structs.replace(beacon, profile=full, partial=False, detail=digest),
        msgspec.structs.replace(
            beacon, profile={k: v for k, v in full.items() if k not in DETAIL_FIELDS},
            partial=True, detail=digest,
        ),
    ]
    chosen = variants[-1]
    for variant in variants:
        if len(encode_beacon(variant, secret)) <= limit:
            chosen = variant
            break
    lo, hi = 0, len(echoes)  # binary search for the most echoes that still fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode_beacon(msgspec.structs.replace(chosen, echoes=list(echoes[:mid])),
                             secret)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    final = msgspec.structs.replace(chosen, echoes=list(echoes[:lo]))
    return encode_beacon(final, secret), final


# -- the beacon loop ------------------------------------------------------------------------


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, owner: Discovery) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self.owner._received(data, str(addr[0]))
        except Exception:  # one bad datagram must never stop the receiver
            log.exception("discovery: failed to handle a datagram from %s", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery receive error: %s", exc)


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

    _addresses: list[LocalAddress] = field(default_factory=list, init=False)
    _senders: dict[str, socket.socket] = field(default_factory=dict, init=False)
    _joined: set[str] = field(default_factory=set, init=False)
    _recv: socket.socket | None = field(default=None, init=False)
    _transport: asyncio.DatagramTransport | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _seq: int = field(default=0, init=False)
    _sent_at: dict[int, float] = field(default_factory=dict, init=False)
    _peers: dict[str, _PeerTrack] = field(default_factory=dict, init=False)
    _last_beacon: float = field(default=float("-inf"), init=False)
    _warned: set[str] = field(default_factory=set, init=False)
    _version: str = field(default="", init=False)

    @property
    def addresses(self) -> list[LocalAddress]:
        return list(self._addresses)

    async def start(self) -> None:
        if self._task is not None:
            return
        if not self.config.secret:
            log.warning(
                "open mode: no cluster secret, so any host on these networks can join cluster "
                "%r; set one (flock init) to authenticate members", self.config.cluster,
            )
        self._version = self.profile().version
        self._recv = self._open_receiver()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self), sock=self._recv
        )
        self._transport = transport
        self._refresh_addresses()
        if not self._addresses:
            log.warning("discovery: no interface matches %s; beacons wait for one",
                        list(self.config.interfaces) or "auto")
        self._task = loop.create_task(self._run(), name="flock-discovery")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._transport is not None:
            self._transport.close()  # closes the receive socket, which leaves its groups
            self._transport = None
        for sock in self._senders.values():
            sock.close()
        self._senders.clear()
        self._joined.clear()

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sockets --

    def _open_receiver(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            # Several agents on one host (demo, tests) all listen on the one discovery port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sys.platform.startswith("linux"):
            # Without this, Linux hands an INADDR_ANY socket every group any socket on the host
            # joined, on any interface: we want only the memberships we made, where we made them.
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MULTICAST_ALL", 49), 0)
        # INADDR_ANY: multicast and broadcast datagrams carry those as their destination, so a
        # socket bound to one unicast address would never see them. Sources are filtered instead.
        sock.bind(("0.0.0.0", self.config.port))
        sock.setblocking(False)
        return sock

    def _open_sender(self, local: LocalAddress) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            socket.inet_aton(local.address))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.config.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # local agents hear
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind((local.address, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _refresh_addresses(self) -> None:
        """Follow interfaces coming, going and changing addresses (DHCP, Wi-Fi, cables)."""
        try:
            selected = select_addresses(self.list_addresses(), self.config.interfaces)
        except OSError as e:
            log.warning("discovery: cannot list interfaces: %s", e)
            return
        wanted = {a.address: a for a in selected}
        for address in [a for a in self._senders if a not in wanted]:
            self._senders.pop(address).close()
            self._leave(address)
            log.info("discovery: stopped beacons on %s", address)
        for address, local in wanted.items():
            if address in self._senders:
                continue
            try:
                self._senders[address] = self._open_sender(local)
            except OSError as e:
                self._warn_once(f"open {address}", "discovery: cannot use %s (%s): %s",
                                address, local.interface, e)
                continue
            self._join(local)
            log.info("discovery: beacons on %s (%s) to %s:%d", address, local.interface,
                     self.config.group, self.config.port)
        self._addresses = [a for a in selected if a.address in self._senders]

    def _membership(self, address: str) -> bytes:
        return socket.inet_aton(self.config.group) + socket.inet_aton(address)

    def _join(self, local: LocalAddress) -> None:
        if not self.config.multicast or self._recv is None:
            return
        try:
            self._recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                  self._membership(local.address))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # a second address on an interface already joined
                self._warn_once(f"join {local.address}", "discovery: cannot join %s on %s: %s",
                                self.config.group, local.address, e)
                return
        self._joined.add(local.address)

    def _leave(self, address: str) -> None:
        if address in self._joined and self._recv is not None:
            with contextlib.suppress(OSError):
                self._recv.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP,
                                      self._membership(address))
        self._joined.discard(address)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

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
        if not self._senders:
            return
        now = self.clock()
        profile = self.profile().model_copy(update={
            "node_id": self.identity.node_id,
            "addresses": [a.address for a in self._addresses],
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
        for local in self._addresses:
            sock = self._senders[local.address]
            targets = []
            if self.config.multicast:
                targets.append(self.config.group)
            if self.config.broadcast and local.broadcast:
                targets.append(local.broadcast)
            for target in targets:
                try:
                    sock.sendto(data, (target, self.config.port))
                    self.stats["sent"] += 1
                except OSError as e:  # link down, no route, buffer full: the next round retries
                    self.stats["send_errors"] += 1
                    self._warn_once(f"send {local.address} {target}",
                                    "discovery: send from %s to %s failed: %s",
                                    local.address, target, e)
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
        now = self.clock()
        if not self._source_allowed(source):
            self.stats["outside"] += 1
            return
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

    def _source_allowed(self, source: str) -> bool:
        try:
            ip = IPv4Address(source)
        except ValueError:
            return False
        return any(ip in a.network for a in self._addresses)

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


# -- static peers ---------------------------------------------------------------------------


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


# -- probe: discovery alone, for tests in namespaces and for debugging a network ------------


async def _probe_main(args: argparse.Namespace) -> int:
    from agent import __version__, sysinfo
    from agent.cluster.identity import load_or_create
    from agent.cluster.membership import Membership, PeerTable

    identity = load_or_create(args.state_dir)
    name = args.name or socket.gethostname()

    def profile() -> NodeProfile:
        return NodeProfile(
            node_id=identity.node_id, name=name, version=args.version or __version__,
            addresses=[], api_port=args.api_port,
            memory_total_bytes=sysinfo.total_memory_bytes(),
            memory_available_bytes=sysinfo.available_memory_bytes(),
        )

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "t": round(time.monotonic(), 3), **fields}), flush=True)

    interfaces = tuple(i for i in args.interfaces.split(",") if i)
    config = DiscoveryConfig(
        cluster=args.cluster, secret=args.secret, interfaces=interfaces, port=args.port,
        group=args.group, interval_s=args.interval, multicast=not args.no_multicast,
        broadcast=not args.no_broadcast,
    )
    table = PeerTable(profile(), interval_s=args.interval, suspect_after=args.suspect,
                      dead_after=args.dead)
    membership = Membership(table)
    membership.add_callback(lambda e: emit(e.kind, node_id=e.node_id, name=e.profile.name))
    discovery = Discovery(config, identity, profile, membership.on_sighting,
                          on_incompatible=membership.on_incompatible)
    stop = asyncio.Event()
    await discovery.start()
    emit("ready", node_id=identity.node_id, name=name,
         addresses=[a.address for a in discovery.addresses])
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        import signal

        loop.add_signal_handler(signal.SIGTERM, stop.set)
    runner = loop.create_task(membership.run(stop))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.duration)
    stop.set()
    await runner
    await discovery.stop()
    emit("final",
         peers=[{"node_id": v.profile.node_id, "name": v.profile.name, "status": v.status,
                 "rtt_ms": v.rtt_ms} for v in membership.views()[1:]],
         incompatible=[i.node_id for i in membership.incompatible()],
         stats=dict(discovery.stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.cluster.discovery",
        description="Run discovery and membership alone and print peer events as JSON lines.",
    )
    parser.add_argument("--probe", action="store_true", required=True)
    parser.add_argument("--cluster", default="flock")
    parser.add_argument("--secret", default=None)
    parser.add_argument("--interfaces", required=True,
                        help="comma-separated names/CIDRs to confine beacons to (required: a "
                             "probe never picks interfaces by itself)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--group", default=DEFAULT_GROUP)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--suspect", type=int, default=3)
    parser.add_argument("--dead", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds, then exit")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--version", default=None, help="advertise this version instead")
    parser.add_argument("--api-port", type=int, default=52415)
    parser.add_argument("--no-multicast", action="store_true")
    parser.add_argument("--no-broadcast", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(_probe_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
