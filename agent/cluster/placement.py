"""Placement: which nodes compute which layers of a model instance. Pure functions, no I/O.

What a share costs a node is the memory model's (`agent/cluster/memory_model.py`).

Strategies (without pinned nodes, over the candidate nodes the caller passes):
- `pipeline`: contiguous layer ranges, one node per stage, over every candidate that can hold
  a layer, in proportion to what each can hold; when every candidate measured its decode
  speed, in proportion to that within memory, slow nodes left out and stages ordered by their
  links (`placement_speed`).
- `tensor`: the largest group that fits and whose size divides the attention heads, the KV
  heads and the MLP's intermediate size; each node holds 1/n of every layer plus the embedding.
- `hybrid`: tensor groups as pipeline stages, for node counts that fit neither (6 nodes and 9
  heads: two stages of 3-way groups; 4 nodes: a 3-way stage and a single-node stage), fewest
  stages first, over as many candidates as can take part.
- `auto`: one node if it fits, else a pipeline over the fewest largest nodes (`choose_auto`).
Pinned nodes are used exactly, in order; per-node layer counts fix a pipeline's split.
A previous placement that is still valid is kept, so unrelated changes never reshuffle it
(`placement_stability`).
"""

from __future__ import annotations

from fractions import Fraction
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
from agent.cluster.placement_speed import FASTER_BY, plan_pipeline, speed_known
from agent.cluster.placement_speed import apportion_at_least_one as _apportion_at_least_one
from agent.cluster.placement_stability import (
    node_costs,
    resolve_pins,
    still_valid,
    still_valid_costs,
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
    weigh_by_compute: bool | None = None,
    instance_id: str | None = None,
    owner: Owner = "auto",
    previous: Placement | None = None,
    node_dtypes: dict[str, ModelShape] | None = None,
) -> Placement:
    """Place one instance of `model` on `nodes` (the candidates: alive, compatible, selected).

    `pinned_nodes` (ids or names) fixes exactly which nodes serve, in stage order;
    `layer_counts` fixes a pipeline's layers per pinned node. `previous` is kept when still valid.
    `weigh_by_compute`: None (the default) splits pipelines by measured speed when every
    candidate reports a decode speed (`placement_speed`), else by memory; True also weighs by
    matmul speed alone; False is memory alone.
    `node_dtypes`: node id -> the model's shape at the dtype that node runs best (a mixed
    pipeline); such a node's stage loads, and is counted at, that dtype.
    Raises PlacementError saying why nothing fits, with needed and available memory per node.
    """
    costs = node_costs(model, kv_headroom_tokens, kv_bits, node_dtypes)
    instance_id = instance_id or model.name
    by_id = sorted(nodes, key=lambda n: n.node_id)  # input order never changes the answer
    pinned = resolve_pins(pinned_nodes, by_id) if pinned_nodes else None
    if layer_counts is not None and (pinned is None or strategy in ("tensor", "hybrid")):
        raise PlacementError("per-node layer counts need pinned nodes and a pipeline split")
    if previous is not None and still_valid_costs(previous, model, by_id, costs,
                                                  strategy=strategy, pinned=pinned,
                                                  layer_counts=layer_counts,
                                                  instance_id=instance_id,
                                                  node_dtypes=node_dtypes):
        return previous if previous.owner == owner else previous.model_copy(update={"owner": owner})

    left_out: dict[str, str] = {}
    if strategy == "auto":
        groups, counts, reason = _place_auto(model, costs, by_id, pinned, layer_counts,
                                             weigh_by_compute, left_out)
    elif strategy == "pipeline":
        groups, counts, reason = _place_pipeline(model, costs, pinned or by_id,
                                                 pinned=pinned is not None,
                                                 layer_counts=layer_counts,
                                                 weigh_by_compute=weigh_by_compute,
                                                 left_out=left_out)
    elif strategy == "tensor":
        groups, counts, reason = _place_tensor(model, costs, by_id, pinned)
    else:
        groups, counts, reason = _place_hybrid(model, costs, pinned or by_id,
                                               pinned=pinned is not None)
    _check_engine_allows(model, groups)
    placement = _placement(model, groups, counts, reason=reason, instance_id=instance_id,
                           owner=owner, node_dtypes=node_dtypes)
    return placement.model_copy(update={"left_out": left_out}) if left_out else placement


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
                weigh_by_compute: bool | None,
                left_out: dict[str, str]) -> tuple[Groups, list[int], str]:
    if pinned is not None:
        if len(pinned) == 1:
            if layer_counts is not None and list(layer_counts) != [model.num_layers]:
                raise PlacementError(f"layer counts {layer_counts} for one node must be "
                                     f"[{model.num_layers}]")
            return _place_single(model, costs, pinned[0], "auto: one pinned node")
        groups, counts, how = _place_pipeline(model, costs, pinned, pinned=True,
                                              layer_counts=layer_counts,
                                              weigh_by_compute=weigh_by_compute,
                                              left_out=left_out)
        return groups, counts, f"auto with pinned nodes: {how}"
    if not nodes:
        raise PlacementError(f"no nodes available for {model.name}")
    largest = _by_memory(nodes)
    biggest = largest[0]
    if weigh_by_compute is not False and speed_known(nodes):
        biggest = _fastest_that_holds(costs, model, largest)
    whole = costs.for_node(biggest.node_id).need(model.num_layers, first=True, last=True)
    if whole <= biggest.usable_memory_bytes:
        return _place_single(model, costs, biggest,
                             f"auto: fits one node ({biggest.name}: needs {human_bytes(whole)} "
                             f"of {human_bytes(biggest.usable_memory_bytes)})")
    for k in range(2, len(largest) + 1):
        try:
            groups, counts, how = _place_pipeline(model, costs, largest[:k], pinned=False,
                                                  layer_counts=None,
                                                  weigh_by_compute=weigh_by_compute,
                                                  left_out=left_out)
        except PlacementError:
            continue
        return groups, counts, (f"auto: needs {human_bytes(whole)}, more than the largest node "
                                f"holds ({biggest.name}: "
                                f"{human_bytes(biggest.usable_memory_bytes)}); {how}")
    raise _shortfall(model, costs, [[n] for n in _ends_on_largest(largest)],
                     "on all nodes together")


def _place_single(model: ModelShape, costs: MemoryModel, node: NodeProfile,
                  reason: str) -> tuple[Groups, list[int], str]:
    need = costs.for_node(node.node_id).need(model.num_layers, first=True, last=True)
    if need > node.usable_memory_bytes:
        raise _shortfall(model, costs, [[node]], f"on node {node.name}")
    return [[node]], [model.num_layers], reason


def _place_pipeline(model: ModelShape, costs: MemoryModel, ordered: list[NodeProfile], *,
                    pinned: bool, layer_counts: list[int] | None,
                    weigh_by_compute: bool | None,
                    left_out: dict[str, str] | None = None) -> tuple[Groups, list[int], str]:
    if not pinned:
        ordered = _ends_on_largest(_by_memory(ordered))
    groups = [[n] for n in ordered]
    layers = model.num_layers
    if layer_counts is not None:
        return groups, _check_layer_counts(model, costs, ordered, layer_counts), \
            f"pipeline over {len(groups)} nodes, layers as the spec sets"
    if weigh_by_compute is not False and speed_known(ordered):
        return _place_by_speed(model, costs, ordered, pinned=pinned,
                               left_out={} if left_out is None else left_out)
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
    by_compute = bool(weigh_by_compute) and all(g[0].compute_gflops > 0 for g in groups)
    weights = [Fraction(g[0].compute_gflops) if by_compute else Fraction(c)
               for g, c in zip(groups, caps, strict=True)]
    counts = _apportion_at_least_one(layers, weights, caps)
    basis = "measured compute (within memory)" if by_compute else "usable memory"
    return groups, counts, f"pipeline over {len(groups)} nodes, layers in proportion to {basis}"


def _place_by_speed(model: ModelShape, costs: MemoryModel, ordered: list[NodeProfile], *,
                    pinned: bool, left_out: dict[str, str]) -> tuple[Groups, list[int], str]:
    """Layers by measured decode speed; unpinned, slow nodes left out and stages ordered by
    their links (`placement_speed.plan_pipeline`)."""
    if pinned and len(ordered) > model.num_layers:
        raise PlacementError(f"{len(ordered)} pinned nodes for {model.num_layers} layers: "
                             "every pipeline stage needs at least one layer")
    candidates = ordered
    useless: dict[str, str] = {}
    if not pinned:
        candidates = [g[0] for g in _drop_useless(costs, [[n] for n in ordered],
                                                  model.num_layers)[0]]
        useless = {n.node_id: f"left out: {n.name} has memory for no layer"
                   for n in ordered if n not in candidates}
    plan = plan_pipeline(model, candidates, costs.for_node, memory_order=candidates,
                         fixed_order=pinned)
    if plan is None:
        where = "on the pinned nodes" if pinned else "as a pipeline"
        raise _shortfall(model, costs, [[n] for n in ordered], where)
    left_out.update({**useless, **plan.left_out})
    speeds = ", ".join(f"{n.name} {n.decode_gflops:g}" for n in plan.order)
    dropped = f"; {len(plan.left_out)} slow node(s) left out" if plan.left_out else ""
    return [[n] for n in plan.order], plan.counts, (
        f"pipeline over {len(plan.order)} node{'s' if len(plan.order) > 1 else ''}, layers in "
        f"proportion to measured decode speed "
        f"(GFLOP/s: {speeds}) within memory, about {plan.step_s * 1e3:.1f} ms per token"
        f"{dropped}")


def _fastest_that_holds(costs: MemoryModel, model: ModelShape,
                        by_memory: list[NodeProfile]) -> NodeProfile:
    """For one node: the largest, unless a node that also holds the model whole decodes
    FASTER_BY times faster (probe noise between alike nodes never moves a model)."""
    largest = by_memory[0]
    holds = [n for n in by_memory
             if costs.for_node(n.node_id).need(model.num_layers, first=True, last=True)
             <= n.usable_memory_bytes]
    fastest = max(holds, key=lambda n: (n.decode_gflops, n.usable_memory_bytes), default=largest)
    return fastest if fastest.decode_gflops >= FASTER_BY * largest.decode_gflops else largest


def _stage_dtype(model: ModelShape, group: list[NodeProfile],
                 node_dtypes: dict[str, ModelShape] | None) -> str | None:
    """A stage's own dtype when its node runs another than the placement's (a mixed pipeline)."""
    own = (node_dtypes or {}).get(group[0].node_id)
    return own.dtype if own is not None and own.dtype != model.dtype else None


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
        cap = min(costs.for_node(n.node_id).capacity(n.usable_memory_bytes, len(group),
                                                      first=i == 0, last=i == last)
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
        need = costs.for_node(node.node_id).need(count, first=i == 0, last=i == last)
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
            need = costs.for_node(node.node_id).need(share, len(group), first=i == 0,
                                                     last=i == last)
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
               instance_id: str, owner: Owner,
               node_dtypes: dict[str, ModelShape] | None = None) -> Placement:
    stages = []
    start = 0
    for group, count in zip(groups, counts, strict=True):
        stages.append(Stage(layer_start=start, layer_stop=start + count,
                            nodes=[n.node_id for n in group],
                            dtype=_stage_dtype(model, group, node_dtypes)))
        start += count
    if len(stages) == 1:
        label = "single" if len(stages[0].nodes) == 1 else "tensor"
    else:
        label = "pipeline" if all(len(s.nodes) == 1 for s in stages) else "hybrid"
    return Placement(instance_id=instance_id, model=model.name, strategy=label, stages=stages,
                     owner=owner, reason=reason, dtype=model.dtype)
