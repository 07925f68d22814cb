"""Who decides placements: one leader, computed alike on every node from the same membership.

No election protocol: every node applies the same rule to the nodes it sees alive, so nodes
that see the same membership agree, and a changed membership moves leadership without messages.
"""

from __future__ import annotations

import re

from agent.cluster.state import NodeProfile

_MAJOR_MINOR = re.compile(r"^\s*v?(\d+)\.(\d+)")


def compatible(a_version: str, b_version: str) -> bool:
    """Whether two flock versions may share an instance and a leader: same major.minor.

    A version without a major.minor prefix is only compatible with itself.
    """
    a, b = _MAJOR_MINOR.match(a_version), _MAJOR_MINOR.match(b_version)
    if a is None or b is None:
        return a_version.strip() == b_version.strip()
    return (int(a.group(1)), int(a.group(2))) == (int(b.group(1)), int(b.group(2)))


def elect(nodes: list[NodeProfile], *, version: str) -> str | None:
    """The leader's node id: the lowest id among `nodes` (the healthy ones, as membership
    reports them) whose version is compatible with `version`; None when there are none.

    Nodes of another major.minor (a rolling upgrade in progress) follow their own leader,
    so two versions never place instances onto each other.
    """
    ids = [n.node_id for n in nodes if compatible(n.version, version)]
    return min(ids) if ids else None
