"""Reconcile: the actions that turn the observed cluster into the desired one. Pure.

The leader calls `plan(desired, observed)`; a loop around it applies the actions (records
placements, tells nodes to start, stop and restart runners) and observes again. Plans are
idempotent: once applied, planning again on the result yields nothing (`apply` simulates that
for tests). Stable placements are kept (see `placement.still_valid`), so a node joining never
reshuffles running instances; a failed node's instances move to survivors when they fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.cluster.draft_placement import choose_draft_node, draft_bytes
from agent.cluster.leader import compatible
from agent.cluster.placement import (
    DEFAULT_KV_HEADROOM_TOKENS,
    PlacementError,
    memory_needed,
    place,
    still_valid,
)
from agent.cluster.state import ModelShape, NodeProfile, Placement, RunnerStatus, Strategy
from agent.spec import ClusterSpec

Owner = Literal["spec", "api", "auto"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DesiredInstance(_Frozen):
    """One desired model: `replicas` instances with ids `<key>-0`, `<key>-1`, ..."""

    key: str  # stable base of the instance ids
    model: str
    replicas: int = Field(default=1, ge=1)
    # replicas = "auto": as many as nodes the model fits on alone (with its KV headroom), at
    # least one; `plan` resolves the count (see `resolve_auto`). Only spec entries have it, and
    # they are built from the spec on the leader: never sent (nodes of the same minor version
    # before this field refuse unknown fields in assignments).
    auto_replicas: bool = Field(default=False, exclude=True)
    strategy: Strategy = "auto"
    nodes: list[str] | None = None  # pinned node ids or names, in stage order
    labels: dict[str, str] | None = None  # only nodes carrying all these labels
    layers: list[int] | None = None  # per pinned node layer counts
    context_length: int | None = None  # KV headroom to reserve, in tokens
    kv_bits: Literal[4, 8] | None = None
    owner: Owner = "spec"
    # The entry's draft model and its pinned node (built from the spec on the leader, never
    # sent, as auto_replicas): where the draft runs is `draft_placement.py`'s answer.
    draft: str | None = Field(default=None, exclude=True)
    draft_node: str | None = Field(default=None, exclude=True)

    def instance_ids(self) -> list[str]:
        return [f"{self.key}-{r}" for r in range(self.replicas)]


class DesiredState(_Frozen):
    instances: list[DesiredInstance] = Field(default_factory=list)
    # Shapes of the desired models, by model; a model without one cannot be placed yet.
    shapes: dict[str, ModelShape] = Field(default_factory=dict)


class ObservedState(_Frozen):
    nodes: list[NodeProfile] = Field(default_factory=list)  # alive nodes
    placements: list[Placement] = Field(default_factory=list)
    runners: list[RunnerStatus] = Field(default_factory=list)
    # The deciding leader's version: only nodes compatible with it serve instances.
    version: str | None = None


class Place(_Frozen):
    """Record this placement (new, or replacing the one with its instance id)."""

    kind: Literal["place"] = "place"
    placement: Placement


class Remove(_Frozen):
    kind: Literal["remove"] = "remove"
    instance_id: str


class StartRunner(_Frozen):
    kind: Literal["start"] = "start"
    instance_id: str
    node_id: str
    rank: int


class StopRunner(_Frozen):
    kind: Literal["stop"] = "stop"
    instance_id: str
    node_id: str
    rank: int


class RestartRunner(_Frozen):
    """Stop the runner if it runs, then start it: the whole group re-forms together."""

    kind: Literal["restart"] = "restart"
    instance_id: str
    node_id: str
    rank: int


Action = Place | Remove | StartRunner | StopRunner | RestartRunner


class Problem(_Frozen):
    """Why a desired instance is not (fully) served; shown in status, not an action."""

    instance_id: str
    message: str


# --- desired state from the spec ----------------------------------------------------------------


def spec_keys(spec: ClusterSpec) -> list[str]:
    """The instance-id base of each `[[models]]` entry, in order (`desired_from_spec`'s keys)."""
    used: set[str] = set()
    return [_unique_key(_slug(entry.model), used) for entry in spec.models]


def desired_from_spec(spec: ClusterSpec, shapes: dict[str, ModelShape],
                      requested: Iterable[DesiredInstance] = (),
                      scaled: dict[str, int] | None = None) -> DesiredState:
    """The spec's models (owner "spec") plus instances requested by API or on demand.

    `scaled` (entry key -> replicas) is what scale on load added: an entry runs the larger of
    its own `replicas` and that.
    """
    instances: list[DesiredInstance] = []
    used: set[str] = set()
    scaled = scaled or {}
    for entry in spec.models:
        key = _unique_key(_slug(entry.model), used)
        auto = entry.replicas == "auto"
        count = 1 if auto else int(entry.replicas)
        instances.append(DesiredInstance(
            key=key, model=entry.model, replicas=max(count, scaled.get(key, 0)),
            auto_replicas=auto, strategy=entry.strategy,
            nodes=entry.nodes, labels=entry.labels, layers=entry.layers,
            context_length=entry.context_length, kv_bits=entry.kv_bits, owner="spec",
            draft=entry.draft, draft_node=entry.draft_node,
        ))
    for request in requested:
        key = _unique_key(request.key, used)
        replicas = max(request.replicas, scaled.get(key, 0))
        instances.append(request.model_copy(update={"key": key, "replicas": replicas}))
    return DesiredState(instances=instances, shapes=dict(shapes))


def _slug(model: str) -> str:
    """An id-safe name for a model given as store name, path or hub id."""
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "model"


def _unique_key(key: str, used: set[str]) -> str:
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}.{n}"
    used.add(candidate)
    return candidate


# --- planning -------------------------------------------------------------------------------


def plan(desired: DesiredState, observed: ObservedState) -> list[Action]:
    """The actions that converge `observed` on `desired`; empty when they already agree."""
    return plan_with_problems(desired, observed)[0]


def plan_with_problems(desired: DesiredState,
                       observed: ObservedState) -> tuple[list[Action], list[Problem]]:
    """`plan`, plus the desired instances it cannot serve and why."""
    problems: list[Problem] = []
    eligible = [n for n in observed.nodes
                if observed.version is None or compatible(n.version, observed.version)]
    current = {p.instance_id: p for p in observed.placements}
    desired = resolve_auto(desired, eligible, current)
    wanted = _wanted(desired, problems)

    final = _keep_valid(wanted, desired, eligible, current, problems)
    _place_missing(wanted, desired, eligible, observed, current, final, problems)
    _place_drafts(wanted, desired, eligible, observed, current, final)

    alive = {n.node_id for n in observed.nodes}
    stops: list[Action] = []
    removes: list[Action] = []
    places: list[Action] = []
    starts: list[Action] = []
    runners = _runners_by_instance(observed.runners, alive)
    for instance_id in current:
        if instance_id not in final:
            stops += [StopRunner(instance_id=instance_id, node_id=n, rank=r)
                      for (n, r) in sorted(runners.get(instance_id, {}))]
            removes.append(Remove(instance_id=instance_id))
    for instance_id in sorted(set(runners) - set(current) - set(final)):  # orphans
        stops += [StopRunner(instance_id=instance_id, node_id=n, rank=r)
                  for (n, r) in sorted(runners[instance_id])]
    for instance_id, placement in final.items():
        previous = current.get(instance_id)
        if placement != previous:
            places.append(Place(placement=placement))
        running = runners.get(instance_id, {})
        expected = {(node, rank) for rank, node in enumerate(placement.nodes())}
        relaid = previous is None or not _same_layout(previous, placement)
        stale = set(running) if relaid else set(running) - expected
        stops += [StopRunner(instance_id=instance_id, node_id=n, rank=r) for n, r in sorted(stale)]
        kept_runners = {} if relaid else {k: v for k, v in running.items() if k in expected}
        starts += _runner_actions(instance_id, placement, kept_runners)
    return stops + removes + places + starts, problems


def resolve_auto(desired: DesiredState, eligible: list[NodeProfile],
                 current: dict[str, Placement]) -> DesiredState:
    """`replicas = "auto"` entries with their count: one per candidate node the model fits on
    alone (with its KV headroom), counting nodes that already run one of them (their memory
    is in use by it), and at least one."""
    if not any(e.auto_replicas for e in desired.instances):
        return desired
    instances = []
    for entry in desired.instances:
        shape = desired.shapes.get(entry.model)
        if not entry.auto_replicas or shape is None:
            instances.append(entry)
            continue
        hosting = {n for i, p in current.items() if i.startswith(entry.key + "-")
                   and i.removeprefix(entry.key + "-").isdigit() for n in p.nodes()}
        fits = set(hosting)
        for node in _candidates(entry, eligible):
            if node.node_id in fits:
                continue
            try:
                place(shape, [node], strategy=entry.strategy, pinned_nodes=[node.node_id],
                      kv_headroom_tokens=_headroom(entry), kv_bits=entry.kv_bits)
            except PlacementError:
                continue
            fits.add(node.node_id)
        count = max(1, len(fits & {n.node_id for n in eligible}), entry.replicas)
        instances.append(entry.model_copy(update={"replicas": count}))
    return desired.model_copy(update={"instances": instances})


def _wanted(desired: DesiredState,
            problems: list[Problem]) -> list[tuple[str, DesiredInstance]]:
    """(instance id, its desired entry), in desired order, ids unique."""
    seen: set[str] = set()
    wanted = []
    for entry in desired.instances:
        for instance_id in entry.instance_ids():
            if instance_id in seen:
                problems.append(Problem(instance_id=instance_id,
                                        message="instance id is desired twice; second ignored"))
                continue
            seen.add(instance_id)
            wanted.append((instance_id, entry))
    return wanted


def _candidates(entry: DesiredInstance, eligible: list[NodeProfile]) -> list[NodeProfile]:
    if not entry.labels:
        return list(eligible)
    return [n for n in eligible if all(n.labels.get(k) == v for k, v in entry.labels.items())]


def _keep_valid(wanted: list[tuple[str, DesiredInstance]], desired: DesiredState,
                eligible: list[NodeProfile], current: dict[str, Placement],
                problems: list[Problem]) -> dict[str, Placement]:
    """Current placements that still serve their desired instance, owner brought up to date."""
    kept: dict[str, Placement] = {}
    for instance_id, entry in wanted:
        previous = current.get(instance_id)
        shape = desired.shapes.get(entry.model)
        candidates = _candidates(entry, eligible)
        if shape is None:
            # Unknown shape (say, a new leader that has not read the model's config yet):
            # what runs stays while its nodes do; nothing new can be placed.
            alive = {n.node_id for n in candidates}
            if previous is not None and all(n in alive for n in previous.nodes()):
                kept[instance_id] = previous
            else:
                problems.append(Problem(instance_id=instance_id,
                                        message=f"shape of {entry.model} unknown: no node has "
                                                "reported its config"))
            continue
        if previous is not None and still_valid(
            previous, shape, candidates, strategy=entry.strategy, pinned_nodes=entry.nodes,
            layer_counts=entry.layers, kv_headroom_tokens=_headroom(entry),
            kv_bits=entry.kv_bits, instance_id=instance_id,
        ):
            kept[instance_id] = (previous if previous.owner == entry.owner
                                 else previous.model_copy(update={"owner": entry.owner}))
    return kept


def _place_missing(wanted: list[tuple[str, DesiredInstance]], desired: DesiredState,
                   eligible: list[NodeProfile], observed: ObservedState,
                   current: dict[str, Placement], final: dict[str, Placement],
                   problems: list[Problem]) -> None:
    """Place every wanted instance not kept, on memory not already promised to others.

    Replicas of one entry go to nodes their siblings do not use when that fits, else anywhere.
    """
    ready = {(s.instance_id, s.node_id) for s in observed.runners if s.state == "ready"}
    freed = _freed_by_replacing(desired, current, final, ready)
    for instance_id, entry in wanted:
        shape = desired.shapes.get(entry.model)
        if instance_id in final or shape is None:
            continue
        nodes = _with_commitments(_candidates(entry, eligible), final, desired, ready,
                                  _still_freed(freed, current, final))
        siblings = {n for other in entry.instance_ids() if other in final
                    for n in final[other].nodes()}
        tries = [nodes]
        if siblings and not entry.nodes:
            tries.insert(0, [n for n in nodes if n.node_id not in siblings])
        error: PlacementError | None = None
        for candidates in tries:
            try:
                final[instance_id] = place(
                    shape, candidates, strategy=entry.strategy, pinned_nodes=entry.nodes,
                    layer_counts=entry.layers, kv_headroom_tokens=_headroom(entry),
                    kv_bits=entry.kv_bits, instance_id=instance_id, owner=entry.owner,
                )
                break
            except PlacementError as exc:
                error = exc  # the last try's reason: placing on any candidate
        else:
            assert error is not None
            problems.append(Problem(instance_id=instance_id, message=str(error)))


def _place_drafts(wanted: list[tuple[str, DesiredInstance]], desired: DesiredState,
                  eligible: list[NodeProfile], observed: ObservedState,
                  current: dict[str, Placement], final: dict[str, Placement]) -> None:
    """Each placement's `draft_node` (see `draft_placement.choose_draft_node`)."""
    ready = {(s.instance_id, s.node_id) for s in observed.runners if s.state == "ready"}
    freed = _freed_by_replacing(desired, current, final, ready)
    nodes = _with_commitments(eligible, final, desired, ready, _still_freed(freed, current, final))
    for instance_id, entry in wanted:
        placement = final.get(instance_id)
        if placement is None:
            continue
        where: str | None = None
        if entry.draft is not None:
            draft = desired.shapes.get(entry.draft)
            need = draft_bytes(draft, kv_headroom_tokens=_headroom(entry),
                               kv_bits=entry.kv_bits) if draft is not None else None
            # `nodes` has every placement's runners subtracted already (this one's too).
            previous = current.get(instance_id)
            kept = previous is not None and _same_layout(previous, placement)
            where = choose_draft_node(placement, need, nodes, pinned=entry.draft_node,
                                      kept=kept,
                                      previous=previous.draft_node if previous else None)
        if where != placement.draft_node:
            final[instance_id] = placement.model_copy(update={"draft_node": where})


def _freed_by_replacing(desired: DesiredState, current: dict[str, Placement],
                        kept: dict[str, Placement], ready: set[tuple[str, str]]
                        ) -> dict[str, dict[str, int]]:
    """Memory that ready runners of placements this plan drops or redoes will give back, by
    instance, then node.

    Counting it lets a failed node's instance move onto survivors in the same plan, although
    the survivors still hold their old shares. Needs are estimated at the default KV headroom
    when the instance is no longer desired.
    """
    entries = {i: e for e in desired.instances for i in e.instance_ids()}
    freed: dict[str, dict[str, int]] = {}
    for instance_id, placement in current.items():
        entry = entries.get(instance_id)
        shape = desired.shapes.get(entry.model if entry else placement.model)
        if instance_id in kept or shape is None:
            continue
        needs = memory_needed(shape, placement,
                              kv_headroom_tokens=_headroom(entry) if entry else
                              DEFAULT_KV_HEADROOM_TOKENS,
                              kv_bits=entry.kv_bits if entry else None)
        for node_id, need in needs.items():
            if (instance_id, node_id) in ready:
                freed.setdefault(instance_id, {})[node_id] = need
    return freed


def _still_freed(freed: dict[str, dict[str, int]], current: dict[str, Placement],
                 final: dict[str, Placement]) -> dict[str, int]:
    """What `freed` gives back per node, leaving out instances placed again exactly as they
    run (their runners stay, and being ready they are not counted as loading either: counting
    their memory as given back would promise it twice)."""
    total: dict[str, int] = {}
    for instance_id, per_node in freed.items():
        again = final.get(instance_id)
        if again is not None and _same_runners(again, current[instance_id]):
            continue
        for node_id, need in per_node.items():
            total[node_id] = total.get(node_id, 0) + need
    return total


def _same_runners(a: Placement, b: Placement) -> bool:
    return a.strategy == b.strategy and a.stages == b.stages and a.dtype == b.dtype


def _with_commitments(nodes: list[NodeProfile], final: dict[str, Placement],
                      desired: DesiredState, ready: set[tuple[str, str]],
                      freed: dict[str, int]) -> list[NodeProfile]:
    """Nodes with the memory that placements already decided will take subtracted.

    A ready runner's memory already shows in what its node reports available, so only runners
    not yet ready are subtracted from that (and memory of ready runners being replaced is
    added back); a memory cap is a budget for all of flock's runners on the node, so every
    placed share counts against it.
    """
    entries = {i: e for e in desired.instances for i in e.instance_ids()}
    promised: dict[str, int] = {}
    loading: dict[str, int] = {}
    for instance_id, placement in final.items():
        entry = entries[instance_id]
        shape = desired.shapes.get(entry.model)
        if shape is None:
            continue  # kept without a known shape: its memory cannot be reckoned
        needs = memory_needed(shape, placement, kv_headroom_tokens=_headroom(entry),
                              kv_bits=entry.kv_bits)
        for node_id, need in needs.items():
            promised[node_id] = promised.get(node_id, 0) + need
            if (instance_id, node_id) not in ready:
                loading[node_id] = loading.get(node_id, 0) + need
    adjusted = []
    for node in nodes:
        update: dict[str, int] = {}
        if node.node_id in loading or node.node_id in freed:
            available = (node.memory_available_bytes + freed.get(node.node_id, 0)
                         - loading.get(node.node_id, 0))
            update["memory_available_bytes"] = min(max(0, available), node.memory_total_bytes)
        if node.memory_cap_bytes is not None and node.node_id in promised:
            update["memory_cap_bytes"] = max(0, node.memory_cap_bytes - promised[node.node_id])
        adjusted.append(node.model_copy(update=update) if update else node)
    return adjusted


def _headroom(entry: DesiredInstance) -> int:
    return entry.context_length or DEFAULT_KV_HEADROOM_TOKENS


# --- runners --------------------------------------------------------------------------------


def _runners_by_instance(runners: list[RunnerStatus],
                         alive: set[str]) -> dict[str, dict[tuple[str, int], RunnerStatus]]:
    """Runners that exist on alive nodes (stopped ones are gone), by instance, (node, rank)."""
    out: dict[str, dict[tuple[str, int], RunnerStatus]] = {}
    for status in runners:
        if status.state != "stopped" and status.node_id in alive:
            out.setdefault(status.instance_id, {})[(status.node_id, status.rank)] = status
    return out


def _same_layout(a: Placement, b: Placement) -> bool:
    """Same runners doing the same work (owner and reason aside)."""
    return a.model == b.model and a.stages == b.stages


def _runner_actions(instance_id: str, placement: Placement,
                    running: dict[tuple[str, int], RunnerStatus]) -> list[Action]:
    """Start a group that has no runners; restart all of it when any rank failed or is missing.

    Ranks of one instance form one mx.distributed group, which cannot take in a lone new
    member, so a partial group is restarted whole.
    """
    ranks = list(enumerate(placement.nodes()))
    if not running:
        return [StartRunner(instance_id=instance_id, node_id=n, rank=r) for r, n in ranks]
    healthy = all(s.state in ("starting", "ready") for s in running.values())
    if healthy and len(running) == len(ranks):
        return []
    return [RestartRunner(instance_id=instance_id, node_id=n, rank=r) for r, n in ranks]


# --- simulation -----------------------------------------------------------------------------


def apply(actions: list[Action], observed: ObservedState) -> ObservedState:
    """What the cluster would look like once `actions` took effect (runners as "starting").

    Used by tests to check that plans converge; the real loop applies actions by messages.
    """
    placements = {p.instance_id: p for p in observed.placements}
    runners = {(s.instance_id, s.node_id, s.rank): s for s in observed.runners}
    for action in actions:
        if isinstance(action, Place):
            placements[action.placement.instance_id] = action.placement
        elif isinstance(action, Remove):
            placements.pop(action.instance_id, None)
        elif isinstance(action, StopRunner):
            runners.pop((action.instance_id, action.node_id, action.rank), None)
        else:
            key = (action.instance_id, action.node_id, action.rank)
            runners[key] = RunnerStatus(instance_id=action.instance_id, node_id=action.node_id,
                                        rank=action.rank, state="starting")
    return observed.model_copy(update={"placements": list(placements.values()),
                                       "runners": list(runners.values())})
