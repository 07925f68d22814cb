"""Checks of this node's network: its ports (API, discovery UDP, data links) free or held by flock
itself, multicast send and receive on each interface discovery may use, and Linux firewall
rules that drop the discovery or data ports.

`port_owner` and `multicast_roundtrip` touch the machine; `check_*` and `parse_*` are pure.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.doctor.result import Check, fail, ok, warn

FLOCK_MARKERS = ("agent run", "agent.runtime.runner", "flock", "agent.bootstrap")


@dataclass(frozen=True)
class PortFact:
    name: str  # "api", "discovery", "data"
    port: int
    proto: str  # "tcp" | "udp"
    free: bool
    owner: str | None = None  # the holder's command line, where /proc tells


def tcp_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def udp_shareable(port: int) -> bool:
    """Whether a discovery socket could bind the port as flock's does (reuse on: several agents
    share it; a process holding it without reuse blocks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _socket_inodes(port: int, proto: str) -> set[str]:
    inodes = set()
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def port_owner(port: int, proto: str = "tcp") -> str | None:
    """The command line of a process holding `port` (Linux /proc; None elsewhere or when the
    holder's descriptors cannot be read)."""
    inodes = _socket_inodes(port, proto)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return None


def gather_ports(api_port: int, discovery_port: int, data_base: int, data_count: int = 16
                 ) -> list[PortFact]:
    facts = []
    free = tcp_free(api_port)
    facts.append(PortFact("api", api_port, "tcp", free, None if free else port_owner(api_port)))
    facts.append(PortFact("discovery", discovery_port, "udp", udp_shareable(discovery_port)))
    for port in range(data_base, data_base + data_count):
        free = tcp_free(port)
        if not free:
            facts.append(PortFact("data", port, "tcp", False, port_owner(port)))
    return facts


def is_flock(owner: str | None) -> bool:
    return owner is not None and any(m in owner for m in FLOCK_MARKERS)


def check_ports(facts: Sequence[PortFact], *, api_answers: bool) -> list[Check]:
    """`api_answers`: a flock node answers /healthz on the API port (so it holds it)."""
    checks = []
    for fact in facts:
        label = f"port {fact.name} {fact.proto}/{fact.port}"
        if fact.free:
            checks.append(ok(label, "free" if fact.name != "discovery" else
                             "can be bound (shared with any flock agent here)"))
        elif (fact.name == "api" and api_answers) or is_flock(fact.owner):
            checks.append(ok(label, "held by flock itself"))
        else:
            who = f" ({fact.owner[:80]})" if fact.owner else ""
            flag = {"api": "--port", "discovery": "FLOCK_DISCOVERY_PORT",
                    "data": "--data-port"}[fact.name]
            checks.append(fail(label, f"held by another process{who}",
                               f"stop that process, or give flock another port ({flag})"))
    return checks


def multicast_roundtrip(address: str, group: str, port: int, timeout: float = 1.0) -> str | None:
    """Send one datagram to the discovery group from `address` and receive it back there, as
    flock's discovery does; None on success, else what went wrong."""
    token = b"flock-doctor " + secrets.token_hex(8).encode()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sys.platform.startswith("linux"):
            receiver.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MULTICAST_ALL", 49), 0)
        receiver.bind(("0.0.0.0", port))
        receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            socket.inet_aton(group) + socket.inet_aton(address))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sender.bind((address, 0))
        deadline = time.monotonic() + timeout
        sent = 0
        while time.monotonic() < deadline:
            if sent < 3:  # a few tries: one datagram may be lost
                sender.sendto(token, (group, port))
                sent += 1
            ready, _, _ = select.select([receiver], [], [], 0.2)
            while ready:
                data, _ = receiver.recvfrom(65536)
                if data == token:
                    return None
                ready, _, _ = select.select([receiver], [], [], 0)
        return f"sent to {group}:{port} from {address}, nothing came back within {timeout:g} s"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        receiver.close()
        sender.close()


def check_multicast(results: dict[str, str | None], group: str, port: int) -> list[Check]:
    """`results`: interface address -> `multicast_roundtrip`'s answer."""
    if not results:
        return [fail("multicast", "no interface discovery may use is up",
                     "bring an interface up, or check --discovery-interface")]
    checks = []
    for address, problem in sorted(results.items()):
        if problem is None:
            checks.append(ok(f"multicast {address}", f"send and receive on {group}:{port}"))
        else:
            checks.append(fail(f"multicast {address}", problem,
                               f"allow UDP {port} and multicast {group} on this interface "
                               "(firewall, Wi-Fi client isolation), or list peers statically "
                               "in cluster.toml ([[nodes]] address)"))
    return checks


_IPTABLES_DROP = re.compile(r"^-A\s+(INPUT|OUTPUT)\b(?P<rule>.*?)-j\s+(DROP|REJECT)", re.M)
_IPTABLES_POLICY = re.compile(r"^:INPUT\s+(DROP|REJECT)", re.M)
_NFT_DROP = re.compile(r"^\s*(?P<rule>[^#\n]*\b(drop|reject)\b[^\n]*)$", re.M)
_NFT_POLICY = re.compile(r"hook input[^;]*;[^}]*policy drop", re.S)
_DPORT = re.compile(r"dports?\s+\{?\s*(\d+(?:\s*[-:,]\s*\d+)*)")


def _ports_in(rule: str) -> list[tuple[int, int]] | None:
    """The port ranges a rule names; None when it names none (it applies to every port)."""
    match = _DPORT.search(rule)
    if not match:
        return None
    ranges = []
    for part in re.split(r"[,\s]+", match.group(1).strip()):
        if not part:
            continue
        low, _, high = part.replace("-", ":").partition(":")
        ranges.append((int(low), int(high or low)))
    return ranges


def parse_firewall(iptables_save: str, nft_ruleset: str) -> tuple[list[str], bool]:
    """(rules that drop or reject traffic, as text; whether incoming traffic is dropped by
    default) from `iptables-save` and `nft list ruleset` output."""
    rules = [m.group(0).strip() for m in _IPTABLES_DROP.finditer(iptables_save)]
    rules += [m.group("rule").strip() for m in _NFT_DROP.finditer(nft_ruleset)
              if "policy" not in m.group("rule")]
    default_drop = bool(_IPTABLES_POLICY.search(iptables_save) or _NFT_POLICY.search(nft_ruleset))
    return rules, default_drop


def check_linux_firewall(iptables_save: str, nft_ruleset: str, *, discovery_port: int,
                         data_ports: tuple[int, int], api_port: int) -> Check:
    if not iptables_save.strip() and not nft_ruleset.strip():
        return ok("firewall", "no iptables or nft rules found (or not readable without root)")
    rules, default_drop = parse_firewall(iptables_save, nft_ruleset)
    ours = {"discovery": (discovery_port, discovery_port), "data": data_ports,
            "api": (api_port, api_port)}
    hits = []
    for rule in rules:
        ranges = _ports_in(rule)
        if ranges is None:
            narrowed = re.search(r"(^|\s)-s\s|saddr|-i\s+lo\b|ct state", rule)
            if not narrowed and (re.search(r"\budp\b", rule) or "-p" not in rule):
                hits.append(rule)  # every UDP (or every) port, from anywhere
            continue
        for low, high in ranges:
            if any(low <= b and a <= high for a, b in ours.values()):
                hits.append(rule)
                break
    if hits:
        return fail("firewall", f"rules drop flock's ports: {'; '.join(hits)[:300]}",
                    f"allow UDP {discovery_port} (discovery), TCP {api_port} (API) and TCP "
                    f"{data_ports[0]}-{data_ports[1]} (data links) from the cluster's network")
    if default_drop:
        return warn("firewall", "incoming traffic is dropped by default",
                    f"make sure UDP {discovery_port}, TCP {api_port} and TCP "
                    f"{data_ports[0]}-{data_ports[1]} are accepted")
    return ok("firewall", "no rule drops flock's ports")


def read_firewall() -> tuple[str, str]:
    def run(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                  check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return run(["iptables-save"]), run(["nft", "list", "ruleset"])
