"""Placement (pure): memory-aware pipeline, tensor, hybrid and auto splits; model shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cluster.placement import (
    RUNTIME_OVERHEAD_BYTES,
    PlacementError,
    choose_auto,
    memory_model,
    memory_needed,
    place,
    still_valid,
    tensor_sizes,
)
from agent.cluster.shape import model_shape
from agent.cluster.state import ModelShape, NodeProfile, Placement

MiB = 1 << 20
GiB = 1 << 30

# SmolLM2-135M at float32: 30 layers, hidden 576, 9 heads, 3 KV heads, intermediate 1536.
SMOLLM2 = ModelShape(
    name="smollm2-135m", num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576,
    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
    layer_bytes=14_160_384, embedding_bytes=113_246_208, kv_bytes_per_token_per_layer=1536,
    context_length=8192, architecture="llama",
)
SMOLLM2_CONFIG = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def node(i: int, memory: int, *, cap: int | None = None, gflops: float = 0.0,
         version: str = "0.1.0", labels: dict[str, str] | None = None) -> NodeProfile:
    return NodeProfile(
        node_id=f"n{i}", name=f"node{i}", version=version, addresses=["127.0.0.1"],
        api_port=52000 + i, memory_total_bytes=memory, memory_available_bytes=memory,
        memory_cap_bytes=cap, compute_gflops=gflops, labels=labels or {},
    )


def layer_counts(placement: Placement) -> list[int]:
    return [s.layer_stop - s.layer_start for s in placement.stages]


def check_invariants(model: ModelShape, nodes: list[NodeProfile], placement: Placement,
                     kv_tokens: int = 4096) -> None:
    """Every layer exactly once, contiguous; no node twice or over its memory; groups divide."""
    assert placement.stages[0].layer_start == 0
    assert placement.stages[-1].layer_stop == model.num_layers
    for a, b in zip(placement.stages, placement.stages[1:], strict=False):
        assert a.layer_stop == b.layer_start
    assert all(n >= 1 for n in layer_counts(placement))
    ids = placement.nodes()
    assert len(ids) == len(set(ids))
    usable = {n.node_id: n.usable_memory_bytes for n in nodes}
    for node_id, need in memory_needed(model, placement, kv_headroom_tokens=kv_tokens).items():
        assert need <= usable[node_id], (node_id, need, usable[node_id])
    for stage in placement.stages:
        size = len(stage.nodes)
        assert model.num_heads % size == 0 and model.num_kv_heads % size == 0
        assert model.intermediate_size % size == 0


# --- examples ---------------------------------------------------------------------------------


def test_three_equal_nodes_split_smollm2_ten_ten_ten() -> None:
    nodes = [node(i, 8 * GiB) for i in range(3)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    assert placement.strategy == "pipeline"
    assert layer_counts(placement) == [10, 10, 10]
    assert placement.nodes() == ["n0", "n1", "n2"]
    check_invariants(SMOLLM2, nodes, placement)


def test_pipeline_split_follows_memory() -> None:
    nodes = [node(0, 500 * MiB), node(1, 300 * MiB), node(2, 450 * MiB)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    check_invariants(SMOLLM2, nodes, placement)
    share = dict(zip(placement.nodes(), layer_counts(placement), strict=True))
    # The middle node holds no embedding, so 300 MiB there holds about as much as 450 at an end.
    assert share["n0"] > share["n2"]
    assert sum(share.values()) == 30
    # Proportional to capacity: each node's share within one layer of its exact quota.
    costs = memory_model(SMOLLM2)
    caps = {
        "n0": costs.capacity(500 * MiB, first=True, last=False),
        "n1": costs.capacity(300 * MiB, first=False, last=False),
        "n2": costs.capacity(450 * MiB, first=False, last=True),
    }
    for node_id, cap in caps.items():
        assert abs(share[node_id] - 30 * cap / sum(caps.values())) <= 1.5


def test_impossible_placement_names_needed_and_available_per_node() -> None:
    nodes = [node(0, 300 * MiB), node(1, 200 * MiB)]
    with pytest.raises(PlacementError) as caught:
        place(SMOLLM2, nodes, strategy="pipeline")
    message = str(caught.value)
    assert "node0 needs" in message and "has 300.0 MiB" in message
    assert "node1 needs" in message and "has 200.0 MiB" in message
    assert set(caught.value.per_node) == {"n0", "n1"}
    for needed, available in caught.value.per_node.values():
        assert needed > available


def test_nodes_that_hold_nothing_are_left_out() -> None:
    nodes = [node(0, 600 * MiB), node(1, 50 * MiB), node(2, 600 * MiB)]
    placement = place(SMOLLM2, nodes, strategy="pipeline")
    assert "n1" not in placement.nodes()
    check_invariants(SMOLLM2, nodes, placement)


def test_compute_weighting_gives_faster_nodes_more_layers_within_memory() -> None:
    nodes = [node(0, 8 * GiB, gflops=300), node(1, 8 * GiB, gflops=100)]
    placement = place(SMOLLM2, nodes, strategy="pipeline", weigh_by_compute=True)
    assert dict(zip(placement.nodes(), layer_counts(placement), strict=True)) == {"n0": 22,
                                                                                   "n1": 8}
    tight = [node(0, 400 * MiB, gflops=1000), node(1, 8 * GiB, gflops=1)]
    placement = place(SMOLLM2, tight, strategy="pipeline", weigh_by_compute=True)
    check_invariants(SMOLLM2, tight, placement)


def test_tensor_group_must_divide_heads_kv_heads_and_mlp() -> None:
    assert tensor_sizes(SMOLLM2, 9) == [1, 3]
    three = [node(i, 2 * GiB) for i in range(3)]
    placement = place(SMOLLM2, three, strategy="tensor")
    assert placement.strategy == "tensor"
    assert placement.stages[0].nodes == ["n0", "n1", "n2"]
    check_invariants(SMOLLM2, three, placement)
    with pytest.raises(PlacementError, match=r"valid group sizes: 1, 3$"):
        place(SMOLLM2, three[:2], strategy="tensor")
    # Four nodes: the largest valid group (3) is used.
    four = [*three, node(3, 2 * GiB)]
    assert len(place(SMOLLM2, four, strategy="tensor").nodes()) == 3


def test_tensor_node_holds_a_third_of_each_layer_plus_embedding() -> None:
    three = [node(i, 2 * GiB) for i in range(3)]
    needs = memory_needed(SMOLLM2, place(SMOLLM2, three, strategy="tensor"))
    costs = memory_model(SMOLLM2)
    expected = RUNTIME_OVERHEAD_BYTES + SMOLLM2.embedding_bytes + -(-30 * costs.layer_bytes // 3)
    assert needs == {"n0": expected, "n1": expected, "n2": expected}


def test_hybrid_six_nodes_is_two_stages_of_three_way_groups() -> None:
    nodes = [node(i, 1 * GiB) for i in range(6)]
    placement = place(SMOLLM2, nodes, strategy="hybrid")
    assert [len(s.nodes) for s in placement.stages] == [3, 3]
    assert layer_counts(placement) == [15, 15]
    check_invariants(SMOLLM2, nodes, placement)


def test_hybrid_four_nodes_is_a_three_way_stage_and_one_node_when_memory_works() -> None:
    nodes = [node(i, 1 * GiB) for i in range(4)]
    placement = place(SMOLLM2, nodes, strategy="hybrid")
    assert placement.strategy == "hybrid"
    assert [len(s.nodes) for s in placement.stages] == [3, 1]
    # The three-way group does a layer three times faster, so it gets three quarters of them.
    assert layer_counts(placement) == [22, 8]
    check_invariants(SMOLLM2, nodes, placement)
    # When the fourth node cannot hold a stage, it is left out: one 3-way group remains.
    starved = [node(i, 1 * GiB) for i in range(3)] + [node(3, 150 * MiB)]
    placement = place(SMOLLM2, starved, strategy="hybrid")
    assert placement.strategy == "tensor" and "n3" not in placement.nodes()
    with pytest.raises(PlacementError):
        place(SMOLLM2, starved, strategy="hybrid", pinned_nodes=["n0", "n1", "n2", "n3"])


def test_auto_uses_one_node_when_the_model_fits() -> None:
    nodes = [node(0, 2 * GiB), node(1, 4 * GiB)]
    placement, reason = choose_auto(SMOLLM2, nodes)
    assert placement.strategy == "single" and placement.nodes() == ["n1"]
    assert reason.startswith("auto: fits one node")


def test_auto_pipelines_over_the_fewest_largest_nodes() -> None:
    nodes = [node(0, 300 * MiB), node(1, 600 * MiB), node(2, 500 * MiB), node(3, 200 * MiB)]
    placement, reason = choose_auto(SMOLLM2, nodes)
    assert placement.strategy == "pipeline"
    assert sorted(placement.nodes()) == ["n1", "n2"]
    assert "more than the largest node holds" in reason
    check_invariants(SMOLLM2, nodes, placement)


def test_auto_never_chooses_tensor_parallel() -> None:
    nodes = [node(i, 450 * MiB) for i in range(3)]
    assert place(SMOLLM2, nodes).strategy == "pipeline"


def test_pinned_nodes_keep_their_order_and_layer_counts() -> None:
    nodes = [node(i, 2 * GiB) for i in range(3)]
    placement = place(SMOLLM2, nodes, strategy="pipeline", pinned_nodes=["node2", "n0"],
                      layer_counts=[18, 12])
    assert placement.nodes() == ["n2", "n0"]
    assert layer_counts(placement) == [18, 12]
    with pytest.raises(PlacementError, match="sum to 30"):
        place(SMOLLM2, nodes, strategy="pipeline", pinned_nodes=["n0", "n1"],
              layer_counts=[10, 10])
    with pytest.raises(PlacementError, match="'ghost' is not available"):
        place(SMOLLM2, nodes, strategy="pipeline", pinned_nodes=["ghost"])


def test_layer_counts_beyond_a_nodes_memory_are_refused_with_figures() -> None:
    nodes = [node(0, 2 * GiB), node(1, 300 * MiB)]
    with pytest.raises(PlacementError) as caught:
        place(SMOLLM2, nodes, strategy="pipeline", pinned_nodes=["n0", "n1"],
              layer_counts=[5, 25])
    assert "node1: needs" in str(caught.value)
    assert caught.value.per_node["n1"][1] == 300 * MiB


def test_memory_cap_limits_what_a_node_is_given() -> None:
    nodes = [node(0, 64 * GiB, cap=550 * MiB), node(1, 64 * GiB, cap=550 * MiB)]
    placement = place(SMOLLM2, nodes)
    assert placement.strategy == "pipeline"
    check_invariants(SMOLLM2, nodes, placement)


def test_untied_models_hold_the_embedding_first_and_the_head_last() -> None:
    untied = SMOLLM2.model_copy(update={"tie_word_embeddings": False,
                                        "embedding_bytes": 2 * SMOLLM2.embedding_bytes})
    costs = memory_model(untied)
    assert costs.first_end_bytes == costs.last_end_bytes == SMOLLM2.embedding_bytes
    assert costs.whole_end_bytes == 2 * SMOLLM2.embedding_bytes


def test_kv_bits_and_context_shrink_the_reserved_headroom() -> None:
    full = memory_model(SMOLLM2).layer_bytes
    eight = memory_model(SMOLLM2, kv_bits=8).layer_bytes
    short = memory_model(SMOLLM2, kv_headroom_tokens=512).layer_bytes
    assert short < eight < full
    assert full - SMOLLM2.layer_bytes == 4096 * 1536


def test_a_stable_placement_survives_an_unrelated_node_joining() -> None:
    nodes = [node(0, 600 * MiB), node(1, 600 * MiB)]
    before = place(SMOLLM2, nodes)
    after = place(SMOLLM2, [*nodes, node(2, 64 * GiB)], previous=before)
    assert after == before
    # The same request without history would move to the big node.
    assert place(SMOLLM2, [*nodes, node(2, 64 * GiB)]).nodes() == ["n2"]


def test_a_placement_whose_node_left_or_shrank_is_replaced() -> None:
    nodes = [node(0, 600 * MiB), node(1, 600 * MiB), node(2, 600 * MiB)]
    before = place(SMOLLM2, nodes, strategy="pipeline")
    survivors = [nodes[0], nodes[2]]
    assert not still_valid(before, SMOLLM2, survivors, strategy="pipeline")
    after = place(SMOLLM2, survivors, strategy="pipeline", previous=before)
    assert after != before and "n1" not in after.nodes()
    capped = [nodes[0], node(1, 600 * MiB, cap=150 * MiB), nodes[2]]
    assert not still_valid(before, SMOLLM2, capped, strategy="pipeline")
    # A changed strategy is a new request, not a reason to keep the old shape.
    assert not still_valid(before, SMOLLM2, nodes, strategy="tensor")


# --- properties -------------------------------------------------------------------------------


@st.composite
def model_shapes(draw: st.DrawFn) -> ModelShape:
    kv_heads = draw(st.sampled_from([1, 2, 3, 4, 8]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3, 4]))
    tied = draw(st.booleans())
    embed = draw(st.integers(1, 300)) * MiB
    return ModelShape(
        name="m", num_layers=draw(st.integers(1, 48)), num_heads=heads, num_kv_heads=kv_heads,
        hidden_size=heads * 64, intermediate_size=draw(st.sampled_from([1536, 2048, 2816, 11008])),
        vocab_size=32000, tie_word_embeddings=tied, layer_bytes=draw(st.integers(1, 200)) * MiB,
        embedding_bytes=embed if tied else 2 * embed,
        kv_bytes_per_token_per_layer=draw(st.sampled_from([256, 1536, 4096])),
        context_length=draw(st.sampled_from([2048, 8192])),
    )


@st.composite
def node_sets(draw: st.DrawFn, max_nodes: int = 7, scale: int = 4 * GiB) -> list[NodeProfile]:
    """Nodes with memory from nothing to a bit over `scale` (the model's size, in the cases)."""
    count = draw(st.integers(1, max_nodes))
    percent = st.integers(0, 130)
    nodes = []
    for i in draw(st.permutations(range(count))):
        memory = scale * draw(percent) // 100
        cap = draw(st.none() | percent.map(lambda p: scale * p // 100))
        nodes.append(node(i, memory, cap=cap, gflops=draw(st.sampled_from([0.0, 50.0, 400.0]))))
    return nodes


@st.composite
def cases(draw: st.DrawFn, max_nodes: int = 7) -> tuple[ModelShape, list[NodeProfile]]:
    """A model and nodes sized around it, so that splits of every kind both fit and fail."""
    model = draw(model_shapes())
    whole = memory_model(model).need(model.num_layers, first=True, last=True)
    return model, draw(node_sets(max_nodes=max_nodes, scale=whole))


STRATEGIES = st.sampled_from(["auto", "pipeline", "tensor", "hybrid"])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(case=cases(), strategy=STRATEGIES, by_compute=st.booleans())
def test_every_placement_places_each_layer_once_within_memory(
    case: tuple[ModelShape, list[NodeProfile]], strategy: str, by_compute: bool
) -> None:
    model, nodes = case
    try:
        placement = place(model, nodes, strategy=strategy, weigh_by_compute=by_compute)
    except PlacementError as exc:
        assert str(exc)
        return
    check_invariants(model, nodes, placement)
    if strategy in ("auto", "pipeline"):
        assert all(len(s.nodes) == 1 for s in placement.stages)


@FAST
@given(case=cases())
def test_auto_succeeds_whenever_the_largest_node_holds_the_model(
    case: tuple[ModelShape, list[NodeProfile]],
) -> None:
    model, nodes = case
    largest = max(n.usable_memory_bytes for n in nodes)
    if memory_model(model).need(model.num_layers, first=True, last=True) <= largest:
        assert place(model, nodes).strategy == "single"


@FAST
@given(case=cases(), strategy=STRATEGIES, data=st.data())
def test_placement_is_deterministic_and_ignores_input_order(
    case: tuple[ModelShape, list[NodeProfile]], strategy: str, data: st.DataObject
) -> None:
    model, nodes = case
    shuffled = data.draw(st.permutations(nodes))
    try:
        first = place(model, nodes, strategy=strategy)
    except PlacementError as exc:
        with pytest.raises(PlacementError) as again:
            place(model, shuffled, strategy=strategy)
        assert str(again.value) == str(exc)
        return
    assert place(model, nodes, strategy=strategy) == first
    assert place(model, shuffled, strategy=strategy) == first


@FAST
@given(case=cases(max_nodes=5), strategy=STRATEGIES, newcomer_percent=st.integers(0, 400))
def test_placement_is_stable_when_an_unrelated_node_joins(
    case: tuple[ModelShape, list[NodeProfile]], strategy: str, newcomer_percent: int
) -> None:
    model, nodes = case
    try:
        before = place(model, nodes, strategy=strategy)
    except PlacementError:
        return
    whole = memory_model(model).need(model.num_layers, first=True, last=True)
    joined = [*nodes, node(99, whole * newcomer_percent // 100)]
    assert place(model, joined, strategy=strategy, previous=before) == before


# --- model shapes -----------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors header (model_shape reads nothing else, so no tensor data is written)."""
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    for name, (dtype, shape) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)


def _llama_tensors(config: dict[str, int], *, bits: int = 0) -> dict[str, tuple[str, list[int]]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def linear(out: int, inp: int) -> dict[str, tuple[str, list[int]]]:
        if not bits:
            return {"weight": ("F32", [out, inp])}
        return {"weight": ("U32", [out, inp * bits // 32]), "scales": ("F16", [out, inp // 64]),
                "biases": ("F16", [out, inp // 64])}

    tensors: dict[str, tuple[str, list[int]]] = {
        "model.embed_tokens.weight": ("F32", [config["vocab_size"], hidden]),
        "model.norm.weight": ("F32", [hidden]),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        parts = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                 "mlp.down_proj": (hidden, inter)}
        for name, (out, inp) in parts.items():
            for suffix, value in linear(out, inp).items():
                tensors[f"{p}{name}.{suffix}"] = value
        tensors[p + "input_layernorm.weight"] = ("F32", [hidden])
        tensors[p + "post_attention_layernorm.weight"] = ("F32", [hidden])
    return tensors


def test_model_shape_of_smollm2_from_config_and_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    _write_safetensors(tmp_path / "model.safetensors", _llama_tensors(SMOLLM2_CONFIG))
    assert model_shape(tmp_path, "smollm2-135m") == SMOLLM2


def test_model_shape_counts_quantized_weights_at_the_serving_dtype(tmp_path: Path) -> None:
    config = {**SMOLLM2_CONFIG, "quantization": {"group_size": 64, "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _write_safetensors(tmp_path / "model.safetensors", _llama_tensors(config, bits=4))
    shape = model_shape(tmp_path, "smollm2-135m", dtype_bytes=2)
    assert shape.layer_bytes == SMOLLM2.layer_bytes // 2
    assert shape.embedding_bytes == SMOLLM2.embedding_bytes // 2
    assert shape.kv_bytes_per_token_per_layer == 768 and shape.dtype_bytes == 2


def test_model_shape_without_weights_uses_config_dimensions(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    assert model_shape(tmp_path, "smollm2-135m") == SMOLLM2
    untied = {**SMOLLM2_CONFIG, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(untied))
    shape = model_shape(tmp_path, "x")
    assert shape.embedding_bytes == 2 * SMOLLM2.embedding_bytes and not shape.tie_word_embeddings


def test_a_split_the_models_engine_cannot_run_is_refused_by_name() -> None:
    # An mlx-lm-engine model without pipeline stages: one node that holds it, or nothing.
    whole_only = SMOLLM2.model_copy(update={"strategies": ("single",),
                                            "architecture": "gemma3_text"})
    small = [node(i, 600 * MiB) for i in range(3)]
    with pytest.raises(PlacementError, match=r"'gemma3_text'.*pipeline parallel.*single"):
        place(whole_only, small)
    roomy = [node(0, 4000 * MiB), *small]
    assert place(whole_only, roomy).strategy == "single"
    with pytest.raises(PlacementError, match="tensor parallel"):
        place(whole_only, small, strategy="tensor")
