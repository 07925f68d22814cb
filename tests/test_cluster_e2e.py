"""The cluster end to end with real agents and runners: discovery in network namespaces, a
pipeline answering through a node that is not its head, greedy outputs identical across layouts,
cluster.toml edits converging every node, and the placement API's rules.

Agents run one BLAS thread each and the tests keep at most four runners up at once (the machine
may have two cores). Discovery is confined to loopback or to the namespaces the tests create.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.spec import parse_spec, spec_hash
from tests.cluster_requests import StreamRecord, chat, complete, stream_chat
from tests.cluster_tools import (
    MODEL,
    Agent,
    ClusterBase,
    loopback_cluster,
    netns_cluster,
    shared_models_dir,
)

pytestmark = pytest.mark.slow

PIPELINE_SPEC = """\
[cluster]
name = "e2e"

[[models]]
model = "smollm2-135m"
strategy = "pipeline"
nodes = ["node0", "node1", "node2"]
"""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def models_dir(smollm2_dir: Path) -> Path:
    """A model store with SmolLM2 as `smollm2-135m`, shared by every agent (hard links)."""
    return shared_models_dir(smollm2_dir.parents[1] / "cluster-models", smollm2_dir)


def all_statuses(cluster: ClusterBase) -> list[dict[str, Any]]:
    return [cluster.status(a) for a in cluster.agents if a.alive()]


def placements_agree(cluster: ClusterBase) -> list[dict[str, Any]] | None:
    """The placements, when every live node reports the same ones (else None)."""
    statuses = all_statuses(cluster)
    if not statuses or any(not s for s in statuses):
        return None
    first = statuses[0]["placements"]
    keys = [sorted((p["instance_id"], str(p["stages"])) for p in s["placements"])
            for s in statuses]
    return first if all(k == keys[0] for k in keys) else None


def no_runners(cluster: ClusterBase) -> bool:
    return all(s and not s["placements"] and not s["runners"] for s in all_statuses(cluster))


# ---- namespaces: discovery, a pipeline through a non-head node, the placement API's rules ------


@pytest.mark.netns
def test_three_namespaces_discover_each_other_and_serve_a_pipeline(models_dir: Path,
                                                                   tmp_path: Path) -> None:
    with netns_cluster(3, tmp_path, models_dir) as cluster:
        for i in range(3):
            spec = tmp_path / f"node{i}.toml"  # each node its own copy; no [[nodes]] entries
            spec.write_text(PIPELINE_SPEC)
            cluster.start(i, model=MODEL, cluster_file=spec)
        cluster.wait_up(timeout=120)
        placement = cluster.wait_serving(cluster.agents[0], nodes=3, strategy="pipeline",
                                         timeout=300)
        ids = cluster.node_ids()
        assert [s["nodes"][0] for s in placement["stages"]] == [ids[f"node{i}"] for i in range(3)]
        assert placement["stages"][0]["layer_start"] == 0
        assert placement["stages"][-1]["layer_stop"] == 30
        # Every node found the others on the bridge by itself, at their namespace addresses.
        for status in all_statuses(cluster):
            addresses = {n["name"]: n["addresses"] for n in status["nodes"]}
            assert addresses == {f"node{i}": [f"10.77.0.{i + 1}"] for i in range(3)}
        head = cluster.agent_by_id(placement["head"])
        entry = next(a for a in cluster.agents if a is not head)

        reply = cluster.call(entry, lambda c: chat(c))
        assert "Paris" in reply["choices"][0]["message"]["content"]
        record = cluster.call(entry, lambda c: stream_chat(c, StreamRecord(), max_tokens=24,
                                                           messages=[{"role": "user",
                                                                      "content": "What is the "
                                                                      "capital of France?"}]))
        assert record.error is None and record.status == 200
        assert record.text == reply["choices"][0]["message"]["content"]

        # Placement API. Spec-owned instances cannot be removed through it ...
        response = cluster.delete(entry, f"/cluster/instances/{placement['instance_id']}")
        assert response.status_code == 409, response.text
        # ... in open mode only loopback callers may place or remove, not another machine ...
        other = cluster.agents[2] if entry is not cluster.agents[2] else cluster.agents[1]
        response = cluster.post(entry, "/cluster/instances", via=other,
                                json={"model": MODEL, "nodes": ["node1"]})
        assert response.status_code == 403, response.text
        response = cluster.delete(entry, "/cluster/instances/api-smollm2-135m-0", via=other)
        assert response.status_code == 403, response.text
        assert cluster.get(entry, "/cluster", via=other).status_code == 200  # status is public
        # ... and loopback callers can.
        response = cluster.post(entry, "/cluster/instances",
                                json={"model": MODEL, "nodes": ["node1"]})
        assert response.status_code == 201, response.text
        instance_id = response.json()["instance_id"]
        cluster.wait_for("the API instance on node1", lambda: any(
            p["instance_id"] == instance_id and p["stages"][0]["nodes"] == [ids["node1"]]
            for p in placements_agree(cluster) or []), timeout=120)
        assert cluster.delete(entry, "/cluster/instances/nothing-0").status_code == 404
        response = cluster.delete(entry, f"/cluster/instances/{instance_id}")
        assert response.status_code == 200, response.text
        cluster.wait_for("the API instance gone from every node", lambda: [
            p["instance_id"] for p in placements_agree(cluster) or [{"instance_id": instance_id}]
        ] == [placement["instance_id"]], timeout=60)
        # The spec's pipeline served throughout.
        reply = cluster.call(head, lambda c: chat(c))
        assert "Paris" in reply["choices"][0]["message"]["content"]


# ---- loopback: greedy output identical across layouts ----------------------------------------


LAYOUTS = [
    ("one node", {"nodes": ["n0"]}, 1, "single"),
    ("2-node pipeline", {"strategy": "pipeline", "nodes": ["n0", "n1"]}, 2, "pipeline"),
    ("3-node pipeline", {"strategy": "pipeline", "nodes": ["n0", "n1", "n2"]}, 3, "pipeline"),
    ("3-node tensor parallel", {"strategy": "tensor", "nodes": ["n0", "n1", "n2"]}, 3, "tensor"),
]


def ask_at_once(cluster: ClusterBase, entry: Agent) -> list[tuple[str, int]]:
    """(text, completion tokens) of the PROMPTS and the chat question, greedy, all sent at once.

    Few tokens, and one batch rather than four requests in turn: tensor parallel's ring
    collectives crawl when its three ranks share two cores, so the steps it runs are what the
    test costs (~100 one request after another, ~30 together). A greedy row's tokens do not
    depend on the rows batched with it (tests/test_scheduler.py, test_mlxlm_engine.py), so
    every layout must still produce the one-node tokens; rows that join a running batch also
    exercise chunked prefill beside decoding rows, across stages and tensor ranks."""
    pending = [cluster.submit(entry, lambda c, p=p: complete(c, p, max_tokens=24))
               for p in PROMPTS]
    asked = cluster.submit(entry, lambda c: chat(c, max_tokens=24))
    results = [future.result(timeout=600) for future in pending]
    reply = asked.result(timeout=600)
    results.append((reply["choices"][0]["message"]["content"],
                    reply["usage"]["completion_tokens"]))
    return results


def test_greedy_output_is_identical_on_one_node_pipelines_and_tensor_parallel(
        models_dir: Path, tmp_path: Path) -> None:
    with loopback_cluster(tmp_path, models_dir) as cluster:
        agents = [cluster.start(f"n{i}") for i in range(3)]
        cluster.wait_up(timeout=120)
        entry = agents[2]  # asks through a node that heads none of the layouts
        outputs: dict[str, list[tuple[str, int]]] = {}
        for label, body, nodes, strategy in LAYOUTS:
            response = cluster.post(entry, "/cluster/instances", json={"model": MODEL, **body})
            assert response.status_code == 201, response.text
            instance_id = response.json()["instance_id"]
            cluster.wait_serving(entry, nodes=nodes, strategy=strategy, timeout=300)

            outputs[label] = ask_at_once(cluster, entry)
            assert cluster.delete(entry, f"/cluster/instances/{instance_id}").status_code == 200
            cluster.wait_for(f"{label} removed everywhere", lambda: no_runners(cluster),
                             timeout=120)
        reference = outputs["one node"]
        assert "Paris" in reference[-1][0]
        assert all(n > 0 for _, n in reference)
        for label, got in outputs.items():
            assert got == reference, f"{label} differs from one node"


# ---- loopback: cluster.toml edits converge every node ------------------------------------------


SPEC_V1 = """\
[cluster]
name = "gitops"

[[models]]
model = "smollm2-135m"
nodes = ["n0"]
"""

SPEC_V2 = SPEC_V1 + """
[[models]]
model = "{path}"
nodes = ["n2"]
"""

SPEC_V3 = SPEC_V2.replace('nodes = ["n0"]', 'strategy = "pipeline"\nnodes = ["n0", "n1"]')


def converged(cluster: ClusterBase, text: str, layout: dict[str, int]) -> bool:
    """Every node runs the spec `text` (generation aside) with these models on this many nodes."""
    spec, errors = parse_spec(text)
    assert spec is not None, errors
    digest = spec_hash(spec)
    statuses = all_statuses(cluster)
    if len(statuses) != len(cluster.agents) or any(s["spec"]["hash"] != digest for s in statuses):
        return False
    placements = placements_agree(cluster)
    if placements is None:
        return False
    got = {p["model"]: sum(len(s["nodes"]) for s in p["stages"]) for p in placements}
    return got == layout and cluster.serving(cluster.agents[0], MODEL) is not None


def test_editing_cluster_toml_on_one_node_converges_every_node(models_dir: Path, smollm2_dir: Path,
                                                                tmp_path: Path) -> None:
    path_model = str(smollm2_dir)
    v2 = SPEC_V2.format(path=path_model)
    v3 = SPEC_V3.format(path=path_model)
    with loopback_cluster(tmp_path, models_dir) as cluster:
        files = []
        for i in range(3):
            spec = tmp_path / f"n{i}.toml"
            spec.write_text(SPEC_V1)
            files.append(spec)
            cluster.start(f"n{i}", cluster_file=spec)
        cluster.wait_up(timeout=120)
        cluster.wait_for("spec v1 everywhere", lambda: converged(cluster, SPEC_V1, {MODEL: 1}),
                         timeout=300)
        generation = {s["spec"]["generation"] for s in all_statuses(cluster)}
        assert len(generation) == 1
        edited = files[1]  # edit one node's file (whichever node leads)

        def spec_state() -> list[tuple[int, str]]:
            return [(s["spec"]["generation"], s["spec"]["hash"]) for s in all_statuses(cluster)]

        # Adding a model entry: a new generation, the new instance placed.
        edited.write_text(v2)
        cluster.wait_for("spec v2 (model added) everywhere",
                         lambda: converged(cluster, v2, {MODEL: 1, path_model: 1}), timeout=300)
        state = spec_state()
        assert len(set(state)) == 1 and state[0][0] > generation.pop()
        # Changing a strategy: the model becomes a 2-node pipeline.
        edited.write_text(v3)
        cluster.wait_for("spec v3 (strategy changed) everywhere",
                         lambda: converged(cluster, v3, {MODEL: 2, path_model: 1}), timeout=300)
        state = spec_state()
        placements = placements_agree(cluster)
        assert placements is not None
        pipeline = next(p for p in placements if p["model"] == MODEL)
        assert pipeline["strategy"] == "pipeline"
        ids = cluster.node_ids()
        assert [s["nodes"][0] for s in pipeline["stages"]] == [ids["n0"], ids["n1"]]
        # The other nodes' files are older than the running spec, and status says so.
        by_name = {a.name: cluster.status(a) for a in cluster.agents}
        assert by_name["n1"]["spec"]["local_file"] == "in sync"
        assert by_name["n0"]["spec"]["local_file"] == "differs"
        # An invalid edit changes nothing and is reported.
        edited.write_text(v3.replace('strategy = "pipeline"', 'strategy = "sideways"'))
        cluster.wait_for("the invalid edit reported", lambda: any(
            "strategy" in e for e in cluster.status(cluster.agents[1])["spec"]["errors"]),
            timeout=30)
        assert spec_state() == state
        assert placements_agree(cluster) == placements
        # Answers keep coming from the running spec's instances.
        reply = cluster.call(cluster.agents[2], lambda c: chat(c))
        assert "Paris" in reply["choices"][0]["message"]["content"]



# ---- loopback: a cluster with API keys and no secret ---------------------------------------------


def test_a_cluster_with_api_keys_works_between_its_nodes(models_dir: Path, tmp_path: Path) -> None:
    """Nodes forward placements to the leader and stream from the head with their own first
    key (keys-only mode: no secret); users need the key, for status too."""
    with loopback_cluster(tmp_path, models_dir) as cluster:
        key = "k-" + tmp_path.name
        agents = [cluster.start(f"n{i}", extra=["--api-key", key]) for i in range(2)]
        cluster.api_key = key
        cluster.wait_up(timeout=120)
        cluster.api_key = None
        assert cluster.get(agents[0], "/cluster").status_code == 401
        assert cluster.post(agents[1], "/cluster/instances",
                            json={"model": MODEL, "nodes": ["n0"]}).status_code == 401
        cluster.api_key = key
        for agent in agents:  # whichever leads, the other forwards
            response = cluster.post(agent, "/cluster/instances",
                                    json={"model": MODEL, "nodes": ["n0"]})
            assert response.status_code == 201, response.text
        cluster.wait_serving(agents[1], nodes=1, timeout=300)
        reply = cluster.call(agents[1], lambda c: chat(c))  # n1 streams from n0's head
        assert "Paris" in reply["choices"][0]["message"]["content"]
