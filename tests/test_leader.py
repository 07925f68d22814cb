"""Leader choice (pure): lowest healthy node id among nodes of a compatible version."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.cluster.leader import compatible, elect
from tests.test_placement import node


def test_versions_with_the_same_major_minor_are_compatible() -> None:
    assert compatible("0.1.0", "0.1.7")
    assert compatible("v1.2.3", "1.2.0rc1")
    assert not compatible("0.1.0", "0.2.0")
    assert not compatible("1.1.0", "2.1.0")
    assert compatible("dev", "dev") and not compatible("dev", "0.1.0")


def test_the_leader_is_the_lowest_compatible_node_id() -> None:
    nodes = [node(3, 1), node(1, 1, version="0.2.0"), node(2, 1, version="0.1.5")]
    assert elect(nodes, version="0.1.0") == "n2"
    assert elect(nodes, version="0.2.1") == "n1"
    assert elect(nodes, version="1.0.0") is None
    assert elect([], version="0.1.0") is None


@given(st.permutations([node(i, 1, version=v) for i, v in
                        enumerate(["0.1.0", "0.1.2", "0.2.0", "0.1.9", "0.2.3"])]))
def test_every_node_elects_the_same_leader_whatever_order_it_sees(nodes: list) -> None:
    assert elect(nodes, version="0.1.1") == "n0"
    assert elect(nodes, version="0.2.0") == "n2"
