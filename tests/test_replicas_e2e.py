"""Replicas end to end with real agents and runners on loopback: scale on load adds a second
replica on the same node, both replicas serve (their request counts in /metrics rise), and the
added one is drained and removed when idle; two replicas on two nodes both serve, and killing
one's node moves every request to the other.

Short thresholds and `--max-batch 2` make a few streams an overload. At most two runners run
at once (the machine may have two cores).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster_requests import StreamRecord, complete, stream_api
from tests.cluster_tools import (
    MODEL,
    ClusterBase,
    kill9,
    loopback_cluster,
    metric_total,
    runner_pids,
    shared_models_dir,
)

pytestmark = pytest.mark.slow

SCALING_SPEC = """\
[[models]]
model = "smollm2-135m"
nodes = ["a"]
max_replicas = 2
scale_up_wait_s = 0.3
scale_up_after_s = 1
keep_alive = 8
"""

ONE_NODE_SPEC = """\
[[models]]
model = "smollm2-135m"
replicas = 2
nodes = ["a"]
"""

TWO_NODES_SPEC = """\
[[models]]
model = "smollm2-135m"
replicas = 2
"""


@pytest.fixture(scope="module")
def models_dir(smollm2_dir: Path) -> Path:
    return shared_models_dir(smollm2_dir.parents[1] / "cluster-models", smollm2_dir)


def routed(metrics: str) -> dict[str, float]:
    """instance id -> requests this node routed to it (flock_replica_requests_total)."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        match = re.match(r'flock_replica_requests_total\{([^}]*)\} ([0-9.e+]+)', line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            out[labels["instance_id"]] = out.get(labels["instance_id"], 0) + float(match.group(2))
    return out


def ready_replicas(cluster: ClusterBase, model: str = MODEL) -> list[str]:
    """Instance ids of `model` whose head runner is ready (from every live node's status)."""
    ready = []
    for agent in cluster.agents:
        if not agent.alive():
            continue
        status = cluster.status(agent)
        for runner in status.get("runners", []):
            if runner["model"] == model and runner["key"].endswith("/0") \
                    and runner["state"] == "ready":
                ready.append(runner["key"].rsplit("/", 1)[0])
    return sorted(set(ready))


def load(cluster: ClusterBase, agent: Any, prompts: list[str], max_tokens: int
         ) -> list[Future[tuple[str, int]]]:
    return [cluster.submit(agent, lambda c, p=p: complete(c, p, max_tokens=max_tokens))
            for p in prompts]


def test_scale_on_load_adds_a_replica_on_the_node_and_removes_it_when_idle(
        models_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "cluster.toml"
    spec.write_text(SCALING_SPEC)
    with loopback_cluster(tmp_path, models_dir) as cluster:
        a = cluster.start("a", cluster_file=spec, extra=["--max-batch", "2"])
        cluster.wait_for("one replica ready", lambda: ready_replicas(cluster) == ["smollm2-135m-0"],
                         timeout=180)
        # Sustained overload: more streams than one replica's batch, kept up until the second
        # replica serves.
        started = time.monotonic()
        futures = load(cluster, a, [f"Story number {i}: once upon a time" for i in range(6)], 80)
        cluster.wait_for("a second replica ready",
                         lambda: len(ready_replicas(cluster)) == 2, timeout=120)
        scaled_after = time.monotonic() - started
        status = cluster.status(a)
        events = status["scaling"]["events"]
        assert [e["change"] for e in events][:1] == ["add"], events
        assert "waited" in events[0]["reason"]
        loads = {r["instance_id"]: r for r in status["replicas"][MODEL]}
        assert set(loads) == {"smollm2-135m-0", "smollm2-135m-1"}
        assert loads["smollm2-135m-0"]["load"]["in_flight"] > 0
        # Both replicas on the one node serve (the first one is still busy with the overload).
        before = routed(cluster.metrics(a))
        for f in [*load(cluster, a, [f"Question {i}: why is the sky" for i in range(6)], 24),
                  *futures]:
            text, _ = f.result(timeout=300)
            assert text
        after = routed(cluster.metrics(a))
        # Replica 0 served the overload; the second wave goes where it is answered soonest
        # (often all of it to the idle replica 1): both counts rose from nothing.
        assert after.get("smollm2-135m-0", 0) > 0, (before, after)
        assert after.get("smollm2-135m-1", 0) > before.get("smollm2-135m-1", 0), (before, after)
        # Idle past keep_alive: the added replica is drained and removed, the base one stays.
        cluster.wait_for("the added replica removed",
                         lambda: ready_replicas(cluster) == ["smollm2-135m-0"], timeout=60)
        changes = [e["change"] for e in cluster.status(a)["scaling"]["events"]]
        assert changes[-2:] == ["drain", "remove"], changes
        assert 'change="add"' in cluster.metrics(a)
        print(f"second replica serving {scaled_after:.1f}s after the overload began")


def test_two_replicas_on_two_nodes_share_requests_and_survive_one_node(
        models_dir: Path, tmp_path: Path) -> None:
    with loopback_cluster(tmp_path, models_dir) as cluster:
        files = []
        for name in ("a", "b"):
            files.append(tmp_path / f"{name}.toml")
            files[-1].write_text(TWO_NODES_SPEC)
            cluster.start(name, cluster_file=files[-1])
        a, b = cluster.agents
        cluster.wait_up(timeout=120)
        cluster.wait_for("a replica ready on each node",
                         lambda: len(ready_replicas(cluster)) == 2, timeout=240)
        heads = {p["instance_id"]: p["head"] for p in cluster.status(a)["placements"]}
        assert len(set(heads.values())) == 2  # one per node
        cluster.wait_for("a's router has b's load report", lambda: all(
            r["load"] is not None for r in cluster.status(a)["replicas"][MODEL]), timeout=30)
        before = routed(cluster.metrics(a))
        for f in load(cluster, a, [f"Fact {i}: the moon is" for i in range(8)], 24):
            assert f.result(timeout=300)[0]
        after = routed(cluster.metrics(a))
        assert all(after.get(i, 0) > before.get(i, 0) for i in heads), (before, after)
        # b's node dies: every request to a is answered by a's replica.
        b_id = cluster.node_ids()["b"]
        cluster.kill(b)
        mine = next(i for i, h in heads.items() if h != b_id)
        cluster.wait_for("b not heard from", lambda: any(
            n["name"] == "b" and n["status"] != "alive"
            for n in cluster.status(a).get("nodes", [])) or b_id not in {
            n["node_id"] for n in cluster.status(a).get("nodes", [])}, timeout=60, agents=[a])
        before = routed(cluster.metrics(a))
        for f in load(cluster, a, [f"Fact {i}: the sun is" for i in range(4)], 16):
            assert f.result(timeout=300)[0]
        after = routed(cluster.metrics(a))
        moved = {i: after.get(i, 0) - before.get(i, 0) for i in after}
        assert moved.get(mine, 0) == 4, moved
        assert sum(moved.values()) == 4, moved
        with httpx.Client(base_url=a.url, timeout=30, trust_env=False) as client:
            assert client.get("/cluster").status_code == 200


def test_a_request_not_yet_streaming_moves_to_another_replica_when_its_runner_dies(
        models_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "cluster.toml"
    spec.write_text(ONE_NODE_SPEC)
    with loopback_cluster(tmp_path, models_dir) as cluster:
        a = cluster.start("a", cluster_file=spec, extra=["--max-batch", "1"])
        cluster.wait_for("two replicas ready on a", lambda: len(ready_replicas(cluster)) == 2,
                         timeout=240)
        records = [StreamRecord() for _ in range(4)]
        futures = [cluster.submit(a, lambda c, r=r: stream_api(c, "openai", r, max_tokens=60))
                   for r in records]

        def each_has_one_queued() -> bool:
            loads = [r["load"] for r in cluster.status(a).get("replicas", {}).get(MODEL, [])]
            return len(loads) == 2 and all(x and x["queued"] >= 1 and x["running"] == 1
                                           for x in loads)

        cluster.wait_for("a request streaming and one queued on each replica",
                         each_has_one_queued, timeout=120)
        kill9(runner_pids(a.pid)[0])  # either replica: its queued request has not streamed
        for f in futures:
            f.result(timeout=300)
        streamed_then_failed = [r for r in records if r.error is not None]
        assert all(r.first_token for r in streamed_then_failed), [r.error for r in records]
        assert len(streamed_then_failed) <= 1
        assert sum(1 for r in records if r.error is None and r.text) >= 3
        assert metric_total(cluster.metrics(a), "flock_replica_retries_total") >= 1
