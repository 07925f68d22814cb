"""The controller's routing decisions, as the router reads them: a `RouteTable` built from the
assignment and the peer table.

Each model is routed to its replicas (every instance of it), each one to its head: this node's
head runner, or a stream to the peer holding it; the router picks a replica per request. Nodes
not heard from (suspect, gone, unknown) are listed, so the router holds requests back from an
instance that lost a node and ends streams cut off by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from agent.cluster.assignment import Assignment
from agent.cluster.remote_head import RemoteHeads
from agent.cluster.state import NodeProfile, Placement
from agent.engine import canonical_name
from agent.serving.router import HeadRoute, RouteTable

# A node's membership status ("alive", "suspect", ...; None when unknown).
NodeStatus = Callable[[str], str | None]


def not_heard_from(nodes: Iterable[str], node_id: str, status: NodeStatus,
                   profiles: dict[str, NodeProfile]) -> dict[str, str]:
    """node id -> name of each of `nodes` (other than this one) that is not alive."""
    out = {}
    for node in nodes:
        if node != node_id and status(node) != "alive":
            profile = profiles.get(node)
            out[node] = profile.name if profile is not None else node[:8]
    return out


def lost_node(placement: Placement, node_id: str, status: NodeStatus,
              profiles: dict[str, NodeProfile]) -> str | None:
    """The name of a node of `placement` that is not heard from, if any."""
    down = not_heard_from(placement.nodes(), node_id, status, profiles)
    return next(iter(down.values()), None)


def placement_for(assignment: Assignment, model: str, node_id: str) -> Placement | None:
    """One instance of `model`: one headed on this node first (the router picks among all of
    them per request; this is for callers that want one)."""
    found = [p for p in assignment.placements if p.model == model]
    local = [p for p in found if p.head_node == node_id]
    return (local or found or [None])[0]


def head_route(placement: Placement, node_id: str, profiles: dict[str, NodeProfile],
               remote: RemoteHeads) -> HeadRoute:
    """How this node reaches `placement`'s head: its own runner, or a stream to the peer."""
    head = placement.head_node
    route = HeadRoute(instance_id=placement.instance_id, nodes=tuple(placement.nodes()),
                      node_id=head)
    if head == node_id:
        return replace(route, local_key=f"{placement.instance_id}/0")
    if (profile := profiles.get(head)) is not None and profile.addresses:
        return replace(route, remote=remote.stream_to(profile, placement.instance_id))
    return route


def route_table(assignment: Assignment, node_id: str, profiles: dict[str, NodeProfile],
                status: NodeStatus, remote: RemoteHeads) -> RouteTable:
    """Every replica of every placed model (the router chooses between them per request)."""
    replicas: dict[str, list[HeadRoute]] = {}
    for placement in sorted(assignment.placements, key=lambda p: p.instance_id):
        replicas.setdefault(placement.model, []).append(
            head_route(placement, node_id, profiles, remote))
    placed = {n for p in assignment.placements for n in p.nodes()}
    spec = assignment.spec
    return RouteTable(
        node_id=node_id, routes={m: tuple(r) for m, r in replicas.items()},
        down=not_heard_from(placed | set(profiles), node_id, status, profiles),
        placeable=frozenset(m for p in profiles.values() for m in p.models),
        planned=frozenset(canonical_name(m.model) for m in spec.spec.models) if spec else
        frozenset(),
        draining=frozenset(assignment.draining))
