"""Whether a placement still serves its request, so that unrelated changes never reshuffle it.

Pure functions over the same data as `placement.place` (which keeps a still-valid previous
placement); pinned node names resolve here too, as both need them.
"""

from __future__ import annotations

from itertools import pairwise

from agent.cluster.memory_model import (
    DEFAULT_KV_HEADROOM_TOKENS,
    MemoryModel,
    PerNode,
    PlacementError,
    memory_model,
    tensor_sizes,
)
from agent.cluster.state import ModelShape, NodeProfile, Placement, Strategy


def resolve_pins(pins: list[str], nodes: list[NodeProfile]) -> list[NodeProfile]:
    """Pinned nodes by id, else by (unambiguous) name, in the order given."""
    resolved: list[NodeProfile] = []
    for pin in pins:
        match = [n for n in nodes if n.node_id == pin] or [n for n in nodes if n.name == pin]
        if not match:
            available = ", ".join(n.name for n in nodes) or "none"
            raise PlacementError(f"pinned node '{pin}' is not available (available: {available})")
        if len(match) > 1:
            ids = ", ".join(n.node_id for n in match)
            raise PlacementError(f"node name '{pin}' is ambiguous (ids {ids}); pin by node id")
        if match[0] in resolved:
            raise PlacementError(f"node '{pin}' is pinned twice")
        resolved.append(match[0])
    return resolved



# What an explicit strategy may have produced (a one-node pipeline is labelled "single").
_PRODUCES: dict[str, set[str]] = {
    "auto": {"single", "pipeline"},
    "pipeline": {"single", "pipeline"},
    "tensor": {"tensor"},
    "hybrid": {"single", "pipeline", "tensor", "hybrid"},
}


def still_valid(
    previous: Placement,
    model: ModelShape,
    nodes: list[NodeProfile],
    *,
    strategy: Strategy = "auto",
    pinned_nodes: list[str] | None = None,
    layer_counts: list[int] | None = None,
    kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS,
    kv_bits: int | None = None,
    instance_id: str | None = None,
    node_dtypes: dict[str, ModelShape] | None = None,
) -> bool:
    """Whether `place` would keep `previous` for this request (see `still_valid_costs`)."""
    costs = node_costs(model, kv_headroom_tokens, kv_bits, node_dtypes)
    try:
        pinned = resolve_pins(pinned_nodes, nodes) if pinned_nodes else None
    except PlacementError:
        return False
    return still_valid_costs(previous, model, nodes, costs, strategy=strategy, pinned=pinned,
                             layer_counts=layer_counts, instance_id=instance_id or model.name,
                             node_dtypes=node_dtypes)


def still_valid_costs(previous: Placement, model: ModelShape, nodes: list[NodeProfile],
                 costs: MemoryModel, *, strategy: Strategy, pinned: list[NodeProfile] | None,
                 layer_counts: list[int] | None, instance_id: str,
                 node_dtypes: dict[str, ModelShape] | None = None) -> bool:
    """Whether `previous` still serves this request: same model and ask, nodes alive, fits.

    Fit is checked against each node's ceiling (cap, else total memory), not what is free now:
    a loaded instance's own runners are what use that memory.
    """
    if previous.instance_id != instance_id or previous.model != model.name:
        return False
    if previous.dtype != model.dtype:  # another serving format: other bytes, other runners
        return False
    if previous.strategy not in _PRODUCES[strategy]:
        return False
    alive = {n.node_id: n for n in nodes}
    ids = previous.nodes()
    if len(set(ids)) != len(ids) or any(i not in alive for i in ids):
        return False
    if pinned is not None and ids != [n.node_id for n in pinned]:
        return False
    stages = previous.stages
    sizes = [s.layer_stop - s.layer_start for s in stages]
    if layer_counts is not None and sizes != list(layer_counts):
        return False
    if not stages or stages[0].layer_start != 0 or stages[-1].layer_stop != model.num_layers:
        return False
    if any(a.layer_stop != b.layer_start for a, b in pairwise(stages)) or min(sizes) < 1:
        return False
    if any(len(s.nodes) not in tensor_sizes(model, len(s.nodes)) for s in stages):
        return False
    own = node_dtypes or {}
    for stage in stages:  # a node that now runs another dtype needs other runners
        shape = own.get(stage.nodes[0])
        wanted = shape.dtype if shape is not None and shape.dtype != model.dtype else None
        if stage.dtype != wanted:
            return False
    ceiling = {i: _ceiling(alive[i]) for i in ids}
    last = len(stages) - 1
    return all(
        costs.for_node(node_id).need(size, len(stage.nodes), first=i == 0, last=i == last)
        <= ceiling[node_id]
        for i, (stage, size) in enumerate(zip(stages, sizes, strict=True))
        for node_id in stage.nodes
    )


def _ceiling(node: NodeProfile) -> int:
    total = node.memory_total_bytes
    return min(total, node.memory_cap_bytes) if node.memory_cap_bytes is not None else total


def node_costs(model: ModelShape, kv_headroom_tokens: int, kv_bits: int | None,
               node_dtypes: dict[str, ModelShape] | None) -> MemoryModel:
    """The memory model, per node where nodes run their own dtype."""
    costs = memory_model(model, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
    own = {nid: memory_model(shape, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
           for nid, shape in (node_dtypes or {}).items()}
    return PerNode(costs, own) if own else costs
