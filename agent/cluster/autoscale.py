"""Scale on load: when a model gets another replica, and when an added one is drained and removed.

The leader decides, from the replicas' measured loads (`balance.ReplicaLoad`, reported by every
node): a `[[models]]` entry with `max_replicas` whose every serving replica has had a request
waiting for a batch slot or KV room longer than `scale_up_wait_s`, for `scale_up_after_s` on
end, gets one more replica (the placement puts it on a node with room); an added replica (above
the entry's `replicas`) that got no request for `keep_alive` seconds is drained (the router
sends it nothing new, running requests finish) and, once it runs nothing, removed. Replicas are
added and removed at the top of the id range (`<key>-N`), so ids stay `<key>-0..N-1`.

`scale_step` is pure: state in, state and the events that changed it out. Every event carries
its reason, for status and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.cluster.assignment import Assignment, Change, ScaleEvent
from agent.cluster.reconcile import spec_keys
from agent.serving.balance import ReplicaLoad
from agent.spec import ClusterSpec

log = logging.getLogger("flock.cluster")
EVENTS_KEPT = 20  # scale events the assignment carries (newest last)


@dataclass(frozen=True)
class ScalePolicy:
    """One `[[models]]` entry's scaling settings."""

    key: str
    model: str
    replicas: int  # never fewer
    max_replicas: int
    scale_up_wait_s: float = 2.0
    scale_up_after_s: float = 10.0
    keep_alive_s: float = 300.0


@dataclass
class ScaleMemory:
    """What the leader remembers between steps: since when each entry has been overloaded."""

    overloaded_since: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScaleState:
    replicas: Mapping[str, int]  # entry key -> replicas now (absent: the entry's own count)
    draining: frozenset[str]


def policies(spec: ClusterSpec, keys: list[str]) -> list[ScalePolicy]:
    """The scaling policy of every spec entry that sets `max_replicas` (keys: `spec_keys`)."""
    out = []
    for key, entry in zip(keys, spec.models, strict=True):
        if entry.max_replicas is None or entry.replicas == "auto":
            continue
        out.append(ScalePolicy(key=key, model=entry.model, replicas=int(entry.replicas),
                               max_replicas=entry.max_replicas,
                               scale_up_wait_s=entry.scale_up_wait_s,
                               scale_up_after_s=entry.scale_up_after_s,
                               keep_alive_s=entry.keep_alive))
    return out


def scale_step(rules: list[ScalePolicy], state: ScaleState,
               loads: Mapping[str, ReplicaLoad], memory: ScaleMemory, *, now: float,
               wall: float) -> tuple[ScaleState, list[ScaleEvent]]:
    """One decision round. `loads`: instance id -> its measured load (absent: no report, so
    not serving yet); `now` is a monotonic clock for the waits, `wall` stamps events."""
    replicas = dict(state.replicas)
    draining = set(state.draining)
    events: list[ScaleEvent] = []
    keys = {rule.key for rule in rules}
    for key in [k for k in replicas if k not in keys]:  # no longer scaled: back to its own
        del replicas[key]
    for rule in rules:
        count = min(max(replicas.get(rule.key, rule.replicas), rule.replicas), rule.max_replicas)
        ids = [f"{rule.key}-{r}" for r in range(count)]

        def event(instance_id: str, change: Change, reason: str, n: int, cause: str,
                  rule: ScalePolicy = rule) -> None:
            events.append(ScaleEvent(at=wall, key=rule.key, model=rule.model,
                                     instance_id=instance_id, change=change, reason=reason,
                                     replicas=n, cause=cause))

        for instance_id in [i for i in draining if i.startswith(rule.key + "-")
                            and i not in ids[rule.replicas:]]:
            draining.discard(instance_id)  # now within the floor again: serves on
            event(instance_id, "undrain", f"{rule.key} needs at least {rule.replicas}", count,
                  "floor")
        serving = [loads[i] for i in ids if i in loads and loads[i].ready and i not in draining]
        starting = [i for i in ids if i not in loads or not loads[i].ready]
        waits = [load.queue_wait_s for load in serving]
        overloaded = bool(serving) and min(waits) > rule.scale_up_wait_s
        top_draining = [i for i in ids[rule.replicas:] if i in draining]
        if overloaded and top_draining:
            for instance_id in top_draining:  # load came back before it drained: serve on
                draining.discard(instance_id)
                event(instance_id, "undrain", "requests are waiting again", count, "load_back")
        elif overloaded and not starting:
            since = memory.overloaded_since.setdefault(rule.key, now)
            if now - since >= rule.scale_up_after_s and count < rule.max_replicas:
                count += 1
                memory.overloaded_since[rule.key] = now  # the next one waits its own period
                event(f"{rule.key}-{count - 1}", "add",
                      f"requests waited {min(waits):.1f}s for a slot (over "
                      f"{rule.scale_up_wait_s:g}s) for {now - since:.0f}s on all "
                      f"{len(serving)} replicas", count, "queue_wait")
        elif not overloaded:
            memory.overloaded_since.pop(rule.key, None)
        if count > rule.replicas and not overloaded:
            top = ids[count - 1] if count <= len(ids) else None
            load = loads.get(top) if top is not None else None
            if top is not None and top in draining:
                if load is None or (load.in_flight == 0 and load.running == 0):
                    draining.discard(top)
                    count -= 1
                    event(top, "remove", "drained: no request in flight", count, "drained")
            elif top is not None and load is not None and load.idle_s >= rule.keep_alive_s:
                draining.add(top)
                event(top, "drain", f"no request for {load.idle_s:.0f}s (keep_alive "
                                    f"{rule.keep_alive_s:g}s)", count, "idle")
        if count != rule.replicas or rule.key in replicas:
            replicas[rule.key] = count
    return ScaleState(replicas=replicas, draining=frozenset(draining)), events


def scale_assignment(assignment: Assignment, loads: Mapping[str, ReplicaLoad],
                     memory: ScaleMemory, *, metrics: Any = None,
                     now: float | None = None) -> Assignment | None:
    """The leader's scaling round on its assignment: the assignment with the new replica
    counts, drains and events, or None when nothing changed."""
    spec = assignment.spec.spec if assignment.spec else None
    rules = policies(spec, spec_keys(spec)) if spec is not None else []
    if not rules and not assignment.scaled and not assignment.draining:
        return None
    state = ScaleState(replicas=assignment.scaled, draining=frozenset(assignment.draining))
    after, events = scale_step(rules, state, loads, memory,
                               now=time.monotonic() if now is None else now, wall=time.time())
    if not events and dict(after.replicas) == assignment.scaled \
            and sorted(after.draining) == sorted(assignment.draining):
        return None
    for e in events:
        log.info("scale %s: %s %s (%s); %d replicas", e.key, e.change, e.instance_id, e.reason,
                 e.replicas)
        if metrics is not None:
            metrics.replica_scaled(e.model, e.change, e.cause)
    return assignment.model_copy(update={
        "scaled": dict(after.replicas), "draining": sorted(after.draining),
        "scale_events": [*assignment.scale_events, *events][-EVENTS_KEPT:]})
