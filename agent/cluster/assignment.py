"""The leader's decision as every node receives it: the Assignment, and the leader's pure steps.

`continue_from` merges the assignments the cluster already holds when a node starts leading;
`next_assignment` turns the desired instances and the live nodes into placements with port slots.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent import __version__
from agent.cluster.leader import compatible
from agent.cluster.reconcile import (
    DesiredInstance,
    ObservedState,
    Place,
    Problem,
    Remove,
    desired_from_spec,
    plan_with_problems,
)
from agent.cluster.state import ModelShape, NodeProfile, Placement
from agent.cluster.wiring import free_slot, slot_nodes
from agent.spec import ClusterSpec, VersionedSpec

log = logging.getLogger("flock.cluster")

ASSIGNMENT_PATH = "/cluster/assignment"


# A scale-on-load change (agent/cluster/autoscale.py decides them).
Change = Literal["add", "drain", "remove", "undrain"]


class ScaleEvent(BaseModel):
    """One scale change, with its reason (kept in the assignment, shown in status)."""

    model_config = ConfigDict(frozen=True)

    at: float  # wall clock (the leader's)
    key: str
    model: str
    instance_id: str
    change: Change
    reason: str
    cause: str = ""  # one word for metrics: queue_wait | idle | drained | load_back | floor
    replicas: int  # the entry's replicas after the change


class Assignment(BaseModel):
    """The leader's decision, as every node receives it."""

    model_config = ConfigDict(frozen=True)

    generation: int = 0
    leader: str = ""
    placements: list[Placement] = Field(default_factory=list)
    slots: dict[str, int] = Field(default_factory=dict)
    requested: list[DesiredInstance] = Field(default_factory=list)
    spec: VersionedSpec | None = None
    problems: list[Problem] = Field(default_factory=list)
    # Scale on load (agent/cluster/autoscale.py): entry key -> its replicas now, the replicas
    # being drained (no new requests), and the last changes with their reasons.
    scaled: dict[str, int] = Field(default_factory=dict)
    draining: list[str] = Field(default_factory=list)
    scale_events: list[ScaleEvent] = Field(default_factory=list)

    def desired_models(self) -> set[str]:
        spec = self.spec.spec if self.spec else ClusterSpec.model_validate({})
        # Drafts too: placement counts a draft's memory where it runs (`draft_placement.py`).
        return ({e.model for e in spec.models} | {e.draft for e in spec.models if e.draft}
                | {r.model for r in self.requested})


def continue_from(current: Assignment, fetched: list[Assignment | None]) -> Assignment:
    """Start leading from what the cluster already runs, not from what this node holds.

    A node that just started (or restarted) as the leader holds no assignment, and after a
    partition heals each side holds its own leader's. The new leader continues from the
    assignment most nodes hold (then the newest), so instances that stayed healthy keep
    running; its generations continue above every one seen, so no node refuses them as stale.
    The newest spec wins; API requests are merged.
    """
    held = [a for a in [current, *fetched] if a is not None and a.generation > 0]
    if not held:
        return current
    votes: dict[tuple[str, int], int] = {}
    for a in held:
        votes[(a.leader, a.generation)] = votes.get((a.leader, a.generation), 0) + 1
    leader, generation = max(votes, key=lambda k: (votes[k], k[1], k[0]))
    base = next(a for a in held if (a.leader, a.generation) == (leader, generation))
    spec = current.spec
    for a in held:
        if a.spec is not None and a.spec.newer_than(spec):
            spec = a.spec
    requested = list(base.requested)
    for a in held:
        requested += [r for r in a.requested if all(r.key != q.key for q in requested)]
    if base is not current:
        log.info("continuing from %s's assignment (generation %d, held by %d of %d nodes)",
                 leader[:8] or "?", generation, votes[(leader, generation)], len(held))
    return base.model_copy(update={
        "generation": max(a.generation for a in held), "spec": spec, "requested": requested})


def next_assignment(current: Assignment, shapes: dict[str, ModelShape],
                    nodes: list[NodeProfile], leader: str) -> Assignment | None:
    """The leader's next assignment (placements planned, each new instance given a port slot),
    or None when nothing changed."""
    spec = current.spec.spec if current.spec else ClusterSpec.model_validate({})
    desired = desired_from_spec(spec, shapes, current.requested, current.scaled)
    nodes = [n for n in nodes if compatible(n.version, __version__)]
    observed = ObservedState(nodes=nodes, placements=current.placements, version=__version__)
    actions, problems = plan_with_problems(desired, observed)
    placements = {p.instance_id: p for p in current.placements}
    slots = dict(current.slots)
    moved: dict[str, int] = {}  # re-laid instances: the slot (ports) they leave
    for action in actions:
        if isinstance(action, Remove):
            placements.pop(action.instance_id, None)
            slots.pop(action.instance_id, None)
        elif isinstance(action, Place):
            new, old = action.placement, placements.get(action.placement.instance_id)
            placements[new.instance_id] = new
            # A draft runner moving to another node takes a port there: a fresh slot, free on
            # every node the instance uses now.
            relaid = (old is None or old.model != new.model or old.stages != new.stages
                      or old.draft_node != new.draft_node)
            if relaid and new.instance_id in slots:
                # New ports for a new layout: a runner of the old layout that has not been
                # stopped yet (or restarted) must not take the new layout's connections.
                moved[new.instance_id] = slots.pop(new.instance_id)
    taken: dict[str, set[int]] = {}
    for instance_id, slot in slots.items():
        for node in slot_nodes(placements[instance_id]):
            taken.setdefault(node, set()).add(slot)
    for instance_id, placement in sorted(placements.items()):
        if instance_id not in slots:
            avoid = {n: taken.get(n, set()) | {moved[instance_id]} for n in slot_nodes(placement)
                     } if instance_id in moved else taken
            slots[instance_id] = free_slot(placement, avoid)
            for node in slot_nodes(placement):
                taken.setdefault(node, set()).add(slots[instance_id])
    changed = (list(placements.values()) != current.placements or slots != current.slots
               or current.leader != leader or problems != current.problems)
    if not changed:
        return None
    for problem in problems:
        log.warning("cannot serve %s: %s", problem.instance_id, problem.message)
    return current.model_copy(update={
        "generation": current.generation + 1, "leader": leader,
        "placements": list(placements.values()), "slots": slots, "problems": problems})
