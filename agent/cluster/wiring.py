"""From a placement to each runner's configuration: roles, layer ranges, link addresses. Pure.

Every node computes the same answer from the same placement, so a node knows where to listen and
whom to call without asking anyone. Each instance gets a *slot* (chosen by the leader) on the
nodes it spans; a node's runner for slot k uses ports `data_port + 4k` (its stage or tensor link)
and `data_port + 4k + 1` (the mx.distributed ring); a draft runner on another node
(`Placement.draft_node`) listens on that node's `data_port + 4k + 2` for the head's link.
"""

from __future__ import annotations

from agent.cluster.state import NodeProfile, Placement
from agent.runtime.protocol import RunnerConfig, RunnerRole

PORTS_PER_SLOT = 4
DRAFT_PORT_OFFSET = 2  # of a slot's ports: the draft runner's (`with_draft_runner`)
MAX_SLOTS = 64


class WiringError(ValueError):
    """The placement cannot be wired (unknown node, unsupported layout)."""


def node_address(profile: NodeProfile) -> str:
    if not profile.addresses:
        raise WiringError(f"node {profile.name} ({profile.node_id}) advertises no address")
    return profile.addresses[0]


def link_address(profile: NodeProfile, slot: int, offset: int = 0) -> str:
    return f"{node_address(profile)}:{profile.data_port + PORTS_PER_SLOT * slot + offset}"


def slot_nodes(placement: Placement) -> list[str]:
    """The nodes whose ports an instance's slot takes: its stages' and its draft runner's."""
    extra = [placement.draft_node] if placement.draft_node else []
    return [*placement.nodes(), *extra]


def free_slot(placement: Placement, taken: dict[str, set[int]]) -> int:
    """The lowest slot no node of the placement uses yet (`taken`: node id -> its slots)."""
    for slot in range(MAX_SLOTS):
        if all(slot not in taken.get(node, set()) for node in slot_nodes(placement)):
            return slot
    raise WiringError("every instance slot of these nodes is in use")


def runner_configs(placement: Placement, slot: int, profiles: dict[str, NodeProfile],
                   base: RunnerConfig) -> dict[tuple[str, int], RunnerConfig]:
    """(node id, rank) -> the RunnerConfig of that rank. Ranks count nodes in stage order.

    A single node runs SOLO; a pipeline runs a HEAD and FOLLOWERs in a ring back to the head;
    one tensor group runs rank 0 SOLO (it drives the group) and TP_FOLLOWERs.
    """
    # Every rank loads what placement counted: the placement's dtype, or its stage's own (a
    # mixed pipeline; activations are cast where a stage receives them).
    base = _with(base, dtype=placement.stage_dtype(0))
    try:
        nodes = [profiles[n] for n in placement.nodes()]
    except KeyError as exc:
        raise WiringError(f"placement {placement.instance_id} names unknown node {exc}") from exc
    return with_draft_runner(placement, slot, profiles,
                             _stage_configs(placement, slot, profiles, base, nodes))


def _stage_configs(placement: Placement, slot: int, profiles: dict[str, NodeProfile],
                   base: RunnerConfig, nodes: list[NodeProfile]
                   ) -> dict[tuple[str, int], RunnerConfig]:
    stages = placement.stages
    common = {"model_name": placement.model}
    if len(nodes) == 1:
        stage = stages[0]
        return {(nodes[0].node_id, 0): _with(base, role=RunnerRole.SOLO,
                                              layer_start=stage.layer_start,
                                              layer_stop=stage.layer_stop, **common)}
    if all(len(stage.nodes) == 1 for stage in stages):
        out = {}
        for rank, stage in enumerate(stages):
            me = profiles[stage.nodes[0]]
            nxt = profiles[stages[(rank + 1) % len(stages)].nodes[0]]
            out[(me.node_id, rank)] = _with(
                base, role=RunnerRole.HEAD if rank == 0 else RunnerRole.FOLLOWER,
                dtype=placement.stage_dtype(rank),
                layer_start=stage.layer_start, layer_stop=stage.layer_stop,
                listen=link_address(me, slot), downstream=link_address(nxt, slot), **common)
        return out
    if len(stages) == 1:
        ring = [link_address(p, slot, 1) for p in nodes]
        links = [link_address(p, slot) for p in nodes]
        return {
            (p.node_id, rank): _with(
                base, role=RunnerRole.SOLO if rank == 0 else RunnerRole.TP_FOLLOWER, tp_rank=rank,
                tp_hosts=ring, tp_peers=links[1:] if rank == 0 else [], listen=links[rank],
                **common)
            for rank, p in enumerate(nodes)
        }
    return _hybrid_configs(placement, slot, profiles, base, common)


def with_draft_runner(placement: Placement, slot: int, profiles: dict[str, NodeProfile],
                      configs: dict[tuple[str, int], RunnerConfig]
                      ) -> dict[tuple[str, int], RunnerConfig]:
    """`configs` plus, for a placement whose draft runs on `draft_node`, that node's draft
    runner (rank = the number of stage ranks; its model is the draft) and the head's
    `draft_remote` pointing at it. Without a draft model, or drafting in the head, unchanged."""
    head_key = (placement.head_node, 0)
    head = configs.get(head_key)
    if placement.draft_node is None or head is None or head.draft_name is None:
        return configs
    where = profiles.get(placement.draft_node)
    if where is None:
        raise WiringError(f"placement {placement.instance_id} drafts on unknown node "
                          f"{placement.draft_node}")
    address = link_address(where, slot, DRAFT_PORT_OFFSET)
    out = dict(configs)
    # The draft runner keeps `draft_name` = the target, so that its node checks the draft
    # against the target's tokenizer before starting it (the pool's `_with_draft`).
    out[(where.node_id, len(configs))] = _with(
        head, role=RunnerRole.DRAFT, model_name=head.draft_name, draft_name=placement.model,
        listen=address, downstream=None, layer_start=None, layer_stop=None, tp_rank=0,
        tp_hosts=[], tp_peers=[])
    out[head_key] = _with(head, draft_remote=address)
    return out


def _hybrid_configs(placement: Placement, slot: int, profiles: dict[str, NodeProfile],
                    base: RunnerConfig, common: dict[str, str]
                    ) -> dict[tuple[str, int], RunnerConfig]:
    """Tensor groups inside pipeline stages: each stage's first node leads its group (it takes
    the pipeline links), the others are its tensor peers."""
    stages = placement.stages
    out: dict[tuple[str, int], RunnerConfig] = {}
    rank = 0
    for index, stage in enumerate(stages):
        members = [profiles[n] for n in stage.nodes]
        leader, following = members[0], profiles[stages[(index + 1) % len(stages)].nodes[0]]
        ring = [link_address(p, slot, 1) for p in members]
        peers = [link_address(p, slot) for p in members[1:]]
        layers = {"layer_start": stage.layer_start, "layer_stop": stage.layer_stop,
                  "dtype": placement.stage_dtype(index)}
        for tp_rank, member in enumerate(members):
            if tp_rank == 0:
                config = _with(base, role=RunnerRole.HEAD if index == 0 else RunnerRole.FOLLOWER,
                               listen=link_address(leader, slot),
                               downstream=link_address(following, slot), tp_rank=0,
                               tp_hosts=ring if len(members) > 1 else [], tp_peers=peers,
                               **layers, **common)
            else:
                config = _with(base, role=RunnerRole.TP_FOLLOWER, listen=link_address(member, slot),
                               tp_rank=tp_rank, tp_hosts=ring, **layers, **common)
            out[(member.node_id, rank)] = config
            rank += 1
    return out


def _with(base: RunnerConfig, **fields: object) -> RunnerConfig:
    import msgspec

    return msgspec.structs.replace(base, **fields)
