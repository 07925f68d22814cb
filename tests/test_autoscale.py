"""Scale on load (pure): a replica is added after sustained waiting, an added one is drained
after keep_alive without requests and removed once empty, never below `replicas`."""

from __future__ import annotations

from agent.cluster.assignment import Assignment
from agent.cluster.autoscale import (
    ScaleMemory,
    ScalePolicy,
    ScaleState,
    policies,
    scale_assignment,
    scale_step,
)
from agent.cluster.reconcile import desired_from_spec, spec_keys
from agent.serving.balance import ReplicaLoad
from agent.spec import ClusterSpec, ModelEntry, VersionedSpec

RULE = ScalePolicy(key="m", model="m", replicas=1, max_replicas=2, scale_up_wait_s=2.0,
                   scale_up_after_s=10.0, keep_alive_s=300.0)


def loads(**waits: float) -> dict[str, ReplicaLoad]:
    return {i.replace("_", "-"): ReplicaLoad(instance_id=i.replace("_", "-"), queue_wait_s=w)
            for i, w in waits.items()}


def step(state: ScaleState, observed: dict[str, ReplicaLoad], memory: ScaleMemory,
         now: float) -> tuple[ScaleState, list[str]]:
    after, events = scale_step([RULE], state, observed, memory, now=now, wall=now)
    return after, [f"{e.change} {e.instance_id}" for e in events]


def test_sustained_waiting_adds_one_replica_after_scale_up_after_s() -> None:
    memory, state = ScaleMemory(), ScaleState(replicas={}, draining=frozenset())
    for t in (0.0, 5.0, 9.9):
        state, events = step(state, loads(m_0=3.0), memory, t)
        assert events == [] and state.replicas == {}
    state, events = step(state, loads(m_0=3.0), memory, 10.0)
    assert events == ["add m-1"] and state.replicas == {"m": 2}
    # At max_replicas: no more, however long it waits.
    state, events = step(state, loads(m_0=9.0, m_1=9.0), memory, 60.0)
    assert events == [] and state.replicas == {"m": 2}


def test_a_short_wait_or_a_gap_in_the_waiting_starts_over() -> None:
    memory, state = ScaleMemory(), ScaleState(replicas={}, draining=frozenset())
    step(state, loads(m_0=3.0), memory, 0.0)
    step(state, loads(m_0=1.0), memory, 5.0)  # below scale_up_wait_s: the clock resets
    _, events = step(state, loads(m_0=3.0), memory, 11.0)
    assert events == []
    _, events = step(state, loads(m_0=3.0), memory, 21.0)
    assert events == ["add m-1"]


def test_an_idle_added_replica_is_drained_then_removed_but_never_the_base() -> None:
    memory = ScaleMemory()
    state = ScaleState(replicas={"m": 2}, draining=frozenset())
    idle = {"m-0": ReplicaLoad(instance_id="m-0", idle_s=900.0),
            "m-1": ReplicaLoad(instance_id="m-1", idle_s=100.0)}
    state, events = step(state, idle, memory, 0.0)
    assert events == []  # m-1 not idle long enough; m-0 is the base, never drained
    busy = {**idle, "m-1": ReplicaLoad(instance_id="m-1", idle_s=301.0, in_flight=1, running=1)}
    state, events = step(state, busy, memory, 1.0)
    assert events == ["drain m-1"] and state.draining == {"m-1"}
    state, events = step(state, busy, memory, 2.0)  # still running its last request
    assert events == [] and state.replicas == {"m": 2}
    done = {**idle, "m-1": ReplicaLoad(instance_id="m-1", idle_s=303.0)}
    state, events = step(state, done, memory, 3.0)
    assert events == ["remove m-1"] and state.replicas == {"m": 1} and not state.draining
    state, events = step(state, {"m-0": idle["m-0"]}, memory, 4.0)
    assert events == [] and state.replicas == {"m": 1}


def test_a_draining_replica_serves_on_when_requests_wait_again() -> None:
    memory = ScaleMemory()
    state = ScaleState(replicas={"m": 2}, draining=frozenset({"m-1"}))
    waiting = {"m-0": ReplicaLoad(instance_id="m-0", queue_wait_s=5.0),
               "m-1": ReplicaLoad(instance_id="m-1", idle_s=400.0, in_flight=1)}
    state, events = step(state, waiting, memory, 0.0)
    assert events == ["undrain m-1"] and not state.draining


def test_no_scale_up_while_a_replica_is_still_starting() -> None:
    memory = ScaleMemory()
    rule = ScalePolicy(key="m", model="m", replicas=1, max_replicas=3, scale_up_after_s=1.0)
    state = ScaleState(replicas={"m": 2}, draining=frozenset())
    for t in (0.0, 5.0):
        state, events = scale_step([rule], state, loads(m_0=9.0), memory, now=t, wall=t)
        assert events == []  # m-1 has not reported yet


def test_policies_come_from_spec_entries_with_max_replicas() -> None:
    spec = ClusterSpec(models=[
        ModelEntry(model="a"), ModelEntry(model="b", replicas=2, max_replicas=4,
                                          scale_up_wait_s=0.5, scale_up_after_s=1.0,
                                          keep_alive=5.0)])
    [rule] = policies(spec, spec_keys(spec))
    assert (rule.key, rule.replicas, rule.max_replicas, rule.keep_alive_s) == ("b", 2, 4, 5.0)
    desired = desired_from_spec(spec, {}, scaled={"b": 3})
    assert [d.replicas for d in desired.instances] == [1, 3]


def test_the_leader_records_each_change_with_its_reason() -> None:
    spec = ClusterSpec(models=[ModelEntry(model="m", max_replicas=2, scale_up_after_s=1.0)])
    assignment = Assignment(spec=VersionedSpec.first(spec))
    memory = ScaleMemory()
    assert scale_assignment(assignment, loads(m_0=3.0), memory, now=0.0) is None
    scaled = scale_assignment(assignment, loads(m_0=3.0), memory, now=1.5)
    assert scaled is not None and scaled.scaled == {"m": 2}
    [event] = scaled.scale_events
    assert event.change == "add" and event.instance_id == "m-1"
    assert "waited 3.0s" in event.reason
