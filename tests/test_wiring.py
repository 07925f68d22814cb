"""From placements to runner configurations: roles, layers and links agree across nodes."""

from __future__ import annotations

import pytest

from agent.cluster.state import NodeProfile, Placement, Stage
from agent.cluster.wiring import WiringError, free_slot, runner_configs
from agent.runtime.protocol import RunnerConfig

BASE = RunnerConfig(model_name="", model_dir="")


def node(i: int) -> NodeProfile:
    return NodeProfile(node_id=f"n{i}", name=f"node{i}", version="0.1.0",
                       addresses=[f"10.0.0.{i}"], api_port=52415, memory_total_bytes=1 << 34,
                       memory_available_bytes=1 << 33, data_port=52500)


PROFILES = {f"n{i}": node(i) for i in range(6)}


def placement(*stages: tuple[int, int, list[str]], strategy: str = "pipeline") -> Placement:
    return Placement(instance_id="m-0", model="m", strategy=strategy,  # type: ignore[arg-type]
                     stages=[Stage(layer_start=a, layer_stop=b, nodes=n) for a, b, n in stages])


def test_pipeline_is_a_ring_back_to_the_head() -> None:
    configs = runner_configs(placement((0, 10, ["n0"]), (10, 20, ["n1"]), (20, 30, ["n2"])),
                             2, PROFILES, BASE)
    head, mid, last = configs[("n0", 0)], configs[("n1", 1)], configs[("n2", 2)]
    assert (head.role, mid.role, last.role) == ("head", "follower", "follower")
    assert head.downstream == mid.listen == "10.0.0.1:52508"
    assert mid.downstream == last.listen and last.downstream == head.listen == "10.0.0.0:52508"
    assert [(c.layer_start, c.layer_stop) for c in (head, mid, last)] == [(0, 10), (10, 20),
                                                                          (20, 30)]


def test_tensor_group_rank_zero_drives_its_peers() -> None:
    configs = runner_configs(placement((0, 30, ["n0", "n1", "n2"]), strategy="tensor"), 0,
                             PROFILES, BASE)
    lead = configs[("n0", 0)]
    assert lead.role == "solo" and lead.tp_peers == ["10.0.0.1:52500", "10.0.0.2:52500"]
    assert lead.tp_hosts == ["10.0.0.0:52501", "10.0.0.1:52501", "10.0.0.2:52501"]
    assert [configs[(f"n{i}", i)].tp_rank for i in range(3)] == [0, 1, 2]
    assert configs[("n1", 1)].role == "tp_follower"


def test_hybrid_stages_are_led_by_their_first_node() -> None:
    configs = runner_configs(placement((0, 15, ["n0", "n1", "n2"]), (15, 30, ["n3", "n4", "n5"]),
                                       strategy="hybrid"), 1, PROFILES, BASE)
    head, second = configs[("n0", 0)], configs[("n3", 3)]
    assert head.role == "head" and second.role == "follower"
    assert head.downstream == second.listen and second.downstream == head.listen
    assert head.tp_peers == ["10.0.0.1:52504", "10.0.0.2:52504"]
    assert second.tp_hosts == ["10.0.0.3:52505", "10.0.0.4:52505", "10.0.0.5:52505"]
    peer = configs[("n4", 4)]
    assert (peer.role, peer.layer_start, peer.tp_rank) == ("tp_follower", 15, 1)


def test_slots_never_collide_on_a_shared_node() -> None:
    p = placement((0, 30, ["n0", "n1"]), strategy="tensor")
    assert free_slot(p, {"n1": {0, 1}, "n0": {2}}) == 3


def test_unknown_nodes_are_refused() -> None:
    with pytest.raises(WiringError, match="unknown node"):
        runner_configs(placement((0, 30, ["nX"])), 0, PROFILES, BASE)
