"""What the cluster reports about itself: the `/cluster` JSON, and the cluster's metrics.

Both only read: the assignment, the peer table's views, and the states of this node's runners.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent import sysinfo
from agent.cluster.assignment import Assignment
from agent.cluster.membership import PeerView
from agent.cluster.state import NodeProfile
from agent.serving.pool import RunnerState
from agent.spec import ClusterSpec, spec_hash


def status_report(*, node_id: str, cluster: str, leader: str | None, assignment: Assignment,
                  local_spec: ClusterSpec | None, spec_errors: list[str],
                  nodes: dict[str, NodeProfile], views: Sequence[PeerView],
                  incompatible: Sequence[Any], runners: Sequence[RunnerState]
                  ) -> dict[str, Any]:
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
    }


class ClusterMetrics:
    """Publishes node memory, peer round trips and this node's share of placements."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self._rtt_peers: set[str] = set()  # peers flock_peer_rtt_seconds has a series for

    def publish(self, node_id: str, me: str, views: Sequence[PeerView],
                assignment: Assignment) -> None:
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
