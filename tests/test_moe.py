"""Mixture-of-experts families on flock's own decoder: logits equal mlx-lm's on the same tiny
random weights (float32, and 4-bit experts kept quantized), either checkpoint layout of the
experts loads, and a runner serves mlx-lm's greedy ids alone, batched, from the prefix cache, as
a 2-stage pipeline and tensor parallel over 2 ranks."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from agent.generation import Finished
from agent.models import arch
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.model import FusedGateUp, Quantized, SparseMoe, load_decoder
from agent.runtime.moe import SORT_AT
from agent.runtime.protocol import RunnerConfig
from agent.runtime.runner import choose_engine
from agent.settings import NodeSettings
from tests.conftest import TEST_CACHE
from tests.quant_models import convert_quantized
from tests.test_decoder import flock_logits, reference_logits
from tests.test_mlxlm_engine import (
    _KEY,
    OTHER_PROMPT,
    arch_dir,
    assert_greedy_and_batched,
    greedy,
    mlxlm_ids,
)
from tests.test_runner_process import collect
from tests.tiny_archs import MOE_BUILDERS, PROMPT

ATOL = 2e-4
FAMILIES = sorted(MOE_BUILDERS)


def test_moe_families_run_on_flocks_decoder_with_every_strategy() -> None:
    for name in FAMILIES:
        assert choose_engine({"model_type": name}) == "flock"
        assert arch.architecture({"model_type": name}).strategies == (
            "single", "pipeline", "tensor")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("fuse", "compiled"), [(True, True), (False, False)])
def test_moe_logits_match_mlx_lm(family: str, fuse: bool, compiled: bool,
                                 smollm2_dir: Path) -> None:
    model_dir, ids = arch_dir(family, smollm2_dir)
    dec = load_decoder(model_dir, fuse=fuse)
    assert all(isinstance(layer.mlp, SparseMoe) for layer in dec.layers)
    assert isinstance(dec.layers[0].mlp.gate_up, FusedGateUp) == fuse
    # The prompt's prefill sorts its (token, expert) pairs, the decode steps do not.
    assert len(PROMPT) * dec.config.experts_per_token >= SORT_AT
    expected = reference_logits(model_dir, PROMPT, ids[:12])
    got = flock_logits(model_dir, PROMPT, ids[:12], fuse=fuse, compiled=compiled)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()
    # Greedy from these logits is mlx-lm's greedy.
    assert [int(mx.argmax(x)) for x in got[:12]] == ids[:12]


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_experts_stay_quantized_and_match_mlx_lm(family: str, smollm2_dir: Path) -> None:
    source, _ = arch_dir(family, smollm2_dir)
    model_dir = convert_quantized(source, TEST_CACHE / "models" / f"tiny-{family}-4bit-{_KEY}")
    dec = load_decoder(model_dir, dtype=None)
    moe = dec.layers[0].mlp
    assert isinstance(moe, SparseMoe) and isinstance(moe.gate_up, FusedGateUp)
    experts = moe.gate_up.gate_up
    assert isinstance(experts, Quantized) and experts.bits == 4
    assert experts.weight.shape[0] == dec.config.num_experts
    follow = mlxlm_ids(model_dir, PROMPT)[:8]
    expected = reference_logits(model_dir, PROMPT, follow)
    got = flock_logits(model_dir, PROMPT, follow, fuse=True, compiled=True)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()


def _per_expert_copy(source: Path, out: Path, family: str) -> Path:
    """The checkpoint with each expert's projections as separate tensors (the Hugging Face
    layout that mlx-lm's sanitize stacks)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"} if family == "mixtral" \
        else {n: n for n in ("gate_proj", "down_proj", "up_proj")}
    weights = mx.load(str(out / "model.safetensors"))
    for key in [k for k in weights if ".switch_mlp." in k]:
        prefix, rest = key.split(".switch_mlp.")
        proj, kind = rest.split(".")
        stacked = weights.pop(key)
        for e in range(stacked.shape[0]):
            weights[f"{prefix}.experts.{e}.{names[proj]}.{kind}"] = stacked[e]
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_checkpoints_load_like_stacked_ones(family: str, smollm2_dir: Path,
                                                       tmp_path: Path) -> None:
    stacked, ids = arch_dir(family, smollm2_dir)
    per_expert = _per_expert_copy(stacked, tmp_path / family, family)
    want = flock_logits(stacked, PROMPT, ids[:3], fuse=True, compiled=False)
    got = flock_logits(per_expert, PROMPT, ids[:3], fuse=True, compiled=False)
    for a, b in zip(want, got, strict=True):
        assert mx.allclose(a, b, atol=1e-6).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_serves_moe_with_mlxlm_greedy_ids_and_batches(
        family: str, smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir, expected = arch_dir(family, smollm2_dir)
    other_expected = mlxlm_ids(model_dir, OTHER_PROMPT)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
    runner = RunnerProcess(RunnerConfig(model_name=family, model_dir=str(model_dir),
                                        stats_interval_s=0.05), env)

    # A second turn extends the first: the prefix cache hands its KV back, and the answer is
    # still mlx-lm's greedy one for the whole conversation.
    turn2 = [*PROMPT, *expected, 500, 600, 700]
    turn2_expected = mlxlm_ids(model_dir, turn2)

    async def main() -> None:
        ready = await runner.start(timeout=180)
        assert ready.engine == "flock"
        try:
            await assert_greedy_and_batched(runner, expected, other_expected)
            ids, end = await collect(runner, greedy("turn2", turn2))
            assert ids == turn2_expected
            assert isinstance(end, Finished)
            assert end.usage.cached_tokens >= len(PROMPT) + len(expected) - 1
        finally:
            await runner.stop()

    asyncio.run(main())


@pytest.mark.parametrize("strategy", ["pipeline", "tensor", "tensor-4bit"])
def test_moe_as_pipeline_stages_and_tensor_parallel(strategy: str, smollm2_dir: Path,
                                                    tmp_path: Path) -> None:
    """qwen2_moe (routed and shared experts): 2 pipeline stages, or 2 ranks each holding half
    of every expert's width (float32, or 4-bit kept quantized), give mlx-lm's greedy ids and
    batch two requests."""
    import msgspec

    from tests.test_pipeline import pipeline_configs, start_all, tensor_configs

    model_dir, expected = arch_dir("qwen2_moe", smollm2_dir)
    dtype = "float32"
    if strategy == "tensor-4bit":
        model_dir = convert_quantized(model_dir,
                                      TEST_CACHE / "models" / f"tiny-qwen2_moe-4bit-{_KEY}")
        expected, dtype = mlxlm_ids(model_dir, PROMPT), "keep"
    other_expected = mlxlm_ids(model_dir, OTHER_PROMPT)
    # Stop-and-wait, so the two requests share one decode step (micro-batches in flight would
    # put them in different steps; tests/test_microbatch_pipeline.py covers that path).
    configs = pipeline_configs(model_dir, [(0, 1), (1, 2)], pipeline_microbatch=False) \
        if strategy == "pipeline" else tensor_configs(model_dir, 2)

    async def main() -> None:
        runners = await start_all([msgspec.structs.replace(c, stats_interval_s=0.05,
                                                           dtype=dtype)
                                   for c in configs], tmp_path)
        try:
            assert all(r.ready and r.ready.engine == "flock" for r in runners)
            await assert_greedy_and_batched(runners[0], expected, other_expected)
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_sizes_moe_layers_as_stored(family: str, smollm2_dir: Path) -> None:
    """Pipeline placement splits by the registry's bytes per layer: for these families they
    count every expert, the router and the shared expert, as the checkpoint holds them."""
    model_dir, _ = arch_dir(family, smollm2_dir)
    shape = arch.shape(arch.read_config(model_dir))
    tensors = mx.load(str(model_dir / "model.safetensors"))
    for index in range(shape.layers):
        stored = sum(a.size for k, a in tensors.items()
                     if k.startswith(f"model.layers.{index}."))
        assert sum(shape.layer_params(index)) == stored, (family, index)
