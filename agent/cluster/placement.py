"""Placement: which nodes compute which layers of a model instance. Pure functions, no I/O.

What a share costs a node is the memory model's (`agent/cluster/memory_model.py`).

Strategies (without pinned nodes, over the candidate nodes the caller passes):
- `pipeline`: contiguous layer ranges, one node per stage, over every candidate that can hold
  a layer, in proportion to what each can hold (or to measured compute, capped by memory).
- `tensor`: the largest group that fits and whose size divides the attention heads, the KV
  heads and the MLP's intermediate size; each node holds 1/n of every layer plus the embedding.
- `hybrid`: tensor groups as pipeline stages, for node counts that fit neither (6 nodes and 9
  heads: two stages of 3-way groups; 4 nodes: a 3-way stage and a single-node stage), fewest
  stages first, over as many candidates as can take part.
- `auto`: one node if it fits, else a pipeline over the fewest largest nodes (`choose_auto`).
Pinned nodes are used exactly, in order; per-node layer counts fix a pipeline's split.
A previous placement that is still valid is kept, so unrelated changes never reshuffle it.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise
from math import ceil
from typing import Literal

from agent.cluster.memory_model import (
    DEFAULT_KV_HEADROOM_TOKENS,
    RUNTIME_OVERHEAD_BYTES,
    MemoryModel,
    PlacementError,
    human_bytes,
    kv_bytes_per_token_per_layer,
    memory_model,
    memory_needed,
    tensor_sizes,
)
from agent.cluster.state import ModelShape, NodeProfile, Placement, Stage, Strategy

__all__ = ["DEFAULT_KV_HEADROOM_TOKENS", "RUNTIME_OVERHEAD_BYTES", "MemoryModel", "PlacementError",
           "choose_auto", "human_bytes", "kv_bytes_per_token_per_layer", "memory_model",
           "memory_needed", "place", "still_valid", "tensor_sizes"]

Owner = Literal["spec", "api", "auto"]

# Hybrid tries the partitions with the fewest stages first; this bounds the search.
_MAX_PARTITIONS = 5000


# --- the entry point --------------------------------------------------------------------------


def place(
    model: ModelShape,
    nodes: list[NodeProfile],
    *,
    strategy: Strategy = "auto",
    pinned_nodes: list[str] | None = None,
    layer_counts: list[int] | None = None,
    kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS,
    kv_bits: int | None = None,
    weigh_by_compute: bool = False,
    instance_id: str | None = None,
    owner: Owner = "auto",
    previous: Placement | None = None,
) -> Placement:
    """Place one instance of `model` on `nodes` (the candidates: alive, compatible, selected).

    `pinned_nodes` (ids or names) fixes exactly which nodes serve, in stage order;
    `layer_counts` fixes a pipeline's layers per pinned node. `previous` is kept when still valid.
    Raises PlacementError saying why nothing fits, with needed and available memory per node.
    """
    costs = memory_model(model, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
    instance_id = instance_id or model.name
    by_id = sorted(nodes, key=lambda n: n.node_id)  # input order never changes the answer
    pinned = _resolve_pins(pinned_nodes, by_id) if pinned_nodes else None
    if layer_counts is not None and (pinned is None or strategy in ("tensor", "hybrid")):
        raise PlacementError("per-node layer counts need pinned nodes and a pipeline split")
    if previous is not None and _still_valid(previous, model, by_id, costs, strategy=strategy,
                                             pinned=pinned, layer_counts=layer_counts,
                                             instance_id=instance_id):
        return previous if previous.owner == owner else previous.model_copy(update={"owner": owner})

    if strategy == "auto":
        groups, counts, reason = _place_auto(model, costs, by_id, pinned, layer_counts,
                                             weigh_by_compute)
    elif strategy == "pipeline":
        groups, counts, reason = _place_pipeline(model, costs, pinned or by_id,
                                                 pinned=pinned is not None,
                                                 layer_counts=layer_counts,
                                                 weigh_by_compute=weigh_by_compute)
    elif strategy == "tensor":
        groups, counts, reason = _place_tensor(model, costs, by_id, pinned)
    else:
        groups, counts, reason = _place_hybrid(model, costs, pinned or by_id,
                                               pinned=pinned is not None)
    _check_engine_allows(model, groups)
    return _placement(model, groups, counts, reason=reason, instance_id=instance_id, owner=owner)


def _check_engine_allows(model: ModelShape, groups: Groups) -> None:
    """A split the model's engine cannot run is refused here, naming what it allows."""
    needs = {"pipeline"} if len(groups) > 1 else set()
    if any(len(group) > 1 for group in groups):
        needs.add("tensor")
    missing = sorted(needs - set(model.strategies))
    if missing:
        what = model.architecture or model.name
        raise PlacementError(
            f"{model.name} ('{what}') cannot run as {' and '.join(missing)} parallel on its "
            f"engine (it allows: {', '.join(model.strategies)}); it needs one node that holds "
            f"it whole")


def choose_auto(model: ModelShape, nodes: list[NodeProfile], *,
                kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS,
                kv_bits: int | None = None) -> tuple[Placement, str]:
    """What `auto` decides, and why. The rule, in order:

    1. One node, when the model (weights, embedding, KV headroom, runner overhead) fits on the
       node with the most usable memory: no hops at all.
    2. Otherwise a pipeline over the fewest nodes that hold it, taking nodes by most usable
       memory; the two largest of them sit at the ends, which carry the embedding and head.
       Pipelines work for any node count and tolerate ordinary Ethernet (a few KB per token
       per hop), where tensor parallelism needs a low-latency link for two all-reduces per layer.
    3. Tensor and hybrid splits are never chosen by `auto`; a spec asks for them explicitly.
    Ties are broken by node id, so every node computes the same answer.
    """
    placement = place(model, nodes, strategy="auto", kv_headroom_tokens=kv_headroom_tokens,
                      kv_bits=kv_bits)
    return placement, placement.reason


# --- strategies -------------------------------------------------------------------------------

Groups = list[list[NodeProfile]]


def _place_auto(model: ModelShape, costs: MemoryModel, nodes: list[NodeProfile],
                pinned: list[NodeProfile] | None, layer_counts: list[int] | None,
                weigh_by_compute: bool) -> tuple[Groups, list[int], str]:
    if pinned is not None:
        if len(pinned) == 1:
            if layer_counts is not None and list(layer_counts) != [model.num_layers]:
                raise PlacementError(f"layer counts {layer_counts} for one node must be "
                                     f"[{model.num_layers}]")
            return _place_single(model, costs, pinned[0], "auto: one pinned node")
        groups, counts, how = _place_pipeline(model, costs, pinned, pinned=True,
                                              layer_counts=layer_counts,
                                              weigh_by_compute=weigh_by_compute)
        return groups, counts, f"auto with pinned nodes: {how}"
    if not nodes:
        raise PlacementError(f"no nodes available for {model.name}")
    largest = _by_memory(nodes)
    biggest = largest[0]
    whole = costs.need(model.num_layers, first=True, last=True)
    if whole <= biggest.usable_memory_bytes:
        return _place_single(model, costs, biggest,
                             f"auto: fits one node ({biggest.name}: needs {human_bytes(whole)} "
                             f"of {human_bytes(biggest.usable_memory_bytes)})")
    for k in range(2, len(largest) + 1):
        try:
            groups, counts, how = _place_pipeline(model, costs, largest[:k], pinned=False,
                                                  layer_counts=None,
                                                  weigh_by_compute=weigh_by_compute)
        except PlacementError:
            continue
        return groups, counts, (f"auto: needs {human_bytes(whole)}, more than the largest node "
                                f"holds ({biggest.name}: "
                                f"{human_bytes(biggest.usable_memory_bytes)}); {how}")
    raise _shortfall(model, costs, [[n] for n in _ends_on_largest(largest)],
                     "on all nodes together")


def _place_single(model: ModelShape, costs: MemoryModel, node: NodeProfile,
                  reason: str) -> tuple[Groups, list[int], str]:
    need = costs.need(model.num_layers, first=True, last=True)
    if need > node.usable_memory_bytes:
        raise _shortfall(model, costs, [[node]], f"on node {node.name}")
    return [[node]], [model.num_layers], reason


def _place_pipeline(model: ModelShape, costs: MemoryModel, ordered: list[NodeProfile], *,
                    pinned: bool, layer_counts: list[int] | None,
                    weigh_by_compute: bool) -> tuple[Groups, list[int], str]:
    if not pinned:
        ordered = _ends_on_largest(_by_memory(ordered))
    groups = [[n] for n in ordered]
    layers = model.num_layers
    if layer_counts is not None:
        return groups, _check_layer_counts(model, costs, ordered, layer_counts), \
            f"pipeline over {len(groups)} nodes, layers as the spec sets"
    if pinned:
        if len(groups) > layers:
            raise PlacementError(f"{len(groups)} pinned nodes for {layers} layers: "
                                 "every pipeline stage needs at least one layer")
        caps = _capacities(costs, groups, layers)
        if 0 in caps or sum(caps) < layers:
            raise _shortfall(model, costs, groups, "on the pinned nodes")
    else:
        groups, caps = _drop_useless(costs, groups, layers)
        if not groups or sum(caps) < layers:
            raise _shortfall(model, costs, [[n] for n in ordered], "as a pipeline")
    by_compute = weigh_by_compute and all(g[0].compute_gflops > 0 for g in groups)
    weights = [Fraction(g[0].compute_gflops) if by_compute else Fraction(c)
               for g, c in zip(groups, caps, strict=True)]
    counts = _apportion_at_least_one(layers, weights, caps)
    basis = "measured compute (within memory)" if by_compute else "usable memory"
    return groups, counts, f"pipeline over {len(groups)} nodes, layers in proportion to {basis}"


def _place_tensor(model: ModelShape, costs: MemoryModel, nodes: list[NodeProfile],
                  pinned: list[NodeProfile] | None) -> tuple[Groups, list[int], str]:
    layers = model.num_layers
    why = (f"divides {model.num_heads} heads, {model.num_kv_heads} KV heads and "
           f"{model.intermediate_size} intermediate")
    if pinned is not None:
        valid = tensor_sizes(model, max(len(pinned), 1))
        if len(pinned) not in valid:
            raise PlacementError(
                f"a tensor group of {len(pinned)} does not split {model.name} evenly "
                f"({model.num_heads} heads, {model.num_kv_heads} KV heads, "
                f"{model.intermediate_size} intermediate); valid group sizes: "
                f"{', '.join(map(str, tensor_sizes(model, model.num_heads)))}")
        if _capacities(costs, [pinned], layers)[0] < layers:
            raise _shortfall(model, costs, [pinned], "as a tensor group of the pinned nodes",
                             tp_share=True)
        return [pinned], [layers], f"tensor parallel over {len(pinned)} pinned nodes ({why})"
    largest = _by_memory(nodes)
    sizes = [n for n in tensor_sizes(model, len(largest)) if n >= 2]
    for size in reversed(sizes):  # the largest group that fits: tensor parallel is for speed
        group = largest[:size]
        if _capacities(costs, [group], layers)[0] >= layers:
            return [group], [layers], f"tensor parallel over {size} nodes ({size} {why})"
    if len(nodes) < 2:
        raise PlacementError(f"tensor parallel needs at least 2 nodes; {len(nodes)} available")
    if not sizes:
        raise PlacementError(
            f"no tensor group of 2..{len(nodes)} nodes splits {model.name} evenly "
            f"({model.num_heads} heads, {model.num_kv_heads} KV heads, "
            f"{model.intermediate_size} intermediate); valid group sizes: "
            f"{', '.join(map(str, tensor_sizes(model, model.num_heads)))}")
    raise _shortfall(model, costs, [largest[: sizes[-1]]],
                     f"as a tensor group of {sizes[-1]}", tp_share=True)


def _place_hybrid(model: ModelShape, costs: MemoryModel, nodes: list[NodeProfile], *,
                  pinned: bool) -> tuple[Groups, list[int], str]:
    """Tensor groups as pipeline stages; the fewest stages that fit win.

    Pinned, all pinned nodes serve and groups are consecutive runs of the pinned order.
    Unpinned, the largest nodes form the largest groups (a group holds only as much as its
    smallest member allows), and the smallest nodes are left out while no split fits.
    """
    if not nodes:
        raise PlacementError(f"no nodes available for {model.name}")
    ordered = nodes if pinned else _by_memory(nodes)
    for count in range(len(ordered), 0 if not pinned else len(ordered) - 1, -1):
        found = _hybrid_split(model, costs, ordered[:count])
        if found is not None:
            groups, counts, shape = found
            left_out = f", {len(ordered) - count} smallest left out" if count < len(ordered) else ""
            return groups, counts, (f"hybrid over {count} nodes{left_out}: stages of {shape}, "
                                    "layers in proportion to group size within memory")
    sizes = tensor_sizes(model, len(ordered))
    raise _shortfall(model, costs, [[n] for n in ordered],
                     f"as tensor groups in pipeline stages (group sizes {sizes})")


def _hybrid_split(model: ModelShape, costs: MemoryModel,
                  ordered: list[NodeProfile]) -> tuple[Groups, list[int], str] | None:
    """The first partition of all `ordered` nodes into valid groups that holds the model."""
    layers = model.num_layers
    for parts in _partitions(len(ordered), tensor_sizes(model, len(ordered))):
        if len(parts) > layers:
            continue
        groups: Groups = []
        start = 0
        for size in parts:
            groups.append(ordered[start:start + size])
            start += size
        caps = _capacities(costs, groups, layers)
        if 0 in caps or sum(caps) < layers:
            continue
        # A group of n does a layer n times faster, so layers follow group size (within memory).
        counts = _apportion_at_least_one(layers, [Fraction(len(g)) for g in groups], caps)
        return groups, counts, " + ".join(f"{p}-way" if p > 1 else "1 node" for p in parts)
    return None


# --- helpers ----------------------------------------------------------------------------------


def _resolve_pins(pins: list[str], nodes: list[NodeProfile]) -> list[NodeProfile]:
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


def _by_memory(nodes: list[NodeProfile]) -> list[NodeProfile]:
    return sorted(nodes, key=lambda n: (-n.usable_memory_bytes, n.node_id))


def _ends_on_largest(by_memory: list[NodeProfile]) -> list[NodeProfile]:
    """Stage order for a pipeline: largest first, second largest last (both hold embeddings).

    Among equals the order stays by node id, so equal nodes read n0, n1, n2.
    """
    if len(by_memory) < 3 or by_memory[1].usable_memory_bytes == by_memory[2].usable_memory_bytes:
        return list(by_memory)
    return [by_memory[0], *by_memory[2:], by_memory[1]]


def _capacities(costs: MemoryModel, groups: Groups, layers: int) -> list[int]:
    """Layers each stage can hold: its smallest member decides, for a tensor group.

    Capped at the model's layers: a node that could hold the whole model counts as holding
    all of it, so roomy nodes share layers evenly instead of by their surplus memory.
    """
    last = len(groups) - 1
    caps = []
    for i, group in enumerate(groups):
        cap = min(costs.capacity(n.usable_memory_bytes, len(group), first=i == 0, last=i == last)
                  for n in group)
        caps.append(min(cap, layers))
    return caps


def _drop_useless(costs: MemoryModel, groups: Groups, layers: int) -> tuple[Groups, list[int]]:
    """Leave out stages that can hold no layer, and any beyond one per layer.

    Dropping an end stage moves the embedding to its neighbour, so capacities are recomputed
    until nothing changes.
    """
    while True:
        caps = _capacities(costs, groups, layers)
        useful = [i for i, c in enumerate(caps) if c > 0]
        # More stages than layers: keep those that hold the most, in their order.
        useful = sorted(sorted(useful, key=lambda i: (-caps[i], i))[:layers])
        if len(useful) == len(groups):
            return groups, caps
        groups = [groups[i] for i in useful]


def _apportion_at_least_one(total: int, weights: list[Fraction], caps: list[int]) -> list[int]:
    """One layer per stage, the rest in proportion to `weights`, never above `caps`."""
    rest = _apportion(total - len(caps), weights, [c - 1 for c in caps])
    return [1 + r for r in rest]


def _apportion(total: int, weights: list[Fraction], caps: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` with upper bounds `caps` (sum(caps) >= total).

    Water-filling: stages whose share exceeds their cap get the cap and the rest is shared
    among the others; then largest remainders round, ties to the earlier stage. Exact
    fractions keep it deterministic.
    """
    counts = [0] * len(caps)
    active = [i for i, c in enumerate(caps) if c > 0]
    remaining = total
    while remaining > 0 and active:
        weight_sum = sum(weights[i] for i in active)
        shares = {i: (remaining * weights[i] / weight_sum if weight_sum else
                      Fraction(remaining, len(active))) for i in active}
        over = [i for i in active if shares[i] > caps[i]]
        if over:
            for i in over:
                counts[i] = caps[i]
                remaining -= caps[i]
            active = [i for i in active if i not in over]
            continue
        floors = {i: int(shares[i]) for i in active}
        left = remaining - sum(floors.values())
        by_remainder = sorted(active, key=lambda i: (-(shares[i] - floors[i]), i))
        for i in active:
            counts[i] = floors[i]
        for i in by_remainder[:left]:
            counts[i] += 1
        remaining = 0
    return counts


def _check_layer_counts(model: ModelShape, costs: MemoryModel, nodes: list[NodeProfile],
                        counts: list[int]) -> list[int]:
    if len(counts) != len(nodes):
        raise PlacementError(f"{len(counts)} layer counts for {len(nodes)} pinned nodes")
    if any(c < 1 for c in counts) or sum(counts) != model.num_layers:
        raise PlacementError(f"layer counts {counts} must be positive and sum to "
                             f"{model.num_layers}, the layers of {model.name}")
    last = len(nodes) - 1
    per_node = {}
    for i, (node, count) in enumerate(zip(nodes, counts, strict=True)):
        need = costs.need(count, first=i == 0, last=i == last)
        if need > node.usable_memory_bytes:
            per_node[node.node_id] = (need, node.usable_memory_bytes)
    if per_node:
        detail = "; ".join(f"{_name(nodes, nid)}: needs {human_bytes(need)}, has "
                           f"{human_bytes(avail)}" for nid, (need, avail) in per_node.items())
        raise PlacementError(f"layer counts {counts} do not fit: {detail}", per_node)
    return list(counts)


def _shortfall(model: ModelShape, costs: MemoryModel, groups: Groups, where: str, *,
               tp_share: bool = False) -> PlacementError:
    """Why `model` does not fit: total need, and per node an even share's need vs its memory."""
    layers = model.num_layers
    per_node: dict[str, tuple[int, int]] = {}
    last = len(groups) - 1
    share = layers if tp_share else ceil(layers / max(1, len(groups)))
    for i, group in enumerate(groups):
        for node in group:
            need = costs.need(share, len(group), first=i == 0, last=i == last)
            per_node[node.node_id] = (need, node.usable_memory_bytes)
    whole = costs.need(layers, first=True, last=True)
    nodes = [n for g in groups for n in g]
    detail = "; ".join(f"{_name(nodes, nid)} needs {human_bytes(need)}, has {human_bytes(avail)}"
                       for nid, (need, avail) in per_node.items())
    what = "its layers" if tp_share else f"an even share of {share} layers"
    return PlacementError(
        f"{model.name} does not fit {where}: it needs {human_bytes(whole)} in all "
        f"({layers} layers of {human_bytes(costs.layer_bytes)} with KV headroom, embedding "
        f"{human_bytes(costs.whole_end_bytes)}, {human_bytes(RUNTIME_OVERHEAD_BYTES)} runtime per "
        f"node); for {what}: {detail or 'no nodes'}",
        per_node,
    )


def _name(nodes: list[NodeProfile], node_id: str) -> str:
    return next((n.name for n in nodes if n.node_id == node_id), node_id)


def _partitions(total: int, sizes: list[int]) -> list[tuple[int, ...]]:
    """Ways to write `total` as a sum of `sizes` (parts non-increasing), fewest parts first."""
    found: list[tuple[int, ...]] = []

    def extend(left: int, largest: int, parts: tuple[int, ...]) -> None:
        if len(found) >= _MAX_PARTITIONS:
            return
        if left == 0:
            found.append(parts)
            return
        for size in sorted(sizes, reverse=True):
            if size <= min(left, largest):
                extend(left - size, size, (*parts, size))

    extend(total, total, ())
    return sorted(found, key=lambda p: (len(p), [-s for s in p]))


def _placement(model: ModelShape, groups: Groups, counts: list[int], *, reason: str,
               instance_id: str, owner: Owner) -> Placement:
    stages = []
    start = 0
    for group, count in zip(groups, counts, strict=True):
        stages.append(Stage(layer_start=start, layer_stop=start + count,
                            nodes=[n.node_id for n in group]))
        start += count
    if len(stages) == 1:
        label = "single" if len(stages[0].nodes) == 1 else "tensor"
    else:
        label = "pipeline" if all(len(s.nodes) == 1 for s in stages) else "hybrid"
    return Placement(instance_id=instance_id, model=model.name, strategy=label, stages=stages,
                     owner=owner, reason=reason, dtype=model.dtype)


# --- stability --------------------------------------------------------------------------------

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
) -> bool:
    """Whether `place` would keep `previous` for this request (see `_still_valid`)."""
    costs = memory_model(model, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
    try:
        pinned = _resolve_pins(pinned_nodes, nodes) if pinned_nodes else None
    except PlacementError:
        return False
    return _still_valid(previous, model, nodes, costs, strategy=strategy, pinned=pinned,
                        layer_counts=layer_counts, instance_id=instance_id or model.name)


def _still_valid(previous: Placement, model: ModelShape, nodes: list[NodeProfile],
                 costs: MemoryModel, *, strategy: Strategy, pinned: list[NodeProfile] | None,
                 layer_counts: list[int] | None, instance_id: str) -> bool:
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
    ceiling = {i: _ceiling(alive[i]) for i in ids}
    last = len(stages) - 1
    return all(
        costs.need(size, len(stage.nodes), first=i == 0, last=i == last) <= ceiling[node_id]
        for i, (stage, size) in enumerate(zip(stages, sizes, strict=True))
        for node_id in stage.nodes
    )


def _ceiling(node: NodeProfile) -> int:
    total = node.memory_total_bytes
    return min(total, node.memory_cap_bytes) if node.memory_cap_bytes is not None else total
