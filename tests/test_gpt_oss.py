"""gpt_oss on flock's own decoder: on mlx-lm's tiny random gpt_oss (float32; 2 layers, sliding
window 8 then full, attention sinks, 4 biased experts, top 2) flock's logits equal mlx-lm's in
one-pass and chunked prefill and the decode step, the speculative verify and micro-batch
row-range steps; mxfp4 checkpoints (MLX's conversion, OpenAI's own layout) are served as
stored; a runner serves mlx-lm's greedy ids
alone, batched, as 2 pipeline stages and (a 2-KV-head variant) tensor parallel over 2 ranks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

from agent.models import arch
from agent.models.arch import read_config
from agent.runtime import gpt_oss
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import DecoderConfig, Quantized, SparseMoe, load_decoder
from agent.runtime.protocol import RunnerConfig
from agent.runtime.runner import choose_engine
from agent.runtime.step import prefill
from agent.settings import NodeSettings
from tests import tiny_archs
from tests.conftest import TEST_CACHE
from tests.test_decoder import flock_logits, reference_logits
from tests.test_mlxlm_engine import (
    _KEY,
    OTHER_PROMPT,
    arch_dir,
    assert_greedy_and_batched,
    mlxlm_ids,
)
from tests.tiny_archs import PROMPT

ATOL = 2e-4
ARCH = "gpt_oss"


TP_ARCH = "gpt_oss_tp"


def gpt_oss_tp() -> object:
    """The tiny gpt_oss with 4 heads over 2 KV heads, so 2 ranks can split them (and the
    sinks with them)."""
    return tiny_archs._args("gpt_oss", hidden_size=tiny_archs.HIDDEN, num_hidden_layers=2,
                            intermediate_size=128, head_dim=64, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=8, rope_theta=10000.0)


# make_arch_model builds what its tables name; this model is this file's own (its cache key is
# this file's hash, so the shared tiny models keep theirs).
tiny_archs.FLOCK_DECODER_BUILDERS.setdefault(TP_ARCH, gpt_oss_tp)
tiny_archs.FLOCK_DECODER_MODULES.setdefault(TP_ARCH, "gpt_oss")
_TP_KEY = hashlib.sha256(Path(__file__).read_bytes() + Path(tiny_archs.__file__).read_bytes()
                         + mlx_lm.__version__.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def oss_model(smollm2_dir: Path) -> tuple[Path, list[int]]:
    return arch_dir(ARCH, smollm2_dir)


def test_gpt_oss_runs_on_flocks_decoder_mxfp4_included() -> None:
    assert choose_engine({"model_type": ARCH}) == "flock"
    assert choose_engine({"model_type": ARCH, "quantization": {
        "group_size": 32, "bits": 4, "mode": "mxfp4"}}) == "flock"
    assert choose_engine({"model_type": ARCH,
                          "quantization_config": {"quant_method": "mxfp4"}}) == "flock"
    assert arch.architecture({"model_type": ARCH}).strategies == (
        "single", "pipeline", "tensor")
    # mlx-lm's defaults: window 128, sliding and full layers alternating.
    config = DecoderConfig.from_hf({"model_type": ARCH, "hidden_size": 64,
                                    "num_hidden_layers": 4, "num_attention_heads": 2,
                                    "vocab_size": 10, "num_local_experts": 4,
                                    "num_experts_per_tok": 2, "intermediate_size": 64})
    assert config.sliding_window == 128 and config.sliding_layers == frozenset({0, 2})
    assert config.rope_theta == 150000 and config.attention_bias
    assert not config.tie_word_embeddings


def test_swiglu_oai_and_hf_names_follow_mlx_lm() -> None:
    from mlx_lm.models.activations import SwigluOAI

    gate, up = mx.random.normal((4, 32)) * 6, mx.random.normal((4, 32)) * 6
    assert mx.allclose(gpt_oss.swiglu_oai(gate, up), SwigluOAI()(up, gate), atol=1e-6).item()
    fused = mx.arange(2 * 6 * 3).reshape(2, 6, 3)  # (experts, gate/up rows interleaved, in)
    out = gpt_oss.sanitize({"m.experts.gate_up_proj": fused,
                            "m.experts.gate_up_proj_bias": mx.arange(12).reshape(2, 6),
                            "m.experts.down_proj": fused, "m.router.weight": fused})
    assert out["m.experts.gate_proj.weight"].tolist() == fused[:, ::2].tolist()
    assert out["m.experts.up_proj.bias"].tolist() == [[1, 3, 5], [7, 9, 11]]
    assert set(out) == {"m.experts.gate_proj.weight", "m.experts.up_proj.weight",
                        "m.experts.gate_proj.bias", "m.experts.up_proj.bias",
                        "m.experts.down_proj.weight", "m.router.weight"}


@pytest.mark.parametrize(("fuse", "compiled", "chunk"), [(True, True, 1000), (False, False, 5)])
def test_gpt_oss_logits_match_mlx_lm(oss_model: tuple[Path, list[int]], fuse: bool,
                                     compiled: bool, chunk: int) -> None:
    model_dir, ids = oss_model
    config = DecoderConfig.from_hf(read_config(model_dir))
    assert config.sliding_window == 8 and config.sliding_layers == frozenset({0})
    assert len(PROMPT) > config.sliding_window
    dec = load_decoder(model_dir, fuse=fuse)
    assert all(layer.attn.sinks is not None and isinstance(layer.mlp, SparseMoe)
               for layer in dec.layers)
    expected = reference_logits(model_dir, PROMPT, ids[:12])
    got = flock_logits(model_dir, PROMPT, ids[:12], fuse=fuse, compiled=compiled, chunk=chunk)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()
    assert [int(mx.argmax(x)) for x in got[:12]] == ids[:12]


def test_sinks_matter_and_verify_and_row_range_steps_keep_them(
        oss_model: tuple[Path, list[int]]) -> None:
    """Without the sinks the logits are not mlx-lm's; the speculative verify step (12
    positions at once, row 1 of 2) and the micro-batch row-range step give mlx-lm's."""
    from agent.runtime.rowstep import RowsDecode
    from agent.runtime.verify import make_verify_fn

    model_dir, ids = oss_model
    prompt, follow = PROMPT, ids[:12]
    expected = reference_logits(model_dir, prompt, follow)
    dec = load_decoder(model_dir)

    def fresh_kv() -> KvSlots:
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim),
                     chunk=16)
        for name in ("other", "seq"):
            kv.acquire(name, len(prompt) + len(follow) + 1)
        return kv

    kv = fresh_kv()
    sinkless = replace(dec, layers=[replace(layer, attn=replace(layer.attn, sinks=None))
                                    for layer in dec.layers])
    off = prefill(sinkless, mx.array(prompt), 0, 1, kv.keys, kv.values)
    assert mx.abs(off[0] - expected[0]).max().item() > 100 * ATOL

    kv = fresh_kv()
    prefill(dec, mx.array(prompt[:5]), 0, 0, kv.keys, kv.values)  # row 0 elsewhere
    prefill(dec, mx.array(prompt), 0, 1, kv.keys, kv.values)
    keys, values = list(kv.keys), list(kv.values)
    out = make_verify_fn(dec, compiled=False)(
        mx.array([[prompt[-1], *follow[:11]]] * 2), mx.array([4, len(prompt) - 1]),
        *keys, *values)
    for j in range(12):
        assert mx.allclose(out[0][1, j], expected[j], atol=ATOL).item()
    n = len(kv.keys)
    step = RowsDecode(dec, compiled=False)(1)
    position = len(prompt)
    for j, token in enumerate(follow[:4]):
        result = step(mx.array([token]), mx.array([position + j]), *kv.keys, *kv.values)
        kv.keys, kv.values = list(result[1:1 + n]), list(result[1 + n:])
        assert mx.allclose(result[0][0], expected[j + 1], atol=ATOL).item()


def _mxfp4_copy(source: Path) -> Path:
    """mlx-lm's convert with q_mode mxfp4 (as mlx-community converts gpt_oss): experts and
    attention in mxfp4, the router at 8 bits affine (mlx-lm's gpt_oss quant_predicate)."""
    out = TEST_CACHE / "models" / f"tiny-{ARCH}-mxfp4-{_KEY}"
    if (out / "config.json").exists():
        return out
    from mlx_lm import convert

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(str(source), str(tmp), quantize=True, q_mode="mxfp4")
    tmp.replace(out)
    return out


def test_mxfp4_conversion_is_served_as_stored(oss_model: tuple[Path, list[int]]) -> None:
    model_dir = _mxfp4_copy(oss_model[0])
    assert json.loads((model_dir / "config.json").read_text())["quantization"]["mode"] == "mxfp4"
    dec = load_decoder(model_dir, dtype=None)
    moe = dec.layers[0].mlp
    assert isinstance(moe, SparseMoe) and isinstance(moe.down, Quantized)
    assert moe.down.mode == "mxfp4" and moe.down.scales.dtype == mx.uint8
    assert isinstance(moe.router, Quantized) and moe.router.params == (64, 8, "affine")
    follow = mlxlm_ids(model_dir, PROMPT)[:8]
    expected = reference_logits(model_dir, PROMPT, follow)
    got = flock_logits(model_dir, PROMPT, follow, fuse=True, compiled=True)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "pipeline", "tensor"])
def test_runner_serves_gpt_oss_with_mlxlm_greedy_ids(strategy: str,
                                                     oss_model: tuple[Path, list[int]],
                                                     smollm2_dir: Path, tmp_path: Path) -> None:
    """One runner, 2 pipeline stages (one layer each: the sliding one, the full one), or 2
    tensor-parallel ranks (each with half the heads, sinks and expert widths) give mlx-lm's
    greedy ids alone and batched with a row at other positions."""
    import msgspec

    from tests.test_pipeline import pipeline_configs, start_all, tensor_configs

    model_dir, expected = oss_model
    if strategy == "tensor":
        model_dir, expected = tiny_archs.make_arch_model(
            TEST_CACHE / "models" / f"tiny-{TP_ARCH}-{_TP_KEY}", TP_ARCH, smollm2_dir)
    other_expected = mlxlm_ids(model_dir, OTHER_PROMPT)

    async def main() -> None:
        if strategy == "single":
            env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
            runners = [RunnerProcess(RunnerConfig(model_name=ARCH, model_dir=str(model_dir),
                                                  stats_interval_s=0.05), env)]
            await runners[0].start(timeout=180)
        else:
            configs = pipeline_configs(model_dir, [(0, 1), (1, 2)], pipeline_microbatch=False) \
                if strategy == "pipeline" else tensor_configs(model_dir, 2)
            runners = await start_all([msgspec.structs.replace(c, stats_interval_s=0.05)
                                       for c in configs], tmp_path)
        try:
            assert all(r.ready and r.ready.engine == "flock" for r in runners)
            await assert_greedy_and_batched(runners[0], expected, other_expected)
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())


def _openai_mxfp4_copy(source: Path) -> Path:
    """The tiny model as OpenAI ships gpt_oss: experts alone in mxfp4, as fused
    `gate_up_proj` (gate and up rows interleaved) and `down_proj` `_blocks` (uint8, 16 a
    group) / `_scales` / `_bias` tensors, `quantization_config.quant_method` "mxfp4"."""
    out = TEST_CACHE / "models" / f"tiny-{ARCH}-openai-mxfp4-{_KEY}"
    if (out / "config.json").exists():
        return out
    from mlx_lm import convert

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(str(source), str(tmp), quantize=True, q_mode="mxfp4",
            quant_predicate=lambda path, _module: ".experts." in path)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization")
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp / "config.json").write_text(json.dumps(cfg))
    weights = mx.load(str(tmp / "model.safetensors"))
    raw: dict[str, mx.array] = {}

    def blocks(w: mx.array) -> mx.array:
        b = w.view(mx.uint8)
        return b.reshape(*b.shape[:-1], -1, 16)

    for name, v in weights.items():
        if ".experts." not in name:
            raw[name] = v
            continue
        proj, kind = name.rsplit(".", 2)[1:]
        base = name.rsplit(".", 3)[0] + ".experts."
        if proj == "up_proj":
            continue
        if proj == "gate_proj":
            up = weights[name.replace("gate_proj", "up_proj")]
            # Row i of gate at 2i, of up at 2i + 1 (the last axis of a bias).
            v = mx.stack([v, up], axis=-1).reshape(v.shape[0], -1) if kind == "bias" else \
                mx.stack([v, up], axis=2).reshape(v.shape[0], -1, v.shape[-1])
            proj = "gate_up_proj"
        suffix = {"weight": "_blocks", "scales": "_scales", "bias": "_bias"}[kind]
        raw[base + proj + suffix] = blocks(v) if kind == "weight" else v
    mx.save_safetensors(str(tmp / "model.safetensors"), raw, metadata={"format": "mlx"})
    (tmp / "model.safetensors.index.json").unlink(missing_ok=True)
    tmp.replace(out)
    return out


def test_openai_mxfp4_checkpoints_load_as_mlx_lm_reads_them(
        oss_model: tuple[Path, list[int]]) -> None:
    model_dir = _openai_mxfp4_copy(oss_model[0])
    assert any(k.endswith("gate_up_proj_blocks") for k in mx.load(
        str(model_dir / "model.safetensors")))
    dec = load_decoder(model_dir, dtype=None)
    moe = dec.layers[0].mlp
    assert isinstance(moe, SparseMoe) and isinstance(moe.down, Quantized)
    assert moe.down.params == (32, 4, "mxfp4") and not isinstance(moe.router, Quantized)
    follow = mlxlm_ids(model_dir, PROMPT)[:8]
    expected = reference_logits(model_dir, PROMPT, follow)
    got = flock_logits(model_dir, PROMPT, follow, fuse=True, compiled=True)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()
    # Dequantized to float32 at load (what "auto" picks on CPU when it fits), sized as such.
    from agent.runtime.model import float32_bytes

    assert float32_bytes(model_dir) == float32_bytes(oss_model[0])
    dense = load_decoder(model_dir, dtype=mx.float32)
    assert not isinstance(dense.layers[0].mlp.down, Quantized)
    kv = KvSlots(KvGeometry(len(dense.layers), dense.local_kv_heads, dense.config.head_dim),
                 chunk=16)
    row = kv.acquire("seq", len(PROMPT) + 1)
    logits = prefill(dense, mx.array(PROMPT), 0, row, kv.keys, kv.values)
    assert mx.allclose(expected[0], logits[0], atol=ATOL).item()
