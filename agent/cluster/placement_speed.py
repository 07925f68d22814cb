"""Speed-aware pipeline placement: layers by measured speed, slow nodes left out, ring order by
links. Pure functions, no I/O; `placement.place` calls them when every candidate reports a
decode speed (its compute probe ran, `agent/cluster/compute_probe.py`).

The estimate is of decode, one token of one stream, since that is what a user waits on:
- a layer costs a node `layer bytes / (2e9 x decode GFLOP/s)` seconds: decode reads every weight
  once per token, and the probe's matrix-vector speed at float32 (4 bytes, 2 flops per weight)
  is how fast it streams them;
- a hop costs half the link's round trip plus one token's activations over its bandwidth; the
  ring has as many hops as stages (the last stage hands back to the head).
Rules:
- Layers are split so stages take about equal time (layers in proportion to speed), within
  each node's memory: with micro-batches in flight the slowest stage sets the pace.
- A node well slower than the fastest (under `SLOW_FRACTION` of its decode speed) is left out
  when the others hold the model: one stream's token passes every stage in turn, so a node
  below the pipeline's mean speed makes every token slower (and costs a hop besides), while
  alike nodes, probe noise included, are all kept. The slowest go first, as many as memory
  allows and as long as one stream then runs `LEAVE_OUT_GAIN` faster; each gets its reason.
- Stage order follows the links: the order whose slowest hop is fastest (the ring is a cycle),
  then the least total hop time, then the fastest node as the head (it also projects every
  token to logits, as much work as several layers); hop times and speeds compare in coarse
  steps (hops under 1 ms all count as equal), and ties keep the memory order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from itertools import permutations
from math import floor, log2

from agent.cluster.memory_model import MemoryModel
from agent.cluster.state import ModelShape, NodeProfile

# A node is slow (left out when memory allows) under this fraction of the fastest's decode
# speed: beside one node, it would make one stream's tokens 1.33x slower or more. Probes of
# alike nodes that ran at once on a busy machine differ by up to ~1.5x; this stays clear.
SLOW_FRACTION = 0.5
# ... and only when one stream then runs this much faster (memory pushed onto other slow nodes
# may make it slower instead).
LEAVE_OUT_GAIN = 1.1
# For one node: a node that holds the model whole is preferred to the largest when this much
# faster (probe noise between alike nodes must not move a model).
FASTER_BY = 1.25
# Stage orders are searched exhaustively up to this many stages (5! = 120 orders; a search
# runs in the reconcile loop, so it must stay in milliseconds).
MAX_SEARCHED_STAGES = 5
# Hop times below this are all alike (loopback, a switch); above, they compare in sqrt(2) steps.
HOP_FLOOR_S = 1e-3
# A hop whose link nobody measured: a LAN round trip, so unknown links neither win nor lose.
UNKNOWN_RTT_MS = 1.0

CostsOf = Callable[[NodeProfile], MemoryModel]


def speed_known(nodes: list[NodeProfile]) -> bool:
    """Whether every node measured its decode speed (else placement weighs by memory)."""
    return bool(nodes) and all(n.decode_gflops > 0 for n in nodes)


def layer_seconds(model: ModelShape, node: NodeProfile) -> float:
    """One decoder layer's share of one decode token on `node`."""
    return model.layer_bytes / (2e9 * node.decode_gflops)


def hop_seconds(model: ModelShape, a: NodeProfile, b: NodeProfile) -> float:
    """Handing one token's hidden state from `a` to `b`: half the round trip plus the bytes."""
    link = a.links.get(b.node_id) or b.links.get(a.node_id)
    rtt_ms = link.rtt_ms if link is not None else UNKNOWN_RTT_MS
    mbps = link.mbps if link is not None else 0.0
    transfer = model.hidden_size * model.dtype_bytes * 8 / (mbps * 1e6) if mbps > 0 else 0.0
    return rtt_ms / 2000.0 + transfer


@dataclass(frozen=True)
class SpeedPlan:
    order: list[NodeProfile]  # stage order, the head first
    counts: list[int]  # layers per stage
    step_s: float  # estimated seconds per decode token of one stream
    left_out: dict[str, str]  # node id -> why it serves no stage


def plan_pipeline(model: ModelShape, nodes: list[NodeProfile], costs_of: CostsOf, *,
                  memory_order: list[NodeProfile], fixed_order: bool = False) -> SpeedPlan | None:
    """The speed-aware pipeline over (a subset of) `nodes`, or None when they cannot hold it.

    `memory_order`: the order placement would use by memory alone (tie-break of stage orders).
    `fixed_order`: pinned nodes, used all and in the order given; only the split is decided.
    """
    if fixed_order:
        plan = _best_order(model, nodes, costs_of, nodes, fixed=True)
        return None if plan is None else SpeedPlan(*plan, left_out={})
    members = [n for n in memory_order if n in nodes]
    plan = _best_order(model, members, costs_of, memory_order)
    if plan is None:
        return None
    # The slow ones, slowest first: leave out as many as the others' memory allows.
    fastest = max(n.decode_gflops for n in members)
    slow = sorted((n for n in members if n.decode_gflops < SLOW_FRACTION * fastest),
                  key=lambda n: (n.decode_gflops, n.node_id))
    for k in range(len(slow), 0, -1):
        rest = [n for n in members if n not in slow[:k]]
        without = _best_order(model, rest, costs_of, memory_order)
        if without is None or without[2] * LEAVE_OUT_GAIN > plan[2]:
            continue  # the others cannot hold it, or would run slower on their own
        left_out = {n.node_id: (
            f"left out: {n.name} decodes at {n.decode_gflops:g} GFLOP/s, under "
            f"{SLOW_FRACTION:g} of the fastest ({fastest:g}), and the others hold the model: "
            f"one token takes about {without[2] * 1e3:.1f} ms without it, "
            f"{plan[2] * 1e3:.1f} ms with all") for n in slow[:k]}
        return SpeedPlan(*without, left_out=left_out)
    return SpeedPlan(*plan, left_out={})


def _best_order(model: ModelShape, members: list[NodeProfile], costs_of: CostsOf,
                memory_order: list[NodeProfile], *, fixed: bool = False
                ) -> tuple[list[NodeProfile], list[int], float] | None:
    """(order, layer counts, step seconds) of the best feasible stage order of `members`."""
    if not members or len(members) > model.num_layers:
        return None
    rank = {n.node_id: i for i, n in enumerate(memory_order)}
    ranked = sorted(members, key=lambda n: rank.get(n.node_id, 0))
    if fixed:
        orders: list[tuple[NodeProfile, ...]] = [tuple(members)]
    elif len(members) > MAX_SEARCHED_STAGES or _links_alike(model, members):
        # Links tie: the memory order led by the fastest node (by coarse speed class) if its
        # memory holds the embedding, else the memory order.
        head = max(ranked, key=lambda n: (_speed_class(n), -rank.get(n.node_id, 0)))
        led = (head, *(n for n in ranked if n is not head))
        orders = [led] if led == tuple(ranked) else [led, tuple(ranked)]
    else:
        orders = list(permutations(ranked))
    best: tuple[tuple[object, ...], list[NodeProfile], list[int], float] | None = None
    for order in orders:
        counts = split_by_speed(model, list(order), costs_of)
        if counts is None:
            continue
        hops = ring_hops(model, list(order))
        key = (_hop_class(max(hops, default=0.0)), _hop_class(sum(hops)), -_speed_class(order[0]),
               tuple(rank.get(n.node_id, 0) for n in order))
        if best is None or key < best[0]:
            best = (key, list(order), counts, step_seconds(model, list(order), counts))
    return None if best is None else (best[1], best[2], best[3])


def _links_alike(model: ModelShape, members: list[NodeProfile]) -> bool:
    """Whether every order ties on hops (all links fast, or none measured): then the memory
    order stands, and the search over orders is skipped."""
    hops = [hop_seconds(model, a, b) for a in members for b in members if a is not b]
    return not hops or max(hops) == min(hops) or max(hops) * len(members) <= HOP_FLOOR_S


def split_by_speed(model: ModelShape, order: list[NodeProfile],
                   costs_of: CostsOf) -> list[int] | None:
    """Layers per stage in proportion to speed (equal stage times), within memory; None when
    the stages cannot hold the model or one holds no layer."""
    layers = model.num_layers
    last = len(order) - 1
    caps = [min(layers, costs_of(n).capacity(n.usable_memory_bytes, first=i == 0, last=i == last))
            for i, n in enumerate(order)]
    if 0 in caps or sum(caps) < layers:
        return None
    # Equal stage times: layers in proportion to speed (integer weights keep it exact).
    weights = [Fraction(max(1, round(n.decode_gflops * 1000))) for n in order]
    return apportion_at_least_one(layers, weights, caps)


def ring_hops(model: ModelShape, order: list[NodeProfile]) -> list[float]:
    if len(order) < 2:
        return []
    return [hop_seconds(model, a, order[(i + 1) % len(order)]) for i, a in enumerate(order)]


def step_seconds(model: ModelShape, order: list[NodeProfile], counts: list[int]) -> float:
    """One stream's decode token: every stage in turn, and every hop of the ring."""
    compute = sum(c * layer_seconds(model, n) for n, c in zip(order, counts, strict=True))
    return compute + sum(ring_hops(model, order))


def _speed_class(node: NodeProfile) -> int:
    """Coarse steps of decode speed (sqrt(2) apart), so probe noise does not pick the head."""
    return floor(2 * log2(node.decode_gflops)) if node.decode_gflops > 0 else -1000


def _hop_class(seconds: float) -> int:
    """Coarse steps of hop time, so measurement noise does not reorder stages."""
    if seconds <= HOP_FLOOR_S:
        return 0
    return 1 + floor(2 * log2(seconds / HOP_FLOOR_S))


# --- apportionment (shared with placement.py) ------------------------------------------------


def apportion_at_least_one(total: int, weights: list[Fraction], caps: list[int]) -> list[int]:
    """One layer per stage, the rest in proportion to `weights`, never above `caps`."""
    rest = apportion(total - len(caps), weights, [c - 1 for c in caps])
    return [1 + r for r in rest]


def apportion(total: int, weights: list[Fraction], caps: list[int]) -> list[int]:
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
