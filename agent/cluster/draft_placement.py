"""Where a placement's draft model runs: in its head runner, or on another node. Pure.

A `[[models]]` entry with a `draft` drafts in the head runner when the head's node has the
memory for the draft's weights and KV (no hop per step; the default). Else, or when the entry
pins `draft_node`, the draft runs in a draft runner (role "draft") on another node, which the
head asks over a link (`runtime/draft_remote.py`): a node with the free memory, preferring one
that serves no stage of the placement (a spare machine), then the one with most room. The
leader records the answer as `Placement.draft_node` (None: in the head runner).
"""

from __future__ import annotations

from agent.cluster.memory_model import memory_model
from agent.cluster.state import ModelShape, NodeProfile, Placement


def draft_bytes(shape: ModelShape, *, kv_headroom_tokens: int, kv_bits: int | None = None
                ) -> int:
    """What the whole draft model takes on one node: its weights and KV for the headroom."""
    costs = memory_model(shape, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
    return costs.need(shape.num_layers, 1, first=True, last=True)


def choose_draft_node(placement: Placement, need: int | None, nodes: list[NodeProfile],
                      placement_needs: dict[str, int] | None = None, *,
                      pinned: str | None = None, kept: bool = False,
                      previous: str | None = None) -> str | None:
    """The node id of the draft runner for `placement`, or None to draft in the head runner.

    `need`: the draft's bytes (None when its shape is unknown: it drafts in the head runner, as
    a single node does); `nodes`: the eligible nodes, with the memory placements take already
    subtracted (else `placement_needs`: what this placement's runners take on each node).
    `pinned` (a node id or name) is honoured when that node is eligible. `kept`: the placement
    ran before with its draft at `previous` (None: the head runner); that stays while the node
    does, since the memory the draft already takes shows in what its node reports.
    """
    head = placement.head_node
    by_key = {n.node_id: n for n in nodes} | {n.name: n for n in nodes}
    if pinned is not None:
        node = by_key.get(pinned)
        if node is not None:
            return None if node.node_id == head else node.node_id
    ids = {n.node_id: n for n in nodes}
    if kept and (previous is None or previous in ids):
        return previous
    if need is None:
        return None
    needs = placement_needs or {}

    def room(node: NodeProfile) -> int:
        return node.usable_memory_bytes - needs.get(node.node_id, 0)

    if head not in ids or room(ids[head]) >= need:
        return None
    stages = set(placement.nodes())
    fits = [n for n in nodes if n.node_id != head and room(n) >= need]
    if not fits:
        return None  # nowhere better: the head runner drafts (or refuses to load it) as before
    fits.sort(key=lambda n: (n.node_id in stages, -room(n), n.node_id))
    return fits[0].node_id
