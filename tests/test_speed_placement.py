"""Speed-aware placement (pure): layers by measured decode speed within memory, slow nodes left
out with a reason, stage order by links; plus the compute probe and its cache key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cluster.assignment import Assignment
from agent.cluster.compute_probe import CACHE_FILE, measure_speed
from agent.cluster.link_probe import links_from, rounded, transfer_mbps
from agent.cluster.placement import PlacementError, memory_model, place, still_valid
from agent.cluster.placement_speed import hop_seconds
from agent.cluster.state import Link, ModelShape, NodeProfile, Placement
from agent.cluster.status import status_report
from agent.settings import NodeSettings
from tests.test_placement import SMOLLM2, GiB, check_invariants, layer_counts, model_shapes

ROOT = Path(__file__).resolve().parents[1]


def fast_node(i: int, memory: int, speed: float, *, cap: int | None = None,
              links: dict[str, Link] | None = None) -> NodeProfile:
    return NodeProfile(
        node_id=f"n{i}", name=f"node{i}", version="0.1.0", addresses=["127.0.0.1"],
        api_port=52000 + i, memory_total_bytes=memory, memory_available_bytes=memory,
        memory_cap_bytes=cap, compute_gflops=speed * 10, decode_gflops=speed,
        links=links or {},
    )


def shares(placement: Placement) -> dict[str, int]:
    return dict(zip(placement.nodes(), layer_counts(placement), strict=True))


@st.composite
def speed_cases(draw: st.DrawFn, max_nodes: int = 4) -> tuple[ModelShape, list[NodeProfile]]:
    """A model and nodes with memory around its size and decode speeds that differ a lot."""
    model = draw(model_shapes())
    whole = memory_model(model).need(model.num_layers, first=True, last=True)
    count = draw(st.integers(1, max_nodes))
    nodes = []
    for i in draw(st.permutations(range(count))):
        memory = whole * draw(st.integers(10, 130)) // 100
        speed = draw(st.sampled_from([0.5, 1.0, 2.0, 3.5, 6.0, 10.0, 40.0]))
        nodes.append(fast_node(i, memory, speed))
    return model, nodes


FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(case=speed_cases(), strategy=st.sampled_from(["auto", "pipeline"]))
def test_speed_plans_place_every_layer_once_within_memory(
        case: tuple[ModelShape, list[NodeProfile]], strategy: str) -> None:
    model, nodes = case
    try:
        placement = place(model, nodes, strategy=strategy)
    except PlacementError as exc:
        assert str(exc)
        return
    check_invariants(model, nodes, placement)
    assert set(placement.left_out).isdisjoint(placement.nodes())
    # Identical inputs, in any order, give the identical plan.
    assert place(model, list(reversed(nodes)), strategy=strategy) == placement


@FAST
@given(case=speed_cases(), which=st.integers(0, 10), factor=st.sampled_from([1.5, 3.0, 10.0]))
def test_more_speed_never_gets_fewer_layers(case: tuple[ModelShape, list[NodeProfile]],
                                            which: int, factor: float) -> None:
    model, nodes = case
    try:
        before = place(model, nodes, strategy="pipeline")
    except PlacementError:
        return
    target = nodes[which % len(nodes)]
    faster = [n.model_copy(update={"decode_gflops": n.decode_gflops * factor})
              if n is target else n for n in nodes]
    after = place(model, faster, strategy="pipeline")
    check_invariants(model, faster, after)
    if target.node_id not in before.nodes():
        return
    assert target.node_id in after.nodes()  # a faster node is never newly left out
    same_ends = [after.nodes()[0], after.nodes()[-1]] == [before.nodes()[0], before.nodes()[-1]]
    if set(after.nodes()) == set(before.nodes()) and same_ends:
        assert shares(after)[target.node_id] >= shares(before)[target.node_id]
    # Else, faster, it now leads the ring or left another node behind (now slow beside it):
    # at an end of the ring the embedding or the head takes some of its memory (see notes).


def test_layers_follow_decode_speed_within_memory() -> None:
    nodes = [fast_node(0, 8 * GiB, 30.0), fast_node(1, 8 * GiB, 20.0)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    assert shares(placement) == {"n0": 18, "n1": 12}  # equal stage times: 18/30 = 12/20
    assert "decode speed" in placement.reason and not placement.left_out
    # The fast node's memory holds 10 layers (with the embedding): the rest go to the slow one.
    room = memory_model(SMOLLM2).need(10, first=True, last=False)
    tight = [fast_node(0, room, 30.0), fast_node(1, 8 * GiB, 20.0)]
    placement = place(SMOLLM2, tight, strategy="pipeline")
    check_invariants(SMOLLM2, tight, placement)
    assert shares(placement)["n0"] <= 10


def test_alike_nodes_keep_the_memory_split_and_nobody_is_left_out() -> None:
    by_memory = place(SMOLLM2, [fast_node(i, 8 * GiB, 0.0) for i in range(3)],
                      strategy="pipeline")
    noisy = [fast_node(0, 8 * GiB, 10.0), fast_node(1, 8 * GiB, 9.0), fast_node(2, 8 * GiB, 11.0)]
    placement = place(SMOLLM2, noisy, strategy="pipeline")
    assert placement.nodes() == by_memory.nodes() and not placement.left_out
    assert all(abs(a - b) <= 1 for a, b in zip(layer_counts(placement),
                                               layer_counts(by_memory), strict=True))


def test_a_slow_node_is_left_out_with_the_reason_when_the_others_hold_the_model() -> None:
    nodes = [fast_node(0, 8 * GiB, 10.0), fast_node(1, 8 * GiB, 3.5)]  # 35% of a core
    by_memory = place(SMOLLM2, nodes, strategy="pipeline", weigh_by_compute=False)
    assert shares(by_memory) == {"n0": 15, "n1": 15}
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    assert placement.nodes() == ["n0"]
    reason = placement.left_out["n1"]
    assert "node1" in reason and "3.5 GFLOP/s" in reason and "ms" in reason
    report = status_report(node_id="n0", cluster="c", leader="n0",
                           assignment=Assignment(placements=[placement]), local_spec=None,
                           spec_errors=[], nodes={n.node_id: n for n in nodes}, views=[],
                           incompatible=[], runners=[])
    assert report["placements"][0]["left_out"] == {"n1": reason}
    assert {n["node_id"]: n["decode_gflops"] for n in report["nodes"]} == {"n0": 10.0,
                                                                          "n1": 3.5}


def test_a_slow_node_whose_memory_is_needed_gets_fewer_layers() -> None:
    half = memory_model(SMOLLM2).need(20, first=True, last=True)
    nodes = [fast_node(0, half, 10.0), fast_node(1, half, 3.5)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    check_invariants(SMOLLM2, nodes, placement)
    assert not placement.left_out and set(placement.nodes()) == {"n0", "n1"}
    assert shares(placement)["n1"] < shares(placement)["n0"]
    assert shares(placement)["n1"] < 15


def test_auto_puts_a_model_that_fits_on_a_much_faster_node() -> None:
    nodes = [fast_node(0, 16 * GiB, 2.0), fast_node(1, 2 * GiB, 10.0)]
    assert place(SMOLLM2, nodes).nodes() == ["n1"]
    alike = [fast_node(0, 16 * GiB, 10.0), fast_node(1, 2 * GiB, 11.0)]
    assert place(SMOLLM2, alike).nodes() == ["n0"]  # noise never moves it off the largest


def test_ring_order_avoids_the_slowest_links() -> None:
    slow, quick = Link(rtt_ms=40.0, mbps=100.0), Link(rtt_ms=0.2, mbps=10_000.0)

    def links(i: int) -> dict[str, Link]:
        # n0-n1 and n2-n3 are slow; every other pair is quick.
        bad = {0: 1, 1: 0, 2: 3, 3: 2}[i]
        return {f"n{j}": slow if j == bad else quick for j in range(4) if j != i}

    nodes = [fast_node(i, 8 * GiB, 10.0, links=links(i)) for i in range(4)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    order = placement.nodes()
    assert len(order) == 4
    ring = list(zip(order, order[1:] + order[:1], strict=True))
    assert all({a, b} not in ({"n0", "n1"}, {"n2", "n3"}) for a, b in ring)
    hop = hop_seconds(SMOLLM2, nodes[0], nodes[2])
    assert hop == pytest.approx(0.1e-3 + 576 * 4 * 8 / 10e9)


def test_speed_plans_stay_valid_and_pinned_nodes_split_by_speed() -> None:
    nodes = [fast_node(0, 8 * GiB, 30.0), fast_node(1, 8 * GiB, 10.0)]
    pinned = place(SMOLLM2, nodes, strategy="pipeline", pinned_nodes=["node1", "node0"])
    assert pinned.nodes() == ["n1", "n0"] and shares(pinned) == {"n1": 8, "n0": 22}
    assert still_valid(pinned, SMOLLM2, nodes, strategy="pipeline",
                       pinned_nodes=["node1", "node0"])


# --- the probe ----------------------------------------------------------------------------------


def _probe_key_in(prefix: list[str]) -> str:
    code = ("from agent.cluster.compute_probe import probe_conditions, probe_key;"
            "print(probe_key(probe_conditions('b')))")
    out = subprocess.run([*prefix, sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to one")
def test_probe_key_changes_with_cpu_affinity() -> None:
    assert _probe_key_in([]) != _probe_key_in(["taskset", "-c", "0"])
    assert _probe_key_in(["taskset", "-c", "0"]) == _probe_key_in(["taskset", "-c", "0"])


def test_probe_measures_both_shapes_and_caches_them(tmp_path: Path) -> None:
    settings_ = NodeSettings(state_dir=tmp_path, blas_threads=1)
    first = asyncio.run(measure_speed(settings_))
    assert first.matmul_gflops > 0 and first.matvec_gflops > 0 and first.blas
    # Prefill-shaped work runs far faster per flop than decode-shaped (memory-bound) work.
    assert first.matmul_gflops > first.matvec_gflops
    cached = json.loads((tmp_path / CACHE_FILE).read_text())
    assert first.key in cached and cached[first.key]["conditions"]["affinity"]
    assert asyncio.run(measure_speed(settings_)) == first  # same conditions: from the cache


def test_links_are_rounded_and_bandwidth_discounts_one_round_trip() -> None:
    assert rounded(0.1234) == 0.12 and rounded(1411.7) == 1400.0 and rounded(0.0) == 0.0
    links = links_from({"b": 0.2345, "a": 12.6}, {"a": 987.6})
    assert links == {"a": Link(rtt_ms=13.0, mbps=990.0), "b": Link(rtt_ms=0.23, mbps=0.0)}
    assert list(links) == ["a", "b"]
    # 1 MB in 11 ms over a 1 ms round trip: 8 Mbit in 10 ms.
    assert transfer_mbps(1_000_000, 0.011, 0.001) == pytest.approx(800.0)


def test_a_profile_with_speeds_and_links_survives_beacons_and_status() -> None:
    from agent.cluster.membership import detail_digest, lenient_profile

    plain = fast_node(0, GiB, 5.0)
    linked = fast_node(0, GiB, 5.0, links={"n1": Link(rtt_ms=0.3, mbps=900.0)})
    assert detail_digest(linked) != detail_digest(plain)  # links travel with the detail
    assert lenient_profile(linked.model_dump(mode="json")) == linked


def test_the_fastest_node_leads_the_ring_when_links_tie() -> None:
    # The head also projects every token to logits: the faster node takes that work.
    nodes = [fast_node(0, 8 * GiB, 6.0), fast_node(1, 8 * GiB, 10.0)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    assert placement.nodes() == ["n1", "n0"] and shares(placement) == {"n1": 19, "n0": 11}
