"""`flock spec export`: the running cluster written back as a cluster.toml."""

from __future__ import annotations

from agent.cluster.state import NodeProfile, Placement
from agent.settings import DEFAULT_PORT
from agent.spec import ClusterSection, ClusterSpec, ModelEntry, NodeEntry


def spec_from_observed(
    nodes: list[NodeProfile],
    placements: list[Placement],
    *,
    cluster_name: str = "flock",
    api_port: int = DEFAULT_PORT,
) -> ClusterSpec:
    """A spec that reproduces what runs now (`flock spec export`).

    Every node becomes a static `[[nodes]]` entry (its name, or its id where names repeat, as
    with several agents on one host); every placement becomes a `[[models]]` entry pinned to its
    nodes in stage order, with per-node layer counts for pipelines. Secrets are never exported.
    """
    names = [n.name for n in nodes]
    spec_name = {n.node_id: (n.name if names.count(n.name) == 1 else n.node_id) for n in nodes}
    node_entries = [
        NodeEntry(
            name=spec_name[n.node_id],
            address=_address(n),
            labels=dict(n.labels),
            memory_cap=n.memory_cap_bytes,
        )
        for n in sorted(nodes, key=lambda n: n.node_id)
    ]
    models = [_model_entry(p, spec_name) for p in sorted(placements, key=lambda p: p.instance_id)]
    return ClusterSpec(
        cluster=ClusterSection(name=cluster_name, api_port=api_port),
        nodes=node_entries,
        models=models,
    )


def _address(node: NodeProfile) -> str | None:
    if not node.addresses:
        return None
    host = node.addresses[0]
    return f"[{host}]:{node.api_port}" if ":" in host else f"{host}:{node.api_port}"


def _model_entry(placement: Placement, spec_name: dict[str, str]) -> ModelEntry:
    pinned = [spec_name.get(node_id, node_id) for node_id in placement.nodes()]
    if placement.strategy == "single":
        return ModelEntry(model=placement.model, strategy="auto", nodes=pinned)
    layers = None
    if placement.strategy == "pipeline":
        layers = [s.layer_stop - s.layer_start for s in placement.stages]
    return ModelEntry(model=placement.model, strategy=placement.strategy, nodes=pinned,
                      layers=layers)
