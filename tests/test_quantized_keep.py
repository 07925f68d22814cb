"""Quantized checkpoints served as stored (`dtype = "keep"`): mlx-community 4-bit directories,
per-module overrides, and GGUF Q4_1 imported with `--dtype keep`, against mlx-lm's own model."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from agent.generation import GenerationRequest, SamplingParams, TokenChunk
from agent.models.gguf import GGUFImportError, import_gguf
from agent.models.tokenizer import load_tokenizer
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import (
    FusedGateUp,
    FusedQKV,
    LayerRange,
    Quantized,
    SplitQKV,
    load_decoder,
)
from agent.runtime.protocol import RunnerConfig
from agent.runtime.step import prefill
from agent.settings import NodeSettings
from tests.quant_models import convert_quantized
from tests.test_pipeline import first_logprobs, start_all, tensor_configs
from tests.tiny_models import make_tiny_model

PROMPT = [1, 504, 3458, 282, 4649, 314, 2473, 30, 506, 3575, 282, 4649, 314]
STEPS = 24


def mlx_lm_greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    model, _ = load_model(model_dir)
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=steps):
        out.append(int(token))
    return out


def runner_greedy(model_dir: Path, tmp_path: Path, prompt: list[int], steps: int,
                  **config: object) -> tuple[list[int], object]:
    async def main() -> tuple[list[int], object]:
        env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
        runner = RunnerProcess(RunnerConfig(model_name="m", model_dir=str(model_dir), **config),
                               env)
        ready = await runner.start()
        tokens: list[int] = []
        try:
            request = GenerationRequest(id="r", model="m", prompt_tokens=prompt,
                                        sampling=SamplingParams(max_tokens=steps,
                                                                temperature=0.0))
            async for event in runner.generate(request):
                if isinstance(event, TokenChunk):
                    tokens += event.token_ids
        finally:
            await runner.stop()
        return tokens, ready

    return asyncio.run(main())


def test_kept_4bit_runner_generates_mlx_lm_greedy_ids(smollm2_4bit_dir: Path,
                                                      tmp_path: Path) -> None:
    expected = mlx_lm_greedy(smollm2_4bit_dir, PROMPT, STEPS)
    tokens, ready = runner_greedy(smollm2_4bit_dir, tmp_path, PROMPT, STEPS, dtype="keep")
    assert tokens == expected
    assert ready.dtype == "keep"  # type: ignore[attr-defined]


def test_kept_weights_stay_quantized_and_float_dtype_dequantizes(smollm2_4bit_dir: Path) -> None:
    kept = load_decoder(smollm2_4bit_dir, dtype=None)
    assert isinstance(kept.embed, Quantized) and kept.embed.bits == 4
    layer = kept.layers[0]
    assert isinstance(layer.attn.qkv, FusedQKV) and isinstance(layer.attn.qkv.qkv, Quantized)
    floats = load_decoder(smollm2_4bit_dir, dtype=mx.float32)
    assert kept.weight_bytes() < 0.2 * floats.weight_bytes()
    # Dequantizing at load and computing in float32 gives (nearly) the kept model's logits.
    for dec in (kept, floats):
        assert dec.dtype == mx.float32
    logits = []
    for dec in (kept, floats):
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim,
                                dec.dtype), chunk=64)
        kv.acquire("a", len(PROMPT))
        logits.append(prefill(dec, mx.array(PROMPT), 0, 0, kv.keys, kv.values))
    assert mx.allclose(logits[0], logits[1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("fuse", [True, False])
def test_per_module_overrides_load_as_stored_and_match_mlx_lm(smollm2_mixed_dir: Path,
                                                              tmp_path: Path, fuse: bool) -> None:
    dec = load_decoder(smollm2_mixed_dir, dtype=None, fuse=fuse)
    first, second = dec.layers[0], dec.layers[1]
    if fuse:
        assert isinstance(first.mlp.gate_up, FusedGateUp)
        assert isinstance(first.mlp.gate_up.gate_up, Quantized)
        assert first.mlp.gate_up.gate_up.bits == 8
        # v_proj is stored in float: q, k, v cannot share one exact matmul.
        assert isinstance(second.attn.qkv, SplitQKV)
    expected = mlx_lm_greedy(smollm2_mixed_dir, PROMPT, STEPS)
    tokens, _ = runner_greedy(smollm2_mixed_dir, tmp_path, PROMPT, STEPS, dtype="keep",
                              fuse_projections=fuse)
    assert tokens == expected


def test_q4_1_gguf_imported_kept_serves_and_answers(smollm2_gguf: Path,
                                                    tmp_path_factory: pytest.TempPathFactory,
                                                    ) -> None:
    tmp_path = tmp_path_factory.mktemp("keep")
    kept = import_gguf(smollm2_gguf, tmp_path / "keep", dtype="keep")
    dec = load_decoder(kept, dtype=None)
    assert isinstance(dec.layers[0].attn.qkv, FusedQKV)
    assert isinstance(dec.layers[0].attn.qkv.qkv, Quantized)
    assert dec.layers[0].attn.qkv.qkv.group_size == 32
    assert isinstance(dec.embed, Quantized) and dec.embed.bits == 8  # stored Q8_0
    del dec
    tokenizer = load_tokenizer(kept)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    tokens, _ = runner_greedy(kept, tmp_path, list(prompt), 16, dtype="keep")
    assert "Paris" in tokenizer.decode(tokens)


def write_k_quant_gguf(path: Path) -> None:
    """A GGUF holding one Q4_K tensor (256 weights: one 144-byte block) and its architecture."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    metadata = string("general.architecture") + struct.pack("<I", 8) + string("llama")
    info = string("blk.0.attn_q.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 256, 1)
    info += struct.pack("<IQ", 12, 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + metadata + info
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"\0" * 144)


def test_k_quants_are_refused_for_keep(tmp_path: Path) -> None:
    write_k_quant_gguf(tmp_path / "k.gguf")
    with pytest.raises(GGUFImportError, match=r"Q4_K \(1 tensors\).*--dtype float32"):
        import_gguf(tmp_path / "k.gguf", tmp_path / "out", dtype="keep")


def first_logits(dec, prompt: list[int]) -> mx.array:  # type: ignore[no-untyped-def]
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim,
                            dec.dtype), chunk=64)
    row = kv.acquire("a", len(prompt) + 1)
    return prefill(dec, mx.array(prompt) if dec.embeds else prompt, 0, row, kv.keys, kv.values)


def test_kept_pipeline_stages_compose_to_the_whole_model(smollm2_4bit_dir: Path) -> None:
    whole = first_logits(load_decoder(smollm2_4bit_dir, dtype=None), PROMPT)
    first = load_decoder(smollm2_4bit_dir, dtype=None, layers=LayerRange(0, 12))
    second = load_decoder(smollm2_4bit_dir, dtype=None, layers=LayerRange(12, 30))
    assert isinstance(second.embed, Quantized)  # the tied head of the last stage
    hidden = first_logits(first, PROMPT)
    assert mx.array_equal(whole, first_logits(second, hidden)).item()


def test_kept_tensor_parallel_matches_one_process(tmp_path: Path) -> None:
    """Quantized rows and whole quantization groups of columns are sharded over 2 ranks."""
    source = make_tiny_model(tmp_path / "f32", hidden=128, intermediate=256)
    model_dir = convert_quantized(source, tmp_path / "q4")

    async def main() -> None:
        import msgspec

        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(model_dir),
                                              dtype="keep")], tmp_path))[0]
        try:
            expected = await first_logprobs(solo)
        finally:
            await solo.stop()
        configs = [msgspec.structs.replace(c, dtype="keep")
                   for c in tensor_configs(model_dir, 2)]
        runners = await start_all(configs, tmp_path)
        try:
            got = await first_logprobs(runners[0])
        finally:
            for runner in runners:
                await runner.stop()
        assert len(got) == len(expected) > 0
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-3

    asyncio.run(main())


def test_serving_dtype_names(smollm2_4bit_dir: Path) -> None:
    from agent.runtime.model import float32_bytes, serving_dtype

    assert serving_dtype("keep", smollm2_4bit_dir, 0) is None
    assert serving_dtype("bfloat16", smollm2_4bit_dir, 0) == mx.bfloat16
    size = float32_bytes(smollm2_4bit_dir)
    assert 500 << 20 < size < 560 << 20  # 135M parameters at 4 bytes
    # auto on CPU: float32 when it fits, else the stored quantization.
    assert serving_dtype("auto", smollm2_4bit_dir, size) == mx.float32
    assert serving_dtype("auto", smollm2_4bit_dir, size - 1) is None
    with pytest.raises(ValueError, match="dtype must be one of keep, auto"):
        serving_dtype("int8", smollm2_4bit_dir, 0)
