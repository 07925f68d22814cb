"""What the cluster reports about itself: the `/cluster` JSON, and the cluster's metrics.

Both only read: the assignment, the peer table's views, and the states of this node's runners.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from agent import sysinfo
from agent.cluster.assignment import Assignment
from agent.cluster.membership import PeerView
from agent.cluster.state import NodeProfile
from agent.serving.balance import ReplicaLoad
from agent.serving.pool import RunnerState
from agent.serving.router import Router
from agent.spec import ClusterSpec, spec_hash


def status_report(*, node_id: str, cluster: str, leader: str | None, assignment: Assignment,
                  local_spec: ClusterSpec | None, spec_errors: list[str],
                  nodes: dict[str, NodeProfile], views: Sequence[PeerView],
                  incompatible: Sequence[Any], runners: Sequence[RunnerState],
                  router: Router | None = None) -> dict[str, Any]:
    spec = assignment.spec
    local_hash = spec_hash(local_spec) if local_spec else None
    by_id = {v.profile.node_id: v for v in views}
    rows = []
    for peer_id, profile in sorted(nodes.items()):
        view = by_id.get(peer_id)
        rows.append({
            **profile.model_dump(mode="json"),
            "status": "self" if peer_id == node_id else
            (view.status if view is not None else "unknown"),
            "rtt_ms": view.rtt_ms if view is not None else None,
            "leader": peer_id == leader,
        })
    return {
        "node_id": node_id,
        "cluster": cluster,
        "leader": leader,
        "assignment_generation": assignment.generation,
        "spec": {
            "generation": spec.generation if spec else 0,
            "hash": spec.hash if spec else None,
            "local_file": None if local_hash is None else
            ("in sync" if spec and spec.hash == local_hash else "differs"),
            "errors": spec_errors,
        },
        "nodes": rows,
        "incompatible": [v.__dict__ if hasattr(v, "__dict__") else str(v)
                         for v in incompatible],
        "placements": [{**p.model_dump(mode="json"), "head": p.head_node,
                        "slot": assignment.slots.get(p.instance_id)}
                       for p in assignment.placements],
        "runners": [{"key": r.key, "model": r.model, "role": r.role, "layers": list(r.layers),
                     "state": r.state, "detail": r.detail} for r in runners],
        "problems": [p.model_dump(mode="json") for p in assignment.problems],
        **replica_report(assignment, router),
    }


def replica_report(assignment: Assignment, router: Router | None) -> dict[str, Any]:
    """Per-replica load (measured here or reported by the head's node), this node's last
    routing decisions, the scale-on-load changes with their reasons, and each model's
    speculative decoding figures (`speculation_report`)."""
    loads = router.all_loads() if router is not None else {}
    draining = set(assignment.draining)
    replicas: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(assignment.placements, key=lambda p: p.instance_id):
        load = loads.get(p.instance_id)
        replicas.setdefault(p.model, []).append({
            "instance_id": p.instance_id, "head": p.head_node,
            "draining": p.instance_id in draining,
            "load": msgspec.to_builtins(load) if load is not None else None})
    return {
        "replicas": replicas,
        "routing": [d.__dict__ for d in router.decisions] if router is not None else [],
        "scaling": {"replicas": dict(assignment.scaled), "draining": sorted(draining),
                    "events": [e.model_dump(mode="json") for e in assignment.scale_events]},
        "speculation": speculation_report(assignment, loads),
    }


def speculation_report(assignment: Assignment, loads: dict[str, ReplicaLoad]
                       ) -> dict[str, dict[str, float]]:
    """Per model, over its replicas whose load is known (measured here or reported): tokens
    drafted, drafted tokens kept, verification passes that carried a draft, the acceptance
    rate (kept / drafted) and the mean kept per such pass. Totals since each replica's runner
    started, so a restarted replica counts from zero again."""
    out: dict[str, dict[str, float]] = {}
    for p in sorted(assignment.placements, key=lambda p: p.instance_id):
        load = loads.get(p.instance_id)
        row = out.setdefault(p.model, {"drafted_tokens": 0, "accepted_tokens": 0,
                                       "draft_passes": 0})
        if load is not None:
            row["drafted_tokens"] += load.drafted_tokens
            row["accepted_tokens"] += load.accepted_draft_tokens
            row["draft_passes"] += load.draft_passes
    for row in out.values():
        drafted, kept, passes = row["drafted_tokens"], row["accepted_tokens"], row["draft_passes"]
        row["acceptance_rate"] = kept / drafted if drafted else 0.0
        row["accepted_per_pass"] = kept / passes if passes else 0.0
    return out


class ClusterMetrics:
    """Publishes node memory, peer round trips and this node's share of placements."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self._rtt_peers: set[str] = set()  # peers flock_peer_rtt_seconds has a series for

    def publish(self, node_id: str, me: str, views: Sequence[PeerView],
                assignment: Assignment, router: Router | None = None) -> None:
        from agent.metrics import PlacementRow

        m = self.metrics
        m.set_node_memory(sysinfo.total_memory_bytes(), sysinfo.available_memory_bytes())
        exported: set[str] = set()
        for view in views:
            if view.profile.node_id == node_id:
                continue  # views() lists this node first, with a round trip of 0
            if view.status != "dead" and view.rtt_ms is not None:
                name = view.profile.name or view.profile.node_id
                m.set_peer_rtt(name, view.rtt_ms / 1000)
                exported.add(name)
        for name in self._rtt_peers - exported:  # dead or forgotten: no stale round trip
            m.forget_peer(name)
        self._rtt_peers = exported
        rows = []
        for placement in assignment.placements:
            rank = 0
            for stage in placement.stages:
                for node in stage.nodes:
                    if node == node_id:
                        rows.append(PlacementRow(placement.model, placement.instance_id, me,
                                                 rank, stage.layer_start, stage.layer_stop))
                    rank += 1
        m.set_placements(rows)
        counts: dict[str, int] = {}
        for placement in assignment.placements:
            counts[placement.model] = counts.get(placement.model, 0) + 1
        m.set_replica_counts(counts)
        if router is not None:
            models = {p.instance_id: p.model for p in assignment.placements}
            m.set_replica_loads(
                (models.get(load.instance_id, ""), load.instance_id, {
                    "running": load.running, "queued": load.queued,
                    "in_flight": load.in_flight, "outstanding_tokens": load.outstanding_tokens,
                    "queue_wait_seconds": load.queue_wait_s, "idle_seconds": load.idle_s,
                    "requests": load.requests_total})
                for load in router.local_loads())
