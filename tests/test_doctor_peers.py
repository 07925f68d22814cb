"""`flock doctor` against real agents (no model loaded): a healthy peer passes; an address where
nothing listens fails; a peer whose clock is off (libfaketime) fails the clock check; a peer
with another cluster secret fails the secret check. And the whole command, from the CLI and
from the dashboard's endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.doctor import peers
from tests.cluster_tools import Agent, loopback_cluster
from tests.live_agent import free_port, wait_until

FAKETIME_LIBS = [Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                 Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
                 Path("/usr/lib/faketime/libfaketime.so.1")]
FAKETIME = next((p for p in FAKETIME_LIBS if p.exists()), None)
SECRET = secrets.token_urlsafe(24)
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # three agents and three doctor runs: ~30 s on two cores


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _answering(agent: Agent) -> bool:
    try:
        return httpx.get(agent.url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Agent]]:
    root = tmp_path_factory.mktemp("doctor")
    spec = root / "secret.toml"
    spec.write_text(f'[cluster]\nname = "doc-{secrets.token_hex(3)}"\nsecret = "{SECRET}"\n')
    with loopback_cluster(root, root / "models") as c:
        agents = {"healthy": c.start("healthy"),
                  "secret": c.start("secret", cluster_file=spec)}
        if FAKETIME is not None:
            with environment(LD_PRELOAD=str(FAKETIME), FAKETIME="+300s",
                             FAKETIME_DONT_FAKE_MONOTONIC="1"):
                agents["skewed"] = c.start("skewed")
        for agent in agents.values():
            c.wait_for(f"{agent.name} to answer", lambda a=agent: _answering(a), 60)
        yield agents


def _probe(agent: Agent, secret: str | None = None) -> peers.PeerFact:
    return peers.probe_peer(agent.name, agent.address, agent.port, 52500, secret)


def test_a_healthy_peer_passes(cluster: dict[str, Agent]) -> None:
    fact = _probe(cluster["healthy"])
    assert fact.status == 200
    assert peers.check_reachable(fact).status == "ok"
    assert peers.check_clock(fact, 30).status == "ok", fact
    assert peers.check_secret(fact, "open").status == "ok"


def test_an_unreachable_peer_fails() -> None:
    fact = peers.probe_peer("ghost", "127.0.0.1", free_port(), free_port(), None, timeout=1)
    check = peers.check_reachable(fact)
    assert check.status == "fail" and "unreachable" in check.detail


@pytest.mark.skipif(FAKETIME is None, reason="libfaketime is not installed (apt-get install "
                                             "libfaketime)")
def test_a_peer_whose_clock_is_off_fails(cluster: dict[str, Agent]) -> None:
    fact = _probe(cluster["skewed"])
    assert fact.skew_s is not None and 290 < fact.skew_s < 310, fact
    check = peers.check_clock(fact, 30)
    assert check.status == "fail" and "ahead by" in check.detail and "NTP" in check.fix


def test_a_peer_with_another_secret_fails_and_the_same_secret_passes(
        cluster: dict[str, Agent]) -> None:
    other = _probe(cluster["secret"], secrets.token_urlsafe(24))
    check = peers.check_secret(other, "secret")
    assert check.status == "fail" and "same" in check.fix
    none = _probe(cluster["secret"], None)  # this node in open mode, the peer has a secret
    assert peers.check_secret(none, "open").status == "fail"
    same = _probe(cluster["secret"], SECRET)
    assert same.status == 200 and same.answer_trusted
    assert peers.check_secret(same, "secret").status == "ok"
    assert peers.check_clock(same, 30).status == "ok"


def _doctor(*args: str) -> tuple[int, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOCK_")}
    done = subprocess.run([sys.executable, "-m", "agent", "doctor", "--json", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.stdout.strip(), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_the_command_checks_a_live_node_and_fails_on_a_taken_port(
        cluster: dict[str, Agent], tmp_path: Path) -> None:
    node = cluster["healthy"]
    if "skewed" in cluster:  # the one other open-mode node: probed once the node has seen it
        wait_until(lambda: len(httpx.get(node.url + "/cluster", timeout=5).json()["nodes"]) > 1,
                   60, "the healthy node to see its peer")
    code, report = _doctor("--url", node.url, "--state-dir", str(node.state_dir),
                           "--models-dir", str(tmp_path / "models"),
                           "--discovery-interface", "127.0.0.1/8")
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[union-attr]
    assert checks[f"port api tcp/{node.port}"]["status"] == "ok"  # held by flock itself
    assert checks["multicast 127.0.0.1"]["status"] == "ok"
    assert code == (1 if report["failed"] else 0)
    if "skewed" in cluster:
        assert any(name.startswith("peer ") for name in checks)  # the node's peer was probed
    # A port some other process holds: the run fails.
    import socket

    holder = socket.socket()
    port = free_port()
    holder.bind(("0.0.0.0", port))
    holder.listen()
    try:
        code, report = _doctor("--port", str(port), "--url", f"http://127.0.0.1:{free_port()}",
                               "--models-dir", str(tmp_path / "models"),
                               "--discovery-interface", "127.0.0.1/8")
    finally:
        holder.close()
    assert code == 1 and report["failed"]
    failed = [c for c in report["checks"] if c["status"] == "fail"]  # type: ignore[union-attr]
    assert any(c["name"] == f"port api tcp/{port}" for c in failed)


def test_the_dashboard_runs_the_doctor(cluster: dict[str, Agent]) -> None:
    node = cluster["healthy"]
    answer = httpx.post(node.url + "/ui/api/doctor", timeout=120)
    assert answer.status_code == 200
    report = answer.json()
    assert "checks" in report, report
    assert {c["name"] for c in report["checks"]} >= {"python", "mlx", "memory", "disk"}

