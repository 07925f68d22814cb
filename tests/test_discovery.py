"""Discovery: the beacon wire format and its checks (no sockets), interface selection, the UDP
transport, real beacons between endpoints on loopback, static peers over HTTP, and three hosts in
network namespaces.

Every test confines discovery to loopback or to namespaces it creates: nothing here sends a
packet out of the machine's real interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import msgspec
import pytest
from netns import NetnsLab, netns_lab
from test_auth import PeerServer, peer_server

from agent.cluster.auth import cluster_tag
from agent.cluster.beacon import (
    MAX_DATAGRAM,
    PROTO,
    Beacon,
    Echo,
    decode_beacon,
    encode_beacon,
    fit_beacon,
    versions_compatible,
)
from agent.cluster.discovery import DEFAULT_GROUP, Discovery, DiscoveryConfig
from agent.cluster.identity import NODE_ID_FILE, load_or_create
from agent.cluster.interfaces import LocalAddress, parse_allow, select_addresses, usable_broadcast
from agent.cluster.membership import Membership, PeerTable, Sighting
from agent.cluster.peers import PeerClient
from agent.cluster.state import NodeProfile
from agent.cluster.static_peers import StaticPeers, parse_target
from agent.cluster.udp import UdpTransport

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1/8",)
NOW = 1_700_000_000.0


def profile(node_id: str, name: str = "n", version: str = "0.1.0", **extra: Any) -> NodeProfile:
    return NodeProfile(node_id=node_id, name=name, version=version, addresses=[],
                       api_port=52415, memory_total_bytes=16 << 30,
                       memory_available_bytes=8 << 30, **extra)


def beacon(tag: str, node_id: str = "a" * 32, version: str = "0.1.0", **kw: Any) -> Beacon:
    fields: dict[str, Any] = dict(
        proto=PROTO, cluster="c", tag=tag, node_id=node_id, version=version, sent_at=NOW,
        boot_nonce=7, fingerprint="f", seq=1, api_port=52415, addresses=["10.0.0.1"],
        profile=profile(node_id).model_dump(mode="json"),
    )
    fields.update(kw)
    return Beacon(**fields)


# -- wire format ------------------------------------------------------------------------------


def test_beacon_roundtrip_signed() -> None:
    tag = cluster_tag("s", "c")
    data = encode_beacon(beacon(tag), "s")
    verdict = decode_beacon(data, tag=tag, secret="s", version="0.1.2", now=NOW + 1)
    assert verdict.kind == "ok" and verdict.beacon == beacon(tag)


def test_beacon_of_another_cluster_is_foreign() -> None:
    data = encode_beacon(beacon(cluster_tag("other", "c")), "other")
    verdict = decode_beacon(data, tag=cluster_tag("s", "c"), secret="s", version="0.1.0",
                            now=NOW)
    assert verdict.kind == "foreign"


def test_forged_beacon_with_our_tag_is_unauthenticated() -> None:
    # The tag is public on the wire; without the secret a beacon still cannot get in.
    tag = cluster_tag("s", "c")
    for data in (encode_beacon(beacon(tag), "guess"), encode_beacon(beacon(tag), None)):
        verdict = decode_beacon(data, tag=tag, secret="s", version="0.1.0", now=NOW)
        assert verdict.kind == "unauthenticated"


def test_tampered_beacon_is_unauthenticated() -> None:
    tag = cluster_tag("s", "c")
    data = bytearray(encode_beacon(beacon(tag, api_port=1111), "s"))
    i = data.index(msgspec.msgpack.encode(1111))
    data[i:i + 3] = msgspec.msgpack.encode(2222)
    verdict = decode_beacon(bytes(data), tag=tag, secret="s", version="0.1.0", now=NOW)
    assert verdict.kind == "unauthenticated" and verdict.reason == "bad signature"


def test_stale_signed_beacon_is_unauthenticated() -> None:
    tag = cluster_tag("s", "c")
    data = encode_beacon(beacon(tag), "s")
    verdict = decode_beacon(data, tag=tag, secret="s", version="0.1.0", now=NOW + 60)
    assert verdict.kind == "unauthenticated" and "window" in verdict.reason


def test_open_mode_ignores_clocks() -> None:
    tag = cluster_tag(None, "c")
    verdict = decode_beacon(encode_beacon(beacon(tag), None), tag=tag, secret=None,
                            version="0.1.0", now=NOW + 3600)
    assert verdict.kind == "ok"


@pytest.mark.parametrize("kw", [{"version": "0.2.0"}, {"proto": PROTO + 1}])
def test_incompatible_beacon_is_named_but_not_admitted(kw: dict[str, Any]) -> None:
    tag = cluster_tag("s", "c")
    data = encode_beacon(beacon(tag, **kw), "s")
    verdict = decode_beacon(data, tag=tag, secret="s", version="0.1.0", now=NOW)
    assert verdict.kind == "incompatible" and verdict.beacon is None
    assert verdict.header is not None and verdict.header.node_id == "a" * 32


def test_beacon_from_a_newer_compatible_version_with_extra_fields_is_admitted() -> None:
    tag = cluster_tag(None, "c")
    fields = msgspec.structs.asdict(beacon(tag, version="0.1.9"))
    fields["future_field"] = [1, 2, 3]
    body = msgspec.msgpack.encode(fields)
    data = b"FLK1" + msgspec.msgpack.encode((body, ""))
    assert decode_beacon(data, tag=tag, secret=None, version="0.1.0", now=NOW).kind == "ok"


@pytest.mark.parametrize("data", [b"", b"FLK1", b"FLK1\x00garbage", b"HTTP/1.1 200", b"\xff" * 40])
def test_garbage_is_malformed(data: bytes) -> None:
    verdict = decode_beacon(data, tag="t", secret="s", version="0.1.0", now=NOW)
    assert verdict.kind == "malformed"


@pytest.mark.parametrize(
    ("a", "b", "ok"),
    [("0.1.0", "0.1.7", True), ("0.1.0", "0.2.0", False), ("1.2.0", "1.9.3", True),
     ("1.0.0", "2.0.0", False), ("0.9.0", "1.0.0", False), ("dev", "dev", True),
     ("dev", "0.1.0", False)],
)
def test_version_compatibility(a: str, b: str, ok: bool) -> None:
    assert versions_compatible(a, b) is ok
    assert versions_compatible(b, a) is ok


def test_oversized_profile_goes_partial_and_echoes_are_trimmed() -> None:
    tag = cluster_tag("s", "c")
    big = profile("a" * 32, models=[f"model-{i:03d}-with-a-long-store-name" for i in range(60)])
    echoes = [Echo(f"{i:08x}", i, 1000) for i in range(200)]
    data, sent = fit_beacon(beacon(tag), big, echoes, "s")
    assert len(data) <= MAX_DATAGRAM
    assert sent.partial and "models" not in sent.profile
    assert 0 < len(sent.echoes) < 200
    assert sent.echoes == echoes[:len(sent.echoes)]  # the least recently echoed go first

    small = profile("a" * 32, models=["smollm2-135m"])
    data, sent = fit_beacon(beacon(tag), small, echoes[:5], "s")
    assert not sent.partial and sent.profile["models"] == ["smollm2-135m"]
    assert len(sent.echoes) == 5


# -- interface selection ---------------------------------------------------------------------


def addr(interface: str, address: str, prefix: int = 24) -> LocalAddress:
    return LocalAddress(interface, address, IPv4Network(f"{address}/{prefix}", strict=False),
                        None)


AVAILABLE = [addr("lo", "127.0.0.1", 8), addr("eth0", "192.168.1.5"), addr("wg0", "10.9.0.2"),
             addr("br0", "169.254.3.4", 16)]


def test_auto_selection_takes_up_non_loopback_interfaces() -> None:
    chosen = select_addresses(AVAILABLE, (), is_up=lambda name: name != "wg0")
    assert [a.interface for a in chosen] == ["eth0", "br0"]


def test_auto_selection_falls_back_to_loopback_when_offline() -> None:
    chosen = select_addresses(AVAILABLE, (), is_up=lambda name: name == "lo")
    assert [a.address for a in chosen] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("allow", "expected"),
    [(("lo",), ["127.0.0.1"]), (("127.0.0.0/8",), ["127.0.0.1"]), (("10.9.0.2",), ["10.9.0.2"]),
     (("eth0", "10.0.0.0/8"), ["192.168.1.5", "10.9.0.2"]), (("tun7",), [])],
)
def test_allowed_interfaces_confine_selection(allow: tuple[str, ...], expected: list[str]) -> None:
    chosen = select_addresses(AVAILABLE, allow, is_up=lambda name: True)
    assert [a.address for a in chosen] == expected


def test_allowed_interface_that_is_down_is_not_used() -> None:
    assert select_addresses(AVAILABLE, ("eth0",), is_up=lambda name: name != "eth0") == []


@pytest.mark.parametrize(
    ("address", "prefix", "reported", "expected"),
    [("10.0.0.5", 24, "10.0.0.255", "10.0.0.255"),
     ("10.0.0.5", 24, "10.0.0.5", None),  # getifaddrs' answer when none is configured
     ("10.0.0.5", 24, None, None), ("10.0.0.5", 24, "255.255.255.255", None),
     ("10.0.0.5", 24, "10.1.0.255", None), ("10.0.0.5", 32, "10.0.0.9", None)],
)
def test_only_real_broadcast_addresses_are_used(
    address: str, prefix: int, reported: str | None, expected: str | None
) -> None:
    network = IPv4Network(f"{address}/{prefix}", strict=False)
    assert usable_broadcast(address, network, reported) == expected


@pytest.mark.parametrize("bad", ["", "eth 0", "10.0.0.0/33", "fe80::/64", "x" * 16])
def test_bad_interface_entries_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_allow([bad])
    with pytest.raises(ValueError):
        DiscoveryConfig(interfaces=(bad,))


def test_config_refuses_a_unicast_group() -> None:
    with pytest.raises(ValueError):
        DiscoveryConfig(group="10.0.0.1")


@pytest.mark.parametrize(
    ("target", "expected"),
    [("10.0.0.2", ("10.0.0.2", 52415)), ("10.0.0.2:8000", ("10.0.0.2", 8000)),
     ("http://mac-studio.local:9000/", ("mac-studio.local", 9000)),
     ("[fe80::1]:81", ("fe80::1", 81)), ("[fe80::1]", ("fe80::1", 52415))],
)
def test_static_targets_parse(target: str, expected: tuple[str, int]) -> None:
    assert parse_target(target, 52415) == expected


# -- real beacons on loopback -----------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_transport_on_loopback_hears_itself_and_drops_outside_sources() -> None:
    """The UDP transport alone: a datagram it multicasts on lo comes back to its receiver;
    one from a source outside the selected networks never reaches the handler."""

    async def main() -> None:
        heard: list[tuple[bytes, str]] = []
        udp = UdpTransport(DEFAULT_GROUP, free_udp_port(), ttl=1, multicast=True,
                           broadcast=False, on_datagram=lambda d, s: heard.append((d, s)))
        await udp.open()
        try:
            udp.use([addr("lo", "127.0.0.1", 8)])
            assert [a.address for a in udp.addresses] == ["127.0.0.1"]
            udp.send(b"hello")
            assert await wait_until(lambda: (b"hello", "127.0.0.1") in heard)
            assert udp.stats["sent"] == 1
            udp.received(b"stray", "10.1.2.3")
            udp.received(b"stray", "not-an-address")
            assert udp.stats["outside"] == 2 and all(d != b"stray" for d, _ in heard)
            udp.use([])  # the interface went away: no address left to send from
            assert udp.addresses == []
        finally:
            udp.close()

    asyncio.run(main())


@dataclass
class Endpoint:
    discovery: Discovery
    membership: Membership
    name: str

    @property
    def node_id(self) -> str:
        return self.discovery.identity.node_id

    def peers(self, status: str = "alive") -> set[str]:
        return {v.profile.name for v in self.membership.views()[1:] if v.status == status}


class Cluster:
    """Several discovery endpoints in this process, all confined to loopback."""

    def __init__(self, tmp: Path, cluster: str, port: int, interval_s: float = 0.2) -> None:
        self.tmp, self.cluster, self.port, self.interval_s = tmp, cluster, port, interval_s
        self.endpoints: list[Endpoint] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def add(self, name: str, *, secret: str | None = None, version: str = "0.1.0",
                  state_dir: Path | None = None, fingerprint: str = "machine") -> Endpoint:
        identity = load_or_create(state_dir or self.tmp / name, fingerprint=fingerprint)
        mine = profile(identity.node_id, name, version)
        table = PeerTable(mine, interval_s=self.interval_s, suspect_after=3, dead_after=6)
        membership = Membership(table)
        config = DiscoveryConfig(cluster=self.cluster, secret=secret, interfaces=LOOPBACK,
                                 port=self.port, interval_s=self.interval_s)

        def current() -> NodeProfile:
            return table.self_profile

        def rekeyed(new: Any) -> None:
            membership.set_self(table.self_profile.model_copy(update={"node_id": new.node_id}))

        discovery = Discovery(config, identity, current, membership.on_sighting,
                              on_incompatible=membership.on_incompatible, on_rekey=rekeyed)
        await discovery.start()
        self.tasks.append(asyncio.create_task(membership.run(self.stop)))
        endpoint = Endpoint(discovery, membership, name)
        self.endpoints.append(endpoint)
        return endpoint

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            await asyncio.wait_for(task, 5)
        for e in self.endpoints:
            await e.discovery.stop()


@contextlib.asynccontextmanager
async def loopback_cluster(tmp: Path, **kw: Any) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp, f"test-{secrets.token_hex(4)}", free_udp_port(), **kw)
    try:
        yield cluster
    finally:
        await cluster.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


def test_three_endpoints_on_loopback_find_each_other_and_keep_strangers_out(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with loopback_cluster(tmp_path) as c:
            a = await c.add("a", secret="s3cret")
            b = await c.add("b", secret="s3cret")
            d = await c.add("c", secret="s3cret")
            rogue = await c.add("rogue", secret="guessed")
            old = await c.add("old", secret="s3cret", version="0.0.9")
            trio = (a, b, d)
            start = time.monotonic()
            assert await wait_until(
                lambda: all(e.peers() == {"a", "b", "c"} - {e.name} for e in trio)
            ), [e.peers() for e in trio]
            found_s = time.monotonic() - start
            assert found_s < 3, found_s

            # Everyone confined to loopback: that is the only address beacons left from.
            assert all([x.address for x in e.discovery.addresses] == ["127.0.0.1"]
                       for e in c.endpoints)
            # RTT comes from beacon echoes: measured, small, no extra packets.
            assert await wait_until(lambda: all(len(e.membership.rtts_ms()) == 2 for e in trio))
            assert all(0 <= r < 100 for e in trio for r in e.membership.rtts_ms().values())

            await asyncio.sleep(3 * c.interval_s)
            # The rogue (other secret, so another tag) is ignored and sees nobody either.
            assert rogue.peers() == set() and all("rogue" not in e.peers() for e in trio)
            assert a.discovery.stats["foreign"] > 0
            # The old version is recorded for status but never admitted.
            assert all(old.node_id in [i.node_id for i in e.membership.incompatible()]
                       for e in trio)
            assert all("old" not in e.peers() for e in trio)
            assert old.peers() == set()

    asyncio.run(main())


def test_forged_beacon_on_loopback_is_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback_cluster(tmp_path) as c:
            a = await c.add("a", secret="s3cret")
            forged = encode_beacon(
                beacon(cluster_tag("s3cret", c.cluster), node_id="f" * 32, cluster=c.cluster,
                       sent_at=time.time()),
                "not-the-secret",
            )
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                             socket.inet_aton("127.0.0.1"))
                s.bind(("127.0.0.1", 0))
                s.sendto(forged, (a.discovery.config.group, c.port))
            assert await wait_until(lambda: a.discovery.stats["unauthenticated"] >= 1)
            assert a.peers() == set()

    asyncio.run(main())


def test_stopped_endpoint_is_suspected_then_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        async with loopback_cluster(tmp_path, interval_s=0.1) as c:
            a = await c.add("a")
            b = await c.add("b")
            assert await wait_until(lambda: a.peers() == {"b"})
            events = a.membership.subscribe()
            await b.discovery.stop()
            assert await wait_until(lambda: a.peers("dead") == {"b"}, timeout=3)
            seen = [events.get_nowait().kind for _ in range(events.qsize())]
            assert seen == ["suspect", "leave"]

    asyncio.run(main())


def test_copied_identity_on_one_lan_is_rekeyed_live(tmp_path: Path) -> None:
    # Two containers from one image share a machine fingerprint, so the copy is only caught live.
    async def main() -> None:
        async with loopback_cluster(tmp_path) as c:
            a = await c.add("a", state_dir=tmp_path / "a")
            clone_dir = tmp_path / "clone"
            clone_dir.mkdir()
            (clone_dir / NODE_ID_FILE).write_bytes((tmp_path / "a" / NODE_ID_FILE).read_bytes())
            clone = await c.add("clone", state_dir=clone_dir)
            assert clone.node_id == a.node_id
            assert await wait_until(lambda: a.peers() == {"clone"} and clone.peers() == {"a"})
            assert a.node_id != clone.node_id
            stats = a.discovery.stats["rekeyed"] + clone.discovery.stats["rekeyed"]
            assert stats == 1
            loser = a if a.discovery.stats["rekeyed"] else clone
            stored = (loser.discovery.identity.state_dir / NODE_ID_FILE).read_text()
            assert stored.startswith(loser.node_id)

    asyncio.run(main())


# -- static peers over HTTP --------------------------------------------------------------------


def test_static_peer_is_probed_over_signed_http() -> None:
    async def main(server: PeerServer, other: PeerServer) -> None:
        sightings: list[Sighting] = []
        async with PeerClient(node_id="a" * 32, secret="s3cret", timeout_s=2,
                              connect_timeout_s=1) as client:
            static = StaticPeers(
                [f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}", "127.0.0.1:9"],
                client, cluster="test", on_sighting=sightings.append,
                self_id=lambda: "a" * 32,
            )
            got = await static.probe_once()
        assert [s.profile.node_id for s in got] == [server.profile.node_id]
        assert got[0].via == "static" and got[0].boot_nonce == 12345
        assert got[0].rtt_s is not None and got[0].rtt_s < 2
        assert sightings == got

    with peer_server(PeerServer("s3cret")) as server, \
            peer_server(PeerServer("s3cret", cluster="elsewhere")) as other:
        asyncio.run(main(server, other))


# -- three hosts in network namespaces ---------------------------------------------------------


class Probe:
    """`python -m agent.cluster.discovery_probe --probe` in one namespace, its JSON lines kept."""

    def __init__(self, lab: NetnsLab, index: int, state_dir: Path, extra: list[str],
                 duration: float) -> None:
        host = lab.hosts[index]
        self.name = f"h{index}"
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.proc = lab.popen(host, [
            sys.executable, "-m", "agent.cluster.discovery_probe", "--probe",
            "--cluster", "netns-test", "--secret", "lab-secret",
            "--interfaces", lab.cidr, "--interval", "0.2", "--suspect", "3", "--dead", "6",
            "--duration", str(duration), "--state-dir", str(state_dir), "--name", self.name,
            *extra,
        ], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError), self._lock:
                self.lines.append(json.loads(line))

    def names(self, event: str) -> set[str]:
        with self._lock:
            return {e.get("name", "") for e in self.lines if e["event"] == event}

    def final(self, timeout: float = 15) -> dict[str, Any]:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return next(e for e in self.lines if e["event"] == "final")


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["multicast", "broadcast"])
def test_three_namespaces_discover_each_other_without_config(tmp_path: Path, mode: str) -> None:
    extra = ["--no-broadcast"] if mode == "multicast" else ["--no-multicast"]
    with netns_lab(3) as lab:
        probes = [Probe(lab, i, tmp_path / f"h{i}", extra, duration=20) for i in range(3)]
        everyone = {"h0", "h1", "h2"}
        assert wait_for(lambda: all(p.names("join") == everyone - {p.name} for p in probes), 8), \
            [p.lines for p in probes]
        if mode == "multicast":
            # Pull h2's cable: the others must notice it go, suspect first, then dead.
            lab.link_down(lab.hosts[2])
            assert wait_for(lambda: all("h2" in p.names("leave") for p in probes[:2]), 6)
            for p in probes[:2]:
                assert "h2" in p.names("suspect")
                assert not p.names("leave") - {"h2"}, "h0 and h1 still hear each other"
        for p in probes:
            p.proc.terminate()
        finals = [p.final() for p in probes]
        assert all(f["stats"].get("ok", 0) > 0 for f in finals)
        if mode == "multicast":
            statuses = {peer["name"]: peer["status"] for peer in finals[0]["peers"]}
            assert statuses == {"h1": "alive", "h2": "dead"}
            assert next(p for p in finals[0]["peers"] if p["name"] == "h1")["rtt_ms"] < 100
