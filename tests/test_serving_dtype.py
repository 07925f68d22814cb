"""dtype end to end: what runners load is decided once by the leader and reaches every rank.

cluster.toml's `[[models]] dtype`, else the node's `dtype` setting, else "auto"; the leader
resolves "auto", sizes the placement at the chosen format, and the placement carries it into
every rank's RunnerConfig (as kv_bits travels).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.cluster.catalogue import ModelCatalogue
from agent.cluster.placement import place
from agent.cluster.shape import model_bytes, model_shape, serving_dtype, shape_for_dtype
from agent.cluster.state import NodeProfile
from agent.cluster.wiring import runner_configs
from agent.models.store import ModelStore

GiB = 1 << 30


def node(i: int, memory: int, backend: str = "cpu") -> NodeProfile:
    return NodeProfile(node_id=f"n{i}", name=f"node{i}", version="0.1.0",
                       addresses=[f"10.0.0.{i}"], api_port=52415, memory_total_bytes=memory,
                       memory_available_bytes=memory, data_port=52500,
                       backend=backend)  # type: ignore[arg-type]


def test_an_explicit_dtype_stands_and_auto_follows_the_backend_and_memory() -> None:
    big, small = [node(0, 64 * GiB)], [node(0, 2 * GiB)]
    assert serving_dtype("keep", float32_bytes=10 * GiB, nodes=big) == "keep"
    assert serving_dtype("bfloat16", float32_bytes=10 * GiB, nodes=small) == "bfloat16"
    # CPU: float32 (MLX's fast CPU format) when it fits the largest node, else as stored.
    assert serving_dtype("auto", float32_bytes=10 * GiB, nodes=big) == "float32"
    assert serving_dtype("auto", float32_bytes=10 * GiB, nodes=small) == "keep"
    # Metal or CUDA anywhere in the cluster: the checkpoint as stored.
    assert serving_dtype("auto", float32_bytes=1, nodes=[node(0, 64 * GiB, "metal")]) == "keep"


def test_kept_4bit_shape_counts_the_stored_bytes(smollm2_4bit_dir: Path) -> None:
    f32 = model_shape(smollm2_4bit_dir, "s4", dtype="float32")
    kept = model_shape(smollm2_4bit_dir, "s4", dtype="keep")
    assert (f32.dtype, kept.dtype) == ("float32", "keep")
    assert model_bytes(kept) < 0.3 * model_bytes(f32)
    nodes = [node(0, 64 * GiB)]
    assert shape_for_dtype(smollm2_4bit_dir, "s4", "auto", nodes).dtype == "float32"
    tight = [node(0, model_bytes(kept) + (1 << 27))]
    assert shape_for_dtype(smollm2_4bit_dir, "s4", "auto", tight).dtype == "keep"


def store_holding(root: Path, name: str, model_dir: Path) -> ModelStore:
    """A model store at `root` holding a copy of `model_dir` as `name`."""
    store = ModelStore(root)
    store.add(name, lambda d: shutil.copytree(model_dir, d, dirs_exist_ok=True), source="test")
    return store


def test_spec_dtype_reaches_the_placement_and_every_ranks_runner_config(
    tmp_path: Path, smollm2_4bit_dir: Path,
) -> None:
    from agent.cluster.controller import ClusterController
    from agent.serving.pool import RunnerPool
    from agent.serving.router import Router
    from agent.settings import NodeSettings

    store = store_holding(tmp_path / "models", "smollm2-4bit", smollm2_4bit_dir)
    settings = NodeSettings(state_dir=tmp_path / "state", models_dir=tmp_path / "models",
                            discovery_enabled=False, dtype="float16")
    pool = RunnerPool(settings)
    controller = ClusterController(settings, store=store, pool=pool,
                                   router=Router(pool, wait_s=1.0))
    assert controller.propose_spec(
        '[[models]]\nmodel = "smollm2-4bit"\nstrategy = "pipeline"\ndtype = "keep"\n\n'
        '[[models]]\nmodel = "other"\n') == []
    assert controller.requested_dtype("smollm2-4bit") == "keep"
    assert controller.requested_dtype("other") == "float16"  # the node's setting
    nodes = [node(i, 64 * GiB) for i in range(3)]
    catalogue = ModelCatalogue(store, controller.client)
    shape = catalogue.shape("smollm2-4bit", "keep", nodes)
    assert shape is not None and shape.dtype == "keep"
    placement = place(shape, nodes, strategy="pipeline")
    assert placement.dtype == "keep" and len(placement.stages) == 3
    configs = runner_configs(placement, 0, {n.node_id: n for n in nodes},
                             controller.base_config("smollm2-4bit"))
    assert len(configs) == 3 and {c.dtype for c in configs.values()} == {"keep"}
    # Another format is another placement: the kept one is not "still valid" at float32.
    f32 = catalogue.shape("smollm2-4bit", "float32", nodes)
    assert f32 is not None and f32.layer_bytes > 3 * shape.layer_bytes
    again = place(f32, nodes, strategy="pipeline", previous=placement)
    assert again.dtype == "float32"


@pytest.mark.parametrize("dtype", ["keep", "float32"])
def test_holders_send_every_formats_shape_to_peers(smollm2_4bit_dir: Path, dtype: str) -> None:
    shapes = ModelCatalogue.shapes_of(smollm2_4bit_dir, "s4")
    assert set(shapes) == {"keep", "float32", "float16", "bfloat16"}
    assert shapes[dtype].dtype == dtype


def test_the_catalogue_resolves_auto_per_call_and_reads_each_format_once(
    tmp_path: Path, smollm2_4bit_dir: Path,
) -> None:
    from agent.cluster.peers import PeerClient

    store = store_holding(tmp_path / "models", "s4", smollm2_4bit_dir)
    catalogue = ModelCatalogue(store, PeerClient(node_id="n0", secret=None, timeout_s=1.0))
    f32 = model_shape(smollm2_4bit_dir, "s4", dtype="float32")
    kept = model_shape(smollm2_4bit_dir, "s4", dtype="keep")
    roomy = [node(0, 64 * GiB)]
    tight = [node(0, model_bytes(kept) + (1 << 27))]
    assert catalogue.shape("s4", "auto", roomy) == f32
    assert catalogue.shape("s4", "auto", tight) == kept
    # Free memory moves all the time; the shapes come from what was read once: with the
    # weights' headers unreadable now, every node size still gets its answer, the right one.
    for path in store.resolve("s4").glob("*.safetensors"):
        path.write_bytes(b"\xff" * 16)
    for memory in (64 * GiB, 63 * GiB, 1 * GiB + 7):
        expected = f32 if model_bytes(f32) <= node(0, memory).usable_memory_bytes else kept
        assert catalogue.shape("s4", "auto", [node(0, memory)]) == expected
