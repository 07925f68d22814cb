"""A mixed pipeline: each stage at its own dtype (float32 beside bfloat16, float32 beside kept
4-bit), activations cast where a stage receives them. Greedy ids equal one process running the
same per-layer dtypes; placement counts each node's bytes at its own dtype; wiring hands each
stage its dtype."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlx.core as mx
import msgspec
import pytest

from agent.cluster.memory_model import memory_model, memory_needed
from agent.cluster.placement import place
from agent.cluster.shape import model_shape
from agent.cluster.wiring import runner_configs
from agent.generation import Finished
from agent.runtime.journal import Resize
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import FLOAT_DTYPES, LayerRange, load_decoder
from agent.runtime.protocol import RunnerConfig
from agent.runtime.step import make_project_fn
from tests.quant_models import convert_quantized
from tests.test_pipeline import pipeline_configs, prompt_request, start_all, tokens
from tests.test_speed_placement import fast_node
from tests.tiny_models import make_tiny_model

LAYERS = 6
SPLIT = 3
PROMPT = [5, 6, 7, 8, 9, 40, 41]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", layers=LAYERS)


@pytest.fixture(scope="module")
def tiny_4bit_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_quantized(tiny_dir, tmp_path_factory.mktemp("tiny4") / "m")


def _dtype(name: str) -> mx.Dtype | None:
    return None if name == "keep" else FLOAT_DTYPES[name]


def one_process_greedy(model_dir: Path, dtypes: tuple[str, str], prompt: list[int],
                       n: int) -> list[int]:
    """Greedy ids of one process holding both stages, each at its dtype, with the same cast at
    the boundary as the pipeline (the followers' step casts what it receives)."""
    from agent.runtime.follower import Follower

    first = load_decoder(model_dir, layers=LayerRange(0, SPLIT), dtype=_dtype(dtypes[0]),
                         embeds=True, projects=True)
    second = load_decoder(model_dir, layers=LayerRange(SPLIT, LAYERS), dtype=_dtype(dtypes[1]),
                          embeds=False, projects=False)
    stages = []
    for decoder, embeds in ((first, True), (second, False)):
        geometry = KvGeometry(len(decoder.layers), decoder.local_kv_heads,
                              decoder.config.head_dim, decoder.dtype)
        stage = Follower(decoder, KvSlots(geometry), compiled=True, embeds=embeds)
        stage.apply([Resize(1, 256)])
        stages.append(stage)
    project = make_project_fn(first, compiled=True)

    def through(op: str, positions: list[int], h: mx.array, start: int = 0) -> mx.array:
        for stage in stages:
            h = stage.step(op, 0, start, positions, h)
        return h.astype(first.dtype) if h.dtype != first.dtype else h

    h = through("prefill", [], mx.array(prompt))
    out = [int(mx.argmax(project(h[0, -1:]), axis=-1).item())]
    while len(out) < n:
        h = through("decode", [len(prompt) + len(out) - 1], mx.array([out[-1]]))
        out.append(int(mx.argmax(project(h[:, 0, :]), axis=-1).item()))
    return out


async def pipeline_greedy(model_dir: Path, dtypes: tuple[str, str], tmp_path: Path
                          ) -> list[int]:
    configs = [msgspec.structs.replace(c, dtype=d) for c, d in zip(
        pipeline_configs(model_dir, [(0, SPLIT), (SPLIT, LAYERS)]), dtypes, strict=True)]
    runners = await start_all(configs, tmp_path)
    try:
        ids, end = await tokens(runners[0], prompt_request("r", PROMPT, NEW_TOKENS))
        assert isinstance(end, Finished), end
        return ids
    finally:
        for r in runners:
            await r.stop()


@pytest.mark.parametrize("dtypes", [("float32", "bfloat16"), ("bfloat16", "float32"),
                                    ("float32", "keep")])
def test_mixed_pipeline_generates_what_one_process_with_those_dtypes_does(
        dtypes: tuple[str, str], tiny_dir: Path, tiny_4bit_dir: Path, tmp_path: Path) -> None:
    model_dir = tiny_4bit_dir if "keep" in dtypes else tiny_dir
    got = asyncio.run(pipeline_greedy(model_dir, dtypes, tmp_path))
    assert len(got) == NEW_TOKENS
    assert got == one_process_greedy(model_dir, dtypes, PROMPT, NEW_TOKENS)


def test_placement_counts_each_node_at_its_dtype_and_wiring_hands_it_on(tiny_dir: Path) -> None:
    f32 = model_shape(tiny_dir, "tiny", dtype="float32")
    bf16 = model_shape(tiny_dir, "tiny", dtype="bfloat16")
    assert bf16.layer_bytes * 2 == f32.layer_bytes
    # n1 holds 4 layers at float32 (with the head) but all 6 at bfloat16.
    room = memory_model(f32).need(4, first=False, last=True)
    nodes = [fast_node(0, 1 << 30, 0.0), fast_node(1, room, 0.0)]
    by_f32 = place(f32, nodes, strategy="pipeline")
    mixed = place(f32, nodes, strategy="pipeline", node_dtypes={"n1": bf16})
    assert [s.dtype for s in mixed.stages] == [None, "bfloat16"]
    assert mixed.stage_dtype(0) == "float32" and mixed.stage_dtype(1) == "bfloat16"
    needed = memory_needed(f32, mixed, shapes={"bfloat16": bf16})
    assert needed["n1"] < memory_needed(f32, mixed)["n1"]
    assert needed["n1"] <= room
    assert by_f32.stages[1].dtype is None
    profiles = {n.node_id: n for n in nodes}
    configs = runner_configs(mixed, 0, profiles, RunnerConfig(model_name="tiny",
                                                              model_dir=str(tiny_dir)))
    assert [configs[(n, r)].dtype for r, n in enumerate(mixed.nodes())] == ["float32",
                                                                            "bfloat16"]
