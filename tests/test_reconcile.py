"""Reconcile (pure): plans converge in one step, keep stable placements, heal failures."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cluster.placement import memory_model, memory_needed
from agent.cluster.reconcile import (
    DesiredInstance,
    DesiredState,
    ObservedState,
    Place,
    Remove,
    RestartRunner,
    StartRunner,
    StopRunner,
    apply,
    desired_from_spec,
    plan,
    plan_with_problems,
)
from agent.cluster.state import ModelShape, NodeProfile, RunnerStatus
from agent.spec import ClusterSpec, ModelEntry
from tests.test_placement import SMOLLM2, node

MiB = 1 << 20
GiB = 1 << 30
SMALL = SMOLLM2.model_copy(update={"name": "small", "num_layers": 8})
SHAPES = {"smollm2": SMOLLM2.model_copy(update={"name": "smollm2"}), "small": SMALL}


def want(model: str = "smollm2", key: str | None = None, **fields: object) -> DesiredInstance:
    return DesiredInstance(key=key or model, model=model, **fields)


def desired(*instances: DesiredInstance) -> DesiredState:
    return DesiredState(instances=list(instances), shapes=SHAPES)


def converge(d: DesiredState, o: ObservedState) -> ObservedState:
    """Apply one plan and check that it was the whole job."""
    after = apply(plan(d, o), o)
    assert plan(d, after) == []
    return after


def settle(d: DesiredState, o: ObservedState) -> ObservedState:
    """Every runner reports ready, and its memory shows as used on its node, as it soon does."""
    entries = {i: e for e in d.instances for i in e.instance_ids()}
    used: dict[str, int] = {}
    for placement in o.placements:
        entry = entries.get(placement.instance_id)
        shape = d.shapes.get(entry.model) if entry else None
        if entry is None or shape is None:
            continue
        needs = memory_needed(shape, placement, kv_headroom_tokens=entry.context_length or 4096,
                              kv_bits=entry.kv_bits)
        for node_id, need in needs.items():
            if any(r.instance_id == placement.instance_id and r.node_id == node_id
                   and r.state in ("starting", "ready") for r in o.runners):
                used[node_id] = used.get(node_id, 0) + need
    nodes = [n.model_copy(update={"memory_available_bytes":
                                  max(0, n.memory_available_bytes - used.get(n.node_id, 0))})
             for n in o.nodes]
    runners = [r.model_copy(update={"state": "ready"}) if r.state == "starting" else r
               for r in o.runners]
    return o.model_copy(update={"nodes": nodes, "runners": runners})


def placement_of(o: ObservedState, instance_id: str):
    return next(p for p in o.placements if p.instance_id == instance_id)


# --- examples ---------------------------------------------------------------------------------


def test_a_new_instance_is_placed_and_every_rank_started() -> None:
    nodes = [node(i, 600 * MiB) for i in range(2)]
    actions = plan(desired(want()), ObservedState(nodes=nodes))
    place_action, *starts = actions
    assert isinstance(place_action, Place)
    assert place_action.placement.instance_id == "smollm2-0"
    assert place_action.placement.owner == "spec"
    assert starts == [StartRunner(instance_id="smollm2-0", node_id=n, rank=r)
                      for r, n in enumerate(place_action.placement.nodes())]


def test_planning_again_after_applying_changes_nothing() -> None:
    nodes = [node(i, 700 * MiB) for i in range(4)]
    d = desired(want(strategy="pipeline"), want("small", replicas=2))
    after = settle(d, converge(d, ObservedState(nodes=nodes)))
    assert plan(d, after) == []


def test_an_unrelated_node_joining_reshuffles_nothing() -> None:
    nodes = [node(i, 600 * MiB) for i in range(2)]
    d = desired(want())
    running = settle(d, converge(d, ObservedState(nodes=nodes)))
    joined = running.model_copy(update={"nodes": [*nodes, node(2, 64 * GiB)]})
    assert plan(d, joined) == []


def test_a_failed_nodes_instance_moves_to_survivors() -> None:
    nodes = [node(i, 600 * MiB) for i in range(3)]
    d = desired(want(strategy="pipeline"))
    running = settle(d, converge(d, ObservedState(nodes=nodes)))
    assert placement_of(running, "smollm2-0").nodes() == ["n0", "n1", "n2"]
    # Membership drops the dead node, and with it the runners it reported.
    survivors = running.model_copy(update={
        "nodes": [n for n in running.nodes if n.node_id != "n1"],
        "runners": [r for r in running.runners if r.node_id != "n1"],
    })
    actions = plan(d, survivors)
    stops = [a for a in actions if isinstance(a, StopRunner)]
    assert {(a.node_id, a.rank) for a in stops} == {("n0", 0), ("n2", 2)}  # n1 is gone
    healed = converge(d, survivors)
    assert placement_of(healed, "smollm2-0").nodes() == ["n0", "n2"]
    assert {(r.node_id, r.rank) for r in healed.runners} == {("n0", 0), ("n2", 1)}


def test_an_instance_that_fits_nowhere_is_removed_with_a_reason() -> None:
    nodes = [node(i, 600 * MiB) for i in range(2)]
    d = desired(want())
    running = settle(d, converge(d, ObservedState(nodes=nodes)))
    alone = running.model_copy(update={"nodes": running.nodes[:1]})
    actions, problems = plan_with_problems(d, alone)
    assert Remove(instance_id="smollm2-0") in actions
    assert problems and "does not fit" in problems[0].message
    assert plan(d, apply(actions, alone)) == []


def test_replicas_go_to_disjoint_nodes_when_possible() -> None:
    nodes = [node(i, 2 * GiB) for i in range(3)]
    after = converge(desired(want(replicas=3)), ObservedState(nodes=nodes))
    used = [placement_of(after, f"smollm2-{r}").nodes() for r in range(3)]
    assert sorted(n for nodes_ in used for n in nodes_) == ["n0", "n1", "n2"]
    # With one node for three replicas, they share it (as memory allows).
    crowded = converge(desired(want("small", replicas=3)), ObservedState(nodes=[node(0, 4 * GiB)]))
    assert len(crowded.placements) == 3


def test_memory_promised_to_one_instance_is_not_given_to_another() -> None:
    # Each node holds one SmolLM2 but not two; two instances must use both nodes.
    whole = memory_model(SHAPES["smollm2"]).need(30, first=True, last=True)
    nodes = [node(0, whole + 50 * MiB), node(1, whole + 50 * MiB)]
    d = desired(want(key="a"), want(key="b"))
    after = converge(d, ObservedState(nodes=nodes))
    assert placement_of(after, "a-0").nodes() != placement_of(after, "b-0").nodes()


def test_a_memory_cap_counts_ready_runners_too() -> None:
    whole = memory_model(SHAPES["smollm2"]).need(30, first=True, last=True)
    nodes = [node(0, 64 * GiB, cap=whole + 50 * MiB)]
    first = settle(desired(want(key="a")), converge(desired(want(key="a")),
                                                    ObservedState(nodes=nodes)))
    actions, problems = plan_with_problems(desired(want(key="a"), want(key="b")), first)
    assert actions == [] and problems[0].instance_id == "b-0"


def test_a_failed_rank_restarts_the_whole_group() -> None:
    nodes = [node(i, 600 * MiB) for i in range(3)]
    d = desired(want(strategy="pipeline"))
    running = settle(d, converge(d, ObservedState(nodes=nodes)))
    runners = [r.model_copy(update={"state": "failed"}) if r.rank == 1 else r
               for r in running.runners]
    actions = plan(d, running.model_copy(update={"runners": runners}))
    assert actions == [RestartRunner(instance_id="smollm2-0", node_id=f"n{r}", rank=r)
                       for r in range(3)]


def test_a_lost_rank_restarts_the_group_and_stray_runners_stop() -> None:
    nodes = [node(i, 600 * MiB) for i in range(2)]
    d = desired(want())
    running = settle(d, converge(d, ObservedState(nodes=nodes)))
    stray = RunnerStatus(instance_id="gone", node_id="n0", rank=0, state="ready")
    runners = [*running.runners[1:], stray]
    actions = plan(d, running.model_copy(update={"runners": runners}))
    assert StopRunner(instance_id="gone", node_id="n0", rank=0) in actions
    assert [a for a in actions if isinstance(a, RestartRunner)] == [
        RestartRunner(instance_id="smollm2-0", node_id=f"n{r}", rank=r) for r in range(2)]


def test_a_model_dropped_from_the_spec_is_stopped_and_removed() -> None:
    nodes = [node(i, 600 * MiB) for i in range(2)]
    running = settle(desired(want()), converge(desired(want()), ObservedState(nodes=nodes)))
    actions = plan(desired(), running)
    assert actions == [StopRunner(instance_id="smollm2-0", node_id="n0", rank=0),
                       StopRunner(instance_id="smollm2-0", node_id="n1", rank=1),
                       Remove(instance_id="smollm2-0")]


def test_a_changed_strategy_replaces_the_placement_and_its_runners() -> None:
    nodes = [node(i, 2 * GiB) for i in range(3)]
    pipeline = desired(want(strategy="pipeline"))
    running = settle(pipeline, converge(pipeline, ObservedState(nodes=nodes)))
    after = converge(desired(want(strategy="tensor")), running)
    assert placement_of(after, "smollm2-0").strategy == "tensor"
    assert all(r.state == "starting" for r in after.runners)


def test_owners_are_tracked_and_an_owner_change_keeps_the_runners() -> None:
    nodes = [node(i, 2 * GiB) for i in range(2)]
    d = desired(want("small", key="chat", owner="api"), want())
    running = settle(d, converge(d, ObservedState(nodes=nodes)))
    assert placement_of(running, "chat-0").owner == "api"
    assert placement_of(running, "smollm2-0").owner == "spec"
    adopted = desired(want("small", key="chat", owner="spec"), want())
    actions = plan(adopted, running)
    assert [type(a) for a in actions] == [Place]
    assert actions[0].placement.owner == "spec"


def test_nodes_of_another_version_never_serve() -> None:
    nodes = [node(0, 2 * GiB, version="0.2.0"), node(1, 2 * GiB)]
    after = converge(desired(want()), ObservedState(nodes=nodes, version="0.1.3"))
    assert placement_of(after, "smollm2-0").nodes() == ["n1"]


def test_labels_select_the_nodes_an_instance_may_use() -> None:
    nodes = [node(0, 8 * GiB), node(1, 2 * GiB, labels={"pool": "small"})]
    after = converge(desired(want(labels={"pool": "small"})), ObservedState(nodes=nodes))
    assert placement_of(after, "smollm2-0").nodes() == ["n1"]


def test_an_unknown_shape_keeps_what_runs_and_places_nothing_new() -> None:
    nodes = [node(i, 2 * GiB) for i in range(2)]
    running = settle(desired(want()), converge(desired(want()), ObservedState(nodes=nodes)))
    blind = DesiredState(instances=[want(), want("small")], shapes={})
    actions, problems = plan_with_problems(blind, running)
    assert actions == []
    assert [p.instance_id for p in problems] == ["small-0"]


def test_desired_state_from_the_spec_gives_stable_unique_ids() -> None:
    spec = ClusterSpec(models=[ModelEntry(model="HuggingFaceTB/SmolLM2-135M", replicas=2),
                               ModelEntry(model="HuggingFaceTB/SmolLM2-135M", strategy="tensor")])
    api = want("small", key="chat", owner="api")
    state = desired_from_spec(spec, SHAPES, [api])
    ids = [i for entry in state.instances for i in entry.instance_ids()]
    assert ids == ["huggingfacetb-smollm2-135m-0", "huggingfacetb-smollm2-135m-1",
                   "huggingfacetb-smollm2-135m.2-0", "chat-0"]
    assert [e.owner for e in state.instances] == ["spec", "spec", "api"]


# --- properties -------------------------------------------------------------------------------

WHOLE = memory_model(SHAPES["smollm2"]).need(30, first=True, last=True)


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeProfile]:
    count = draw(st.integers(1, 5))
    nodes = []
    for i in range(count):
        memory = WHOLE * draw(st.integers(10, 250)) // 100
        cap = draw(st.none() | st.integers(10, 250).map(lambda p: WHOLE * p // 100))
        nodes.append(node(i, memory, cap=cap, version=draw(st.sampled_from(["0.1.0", "0.1.4",
                                                                             "0.2.0"])),
                          labels=draw(st.sampled_from([{}, {"pool": "a"}, {"pool": "b"}]))))
    return nodes


@st.composite
def desires(draw: st.DrawFn) -> DesiredState:
    instances = []
    rarely = st.sampled_from([False, False, False, True])
    for i in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3]))):
        pinned = None
        if draw(rarely):
            pinned = draw(st.lists(st.sampled_from([f"n{j}" for j in range(5)]),
                                   min_size=1, max_size=3, unique=True))
        instances.append(DesiredInstance(
            key=f"m{i}", model=draw(st.sampled_from(["smollm2", "smollm2", "small", "unknown"])),
            replicas=draw(st.integers(1, 3)) if pinned is None else 1,
            strategy=draw(st.sampled_from(["auto", "pipeline", "tensor", "hybrid"])),
            nodes=pinned, labels={"pool": "a"} if draw(rarely) else None,
            context_length=draw(st.none() | st.sampled_from([512, 4096])),
            kv_bits=draw(st.none() | st.sampled_from([4, 8])),
            owner=draw(st.sampled_from(["spec", "api", "auto"])),
        ))
    return DesiredState(instances=instances, shapes=SHAPES)


@st.composite
def histories(draw: st.DrawFn) -> tuple[DesiredState, ObservedState]:
    """A cluster that converged on some earlier wish, then changed: nodes came and went,
    runners failed or vanished, and the wish itself may differ now."""
    before_nodes = draw(clusters())
    earlier = draw(desires())
    observed = ObservedState(nodes=before_nodes, version="0.1.0")
    observed = apply(plan(earlier, observed), observed)
    states = st.sampled_from(["starting", "ready", "failed", "stopped", "gone"])
    runners = []
    for status in observed.runners:
        state = draw(states)
        if state != "gone":
            runners.append(status.model_copy(update={"state": state}))
    now_nodes = [n for n in before_nodes if draw(st.booleans()) or n.node_id == "n0"]
    now_nodes += draw(clusters()).copy()[: draw(st.integers(0, 2))]
    unique = {n.node_id: n for n in reversed(now_nodes)}  # a rejoined id keeps its old profile
    observed = observed.model_copy(update={"nodes": list(unique.values()), "runners": runners})
    wish = earlier if draw(st.booleans()) else draw(desires())
    return wish, observed


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(history=histories())
def test_a_plan_applied_leaves_nothing_to_do(history: tuple[DesiredState, ObservedState]) -> None:
    d, o = history
    after = apply(plan(d, o), o)
    assert plan(d, after) == []
    assert plan(d, settle(d, after)) == []


@PROPERTY
@given(history=histories())
def test_every_placed_instance_is_wanted_alive_and_fully_started(
    history: tuple[DesiredState, ObservedState],
) -> None:
    d, o = history
    after = apply(plan(d, o), o)
    wanted = {i for entry in d.instances for i in entry.instance_ids()}
    alive = {n.node_id for n in o.nodes}
    for placement in after.placements:
        assert placement.instance_id in wanted
        assert set(placement.nodes()) <= alive
        ranks = {(r.node_id, r.rank) for r in after.runners
                 if r.instance_id == placement.instance_id and r.state != "stopped"
                 and r.node_id in alive}
        assert ranks == {(n, rank) for rank, n in enumerate(placement.nodes())}


@PROPERTY
@given(history=histories(), memory=st.integers(10, 400))
def test_a_joining_node_never_moves_a_placed_instance(
    history: tuple[DesiredState, ObservedState], memory: int
) -> None:
    d, o = history
    settled = settle(d, apply(plan(d, o), o))
    joined = settled.model_copy(update={"nodes": [*settled.nodes, node(9, WHOLE * memory // 100)]})
    placed = {p.instance_id for p in settled.placements}
    for action in plan(d, joined):
        assert getattr(action, "instance_id", None) not in placed
        if isinstance(action, Place):
            assert action.placement.instance_id not in placed


def test_shapes_differ_only_where_the_tests_mean_them_to() -> None:
    assert isinstance(SMALL, ModelShape) and SMALL.num_layers == 8
