"""Which local IPv4 addresses discovery may use: the host's interfaces (netifaces), whether they
are up, and the `interfaces` allow-list (names, CIDRs or single addresses) that confines beacons.

`select_addresses` and `parse_allow` are pure; only `list_local_addresses` and
`interface_is_up` ask the operating system.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import netifaces


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
                                      usable_broadcast(addr, network, entry.get("broadcast"))))
    return found


def usable_broadcast(address: str, network: IPv4Network, broadcast: str | None) -> str | None:
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
