"""From a placement to each runner's configuration: roles, layer ranges, link addresses. Pure.

Every node computes the same answer from the same placement, so a node knows where to listen and
whom to call without asking anyone. Each instance gets a *slot* (chosen by the leader) on the
nodes it spans; a node's runner for slot k uses ports `data_port + 4k` (its stage or tensor link)
and `data_port + 4k + 1` (the mx.distributed ring).
"""

from __future__ import annotations

from agent.cluster.state import NodeProfile, Placement
from agent.runtime.protocol import RunnerConfig

PORTS_PER_SLOT = 4
MAX_SLOTS = 64


class WiringError(ValueError):
    """The placement cannot be wired (unknown node, unsupported layout)."""


def node_address(profile: NodeProfile) -> str:
    if not profile.addresses:
        raise WiringError(f"node {profile.name} ({profile.node_id}) advertises no address")
    return profile.addresses[0]


def link_address(profile: NodeProfile, slot: int, offset: int = 0) -> str:
    return f"{node_address(profile)}:{profile.data_port + PORTS_PER_SLOT * slot + offset}"


def free_slot(placement: Placement, taken: dict[str, set[int]]) -> int:
    """The lowest slot no node of the placement uses yet (`taken`: node id -> its slots)."""
    for slot in range(MAX_SLOTS):
        if all(slot not in taken.get(node, set()) for node in placement.nodes()):
            return slot
    raise WiringError("every instance slot of these nodes is in use")


def runner_configs(placement: Placement, slot: int, profiles: dict[str, NodeProfile],
                   base: RunnerConfig) -> dict[tuple[str, int], RunnerConfig]:
    """(node id, rank) -> the RunnerConfig of that rank. Ranks count nodes in stage order.

    A single node runs "solo"; a pipeline runs a "head" and "follower"s in a ring back to the
    head; one tensor group runs rank 0 "solo" (it drives the group) and "tp_follower"s.
    """
    try:
        nodes = [profiles[n] for n in placement.nodes()]
    except KeyError as exc:
        raise WiringError(f"placement {placement.instance_id} names unknown node {exc}") from exc
    stages = placement.stages
    common = {"model_name": placement.model}
    if len(nodes) == 1:
        stage = stages[0]
        return {(nodes[0].node_id, 0): _with(base, role="solo", layer_start=stage.layer_start,
                                              layer_stop=stage.layer_stop, **common)}
    if all(len(stage.nodes) == 1 for stage in stages):
        out = {}
        for rank, stage in enumerate(stages):
            me = profiles[stage.nodes[0]]
            nxt = profiles[stages[(rank + 1) % len(stages)].nodes[0]]
            out[(me.node_id, rank)] = _with(
                base, role="head" if rank == 0 else "follower", layer_start=stage.layer_start,
                layer_stop=stage.layer_stop, listen=link_address(me, slot),
                downstream=link_address(nxt, slot), **common)
        return out
    if len(stages) == 1:
        ring = [link_address(p, slot, 1) for p in nodes]
        links = [link_address(p, slot) for p in nodes]
        return {
            (p.node_id, rank): _with(
                base, role="solo" if rank == 0 else "tp_follower", tp_rank=rank, tp_hosts=ring,
                tp_peers=links[1:] if rank == 0 else [], listen=links[rank], **common)
            for rank, p in enumerate(nodes)
        }
    raise WiringError("hybrid placements (tensor groups inside pipeline stages) are not "
                      "supported by the runner yet; use strategy pipeline or tensor")


def _with(base: RunnerConfig, **fields: object) -> RunnerConfig:
    import msgspec

    return msgspec.structs.replace(base, **fields)
