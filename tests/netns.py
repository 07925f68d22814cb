"""Network namespaces for tests: N hosts on one bridge, entirely inside namespaces we create.

Each host is a namespace with `lo` and an `eth0` at 10.77.0.<i+1>/24; the bridge joining them
lives in a hub namespace of its own, so nothing is added to the machine's real network and no
packet can reach its real interfaces. `netns_lab` creates everything, yields, and removes
everything again (processes started through it first), on failure too. Without root or
`ip netns` it skips the test with the reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

PREFIX = "flk"  # namespaces named flk<pid>-<token>-...: leftovers of dead test runs are found
SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (probably)."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2's `ip`"
    try:
        _ip("netns", "list")
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` is unavailable: {e}"
    return None


@dataclass(frozen=True)
class NsHost:
    index: int
    netns: str
    address: str
    ifname: str = "eth0"

    def cmd(self, *argv: str) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class NetnsLab:
    hub: str
    hosts: list[NsHost]
    prefix_len: int = 24
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def cidr(self) -> str:
        return f"{SUBNET}.0/{self.prefix_len}"

    def port(self, host: NsHost) -> str:
        """The bridge port (in the hub namespace) that host's cable plugs into."""
        return f"p{host.index}"

    def link_down(self, host: NsHost) -> None:
        """Pull host's cable: its eth0 loses carrier, nothing reaches it or leaves it."""
        _ip("-n", self.hub, "link", "set", self.port(host), "down")

    def link_up(self, host: NsHost) -> None:
        _ip("-n", self.hub, "link", "set", self.port(host), "up")

    def popen(self, host: NsHost, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside host's namespace; the lab stops it at exit if it still runs."""
        proc = subprocess.Popen(host.cmd(*argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: NsHost, argv: Sequence[str], timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(host.cmd(*argv), capture_output=True, text=True, timeout=timeout)

    def _stop_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


def _namespace_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split()]


def _delete_namespace(name: str) -> None:
    # Processes inside are children of this test (started through the lab); a namespace lives
    # on while any process holds it, so end them first, each by its pid.
    for pid in _namespace_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def _remove_stale() -> None:
    """Delete namespaces that crashed earlier runs of these tests left behind (owner pid gone,
    nothing running inside)."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if not _namespace_pids(name):
            _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def netns_lab(n: int) -> Iterator[NetnsLab]:
    """N hosts at 10.77.0.1..N/24 on one bridge; everything is removed on exit."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    if not 1 <= n <= 200:
        raise ValueError("1..200 hosts")
    _remove_stale()
    base = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    hub = f"{base}-hub"
    created: list[str] = []
    lab = NetnsLab(hub, [])
    try:
        try:
            _ip("netns", "add", hub)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot create a network namespace: {e.stderr.strip()}")
        created.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i in range(n):
            ns = f"{base}-h{i}"
            _ip("netns", "add", ns)
            created.append(ns)
            host = NsHost(i, ns, f"{SUBNET}.{i + 1}")
            port = lab.port(host)
            # Both ends are born inside namespaces: no interface ever appears on the real host.
            _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", host.ifname,
                "netns", ns)
            _ip("-n", hub, "link", "set", port, "master", "br0")
            _ip("-n", hub, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # brd +: a broadcast address, as DHCP and NetworkManager configure one on real LANs.
            _ip("-n", ns, "addr", "add", f"{host.address}/{lab.prefix_len}", "brd", "+",
                "dev", host.ifname)
            _ip("-n", ns, "link", "set", host.ifname, "up")
            lab.hosts.append(host)
        yield lab
    finally:
        lab._stop_processes()
        for name in reversed(created):
            _delete_namespace(name)
