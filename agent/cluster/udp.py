"""Discovery's UDP sockets: one receive socket on the discovery port, one send socket per selected
address, multicast group membership only there, and datagrams sent to the group and to each
address's broadcast address.

Confinement lives here: beacons leave only through sockets bound to the selected addresses, with
IP_MULTICAST_IF set to them and TTL 1, groups are joined only on them, and datagrams whose source
lies outside the selected networks are dropped before anyone decodes them. Loopback works for
several agents on one machine: multicast on `lo` with IP_MULTICAST_LOOP delivers to every socket
that joined on 127.0.0.1, and SO_REUSEPORT lets them all bind the one port (verified on Linux 6.x
and in network namespaces; macOS's lo0 is multicast-capable too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from agent.cluster.interfaces import LocalAddress

log = logging.getLogger("flock.discovery")

DatagramHandler = Callable[[bytes, str], None]  # (datagram, source address)


@dataclass
class WarnOnce:
    """Logs a recurring problem (a link down, a peer's bad beacons) at warning level the first
    time and at debug level after, so a flapping network cannot flood the log."""

    logger: logging.Logger = log
    _seen: set[str] = field(default_factory=set)

    def __call__(self, key: str, msg: str, *args: object) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.logger.warning(msg, *args)
        else:
            self.logger.debug(msg, *args)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self.owner.received(data, str(addr[0]))
        except Exception:  # one bad datagram must never stop the receiver
            log.exception("discovery: failed to handle a datagram from %s", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery receive error: %s", exc)


@dataclass
class UdpTransport:
    """The sockets of one discovery endpoint. `use` follows the selected addresses; `send` puts
    one datagram out on each; `on_datagram` hears what arrives from inside their networks.

    stats counts sent, send_errors and outside (datagrams dropped for their source).
    """

    group: str
    port: int
    ttl: int
    multicast: bool
    broadcast: bool
    on_datagram: DatagramHandler
    stats: Counter[str] = field(default_factory=Counter)
    warn: WarnOnce = field(default_factory=WarnOnce)

    _addresses: list[LocalAddress] = field(default_factory=list, init=False)
    _senders: dict[str, socket.socket] = field(default_factory=dict, init=False)
    _joined: set[str] = field(default_factory=set, init=False)
    _recv: socket.socket | None = field(default=None, init=False)
    _transport: asyncio.DatagramTransport | None = field(default=None, init=False)

    @property
    def addresses(self) -> list[LocalAddress]:
        """The addresses beacons go out on now (selected, and their sockets opened)."""
        return list(self._addresses)

    async def open(self) -> None:
        """Start receiving on the discovery port (addresses come with `use`)."""
        self._recv = self._open_receiver()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self),
                                                           sock=self._recv)
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # closes the receive socket, which leaves its groups
            self._transport = None
        self._recv = None
        for sock in self._senders.values():
            sock.close()
        self._senders.clear()
        self._joined.clear()
        self._addresses = []

    def use(self, selected: Sequence[LocalAddress]) -> None:
        """Send from exactly these addresses: open and join the new, close and leave the gone
        (interfaces come, go and change addresses: DHCP, Wi-Fi, cables)."""
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
                self.warn(f"open {address}", "discovery: cannot use %s (%s): %s",
                          address, local.interface, e)
                continue
            self._join(local)
            log.info("discovery: beacons on %s (%s) to %s:%d", address, local.interface,
                     self.group, self.port)
        self._addresses = [a for a in selected if a.address in self._senders]

    def send(self, data: bytes) -> None:
        """One datagram from every address: to the group, and to its broadcast address."""
        for local in self._addresses:
            sock = self._senders[local.address]
            targets = []
            if self.multicast:
                targets.append(self.group)
            if self.broadcast and local.broadcast:
                targets.append(local.broadcast)
            for target in targets:
                try:
                    sock.sendto(data, (target, self.port))
                    self.stats["sent"] += 1
                except OSError as e:  # link down, no route, buffer full: the next round retries
                    self.stats["send_errors"] += 1
                    self.warn(f"send {local.address} {target}",
                              "discovery: send from %s to %s failed: %s", local.address, target, e)

    def received(self, data: bytes, source: str) -> None:
        if not self.source_allowed(source):
            self.stats["outside"] += 1
            return
        self.on_datagram(data, source)

    def source_allowed(self, source: str) -> bool:
        try:
            ip = IPv4Address(source)
        except ValueError:
            return False
        return any(ip in a.network for a in self._addresses)

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
        sock.bind(("0.0.0.0", self.port))
        sock.setblocking(False)
        return sock

    def _open_sender(self, local: LocalAddress) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            socket.inet_aton(local.address))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # local agents hear
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind((local.address, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _membership(self, address: str) -> bytes:
        return socket.inet_aton(self.group) + socket.inet_aton(address)

    def _join(self, local: LocalAddress) -> None:
        if not self.multicast or self._recv is None:
            return
        try:
            self._recv.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                  self._membership(local.address))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # a second address on an interface already joined
                self.warn(f"join {local.address}", "discovery: cannot join %s on %s: %s",
                          self.group, local.address, e)
                return
        self._joined.add(local.address)

    def _leave(self, address: str) -> None:
        if address in self._joined and self._recv is not None:
            with contextlib.suppress(OSError):
                self._recv.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP,
                                      self._membership(address))
        self._joined.discard(address)
