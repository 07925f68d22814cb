"""The architecture registry (agent/models/arch.py): engines, strategies, shapes, refusals.

Configs are small dicts shaped like the real config.json of each family; parameter counts are
checked against mlx-lm's own model classes built from the same configs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.models import arch

LLAMA: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": LLAMA,
    "mistral": {**LLAMA, "model_type": "mistral", "sliding_window": 1024},
    "qwen2": {**LLAMA, "model_type": "qwen2"},
    "qwen3": {**LLAMA, "model_type": "qwen3", "head_dim": 32},
    "qwen3_moe": {**LLAMA, "model_type": "qwen3_moe", "head_dim": 16, "num_experts": 8,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "mixtral": {**LLAMA, "model_type": "mixtral", "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "gpt_oss": {**LLAMA, "model_type": "gpt_oss", "head_dim": 16, "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 2},
    "deepseek_v3": {**LLAMA, "model_type": "deepseek_v3", "n_routed_experts": 8,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32,
                    "q_lora_rank": 48, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "n_group": 1, "topk_group": 1},
    "kimi_k2": {},  # filled below: deepseek_v3 under another name
    "gemma3": {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
               "text_config": {"model_type": "gemma3_text", "hidden_size": 64,
                               "num_hidden_layers": 6, "intermediate_size": 128,
                               "num_attention_heads": 4, "num_key_value_heads": 1,
                               "head_dim": 16, "vocab_size": 256, "sliding_window": 512,
                               "max_position_embeddings": 8192},
               "vision_config": {"hidden_size": 32}},
    "nemotron_h": {**LLAMA, "model_type": "nemotron_h", "hybrid_override_pattern": "M-M*-E",
                   "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16,
                   "n_groups": 1, "conv_kernel": 4, "n_routed_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "mamba_proj_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False,
                   "attention_bias": False, "mlp_bias": False,
                   "use_conv_bias": True},
    "qwen3_next": {**LLAMA, "model_type": "qwen3_next", "head_dim": 16, "num_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32, "full_attention_interval": 2,
                   "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                   "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25,
                   "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
}
CONFIGS["kimi_k2"] = {**CONFIGS["deepseek_v3"], "model_type": "kimi_k2"}


def test_flock_decoder_families_run_here_with_every_strategy() -> None:
    # gpt_oss too (runtime/gpt_oss.py), its mxfp4 checkpoints (MLX's or OpenAI's) included.
    for quant in ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}},
                  {"quantization_config": {"quant_method": "mxfp4"}}):
        assert arch.architecture({**CONFIGS["gpt_oss"], **quant}).engine == "flock"
    for name in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt_oss"):
        found = arch.architecture(CONFIGS[name])
        assert found.engine == "flock" and found.runnable
        assert found.strategies == ("single", "pipeline", "tensor")
        assert arch.refusal(CONFIGS[name], "hybrid", 2) is None


def test_mlx_lm_families_run_on_the_mlx_lm_engine_on_one_node() -> None:
    assert arch.MLX_LM_ENGINE_AVAILABLE
    # kimi_k2 (mlx-lm loads it as deepseek_v3) where gpt_oss was: gpt_oss runs on flock's
    # decoder now.
    for name in ("kimi_k2", "deepseek_v3", "gemma3", "nemotron_h", "qwen3_next"):
        config = CONFIGS[name]
        found = arch.architecture(config)
        assert found.engine == "mlx-lm" and found.runnable, name
        assert arch.refusal(config) is None, name
        # Pipeline stages slice the module's layer list (runtime/mlxlm_pipeline.py) ...
        assert "pipeline" in found.strategies, name
        assert arch.refusal(config, "pipeline", 2) is None, name
        # ... but not inside tensor groups.
        reason = arch.refusal(config, "hybrid", 4)
        assert reason is not None and f"'{name}'" in reason and "pipeline" in reason
    # A module whose slicing no test covers is refused pipeline stages by name.
    assert arch.mlx_lm_module("mamba") is not None
    assert "mamba" not in arch.MLX_LM_PIPELINE_MODULES
    reason = arch.refusal({"model_type": "mamba"}, "pipeline", 2)
    assert reason is not None and "'mamba'" in reason and "pipeline" in reason


def test_remapped_model_types_use_mlx_lm_modules() -> None:
    remap = arch.model_remapping()
    assert remap["kimi_k2"] == "deepseek_v3" and remap["mistral"] == "llama"
    assert arch.architecture(CONFIGS["kimi_k2"]).mlx_lm_module == "deepseek_v3"
    assert "kimi_k2" in arch.mlx_lm_architectures()
    assert len(arch.mlx_lm_architectures()) > 100


def test_readme_table_lists_every_architecture_with_its_engine() -> None:
    table = arch.markdown_table()
    assert "| llama | flock | single, pipeline, tensor | yes |" in table
    assert "| kimi_k2 | mlx-lm | single, pipeline, tensor | yes |" in table
    assert len(table.splitlines()) == 2 + len({*arch.FLOCK_DECODER_ARCHITECTURES,
                                               *arch.mlx_lm_architectures()})


def test_strategies_follow_what_mlx_lm_modules_offer() -> None:
    # deepseek_v3 defines shard(); gemma3 does not, so tensor parallel is not offered (its
    # layer list slices: pipeline is).
    assert "tensor" in arch.architecture(CONFIGS["deepseek_v3"]).strategies
    assert arch.architecture(CONFIGS["gemma3"]).strategies == ("single", "pipeline")


def test_unknown_architecture_is_refused_naming_it_and_what_runs() -> None:
    reason = arch.refusal({"model_type": "frobnicator", "hidden_size": 8})
    assert reason is not None and "'frobnicator'" in reason
    assert "llama, mistral, qwen2, qwen3" in reason
    with pytest.raises(arch.UnsupportedArchitecture, match="frobnicator"):
        arch.check({"model_type": "frobnicator"})
    assert arch.refusal({}) is not None
    assert "cannot be read" in str(arch.refusal_of_dir(Path("/nonexistent")))


def test_tensor_parallel_that_does_not_divide_is_refused() -> None:
    reason = arch.refusal(LLAMA, "tensor", 3)
    assert reason is not None and "heads (4)" in reason and "KV heads (2)" in reason
    assert arch.refusal(LLAMA, "tensor", 2) is None


def test_nested_text_config_gives_the_decoder_dimensions() -> None:
    shape = arch.shape(CONFIGS["gemma3"])
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == \
        (6, 64, 4, 1, 16)
    assert shape.model_type == "gemma3" and shape.context == 8192
    # One global layer in six, the others keep a 512-token window.
    assert shape.kinds == ("sliding",) * 5 + ("full",)
    assert shape.kv_tokens(0, 4096) == 512 and shape.kv_tokens(5, 4096) == 4096


def test_kv_bytes_per_token_for_each_kind_of_layer() -> None:
    llama = arch.shape(LLAMA)
    assert llama.kv_bytes_per_token(0, 2) == 2 * 2 * 16 * 2
    deepseek = arch.shape(CONFIGS["deepseek_v3"])
    assert deepseek.kind(0) == "latent"
    assert deepseek.kv_bytes_per_token(0, 2) == (32 + 8) * 2  # latent + rope key, one head
    nemotron = arch.shape(CONFIGS["nemotron_h"])
    assert nemotron.kinds == ("recurrent", "none", "recurrent", "full", "none", "none")
    assert nemotron.kv_bytes_per_token(0, 2) == 0 and nemotron.recurrent_state_bytes > 0
    assert nemotron.kv_bytes_per_token(3, 2) == 2 * 2 * 16 * 2
    next_ = arch.shape(CONFIGS["qwen3_next"])
    assert next_.kinds == ("recurrent", "full") * 2
    oss = arch.shape(CONFIGS["gpt_oss"])
    assert oss.kinds == ("sliding", "full") * 2 and oss.sliding_window == 128
    assert arch.shape(CONFIGS["mistral"]).kinds == ("sliding",) * 4


def test_experts_and_dense_layers_of_moe_configs() -> None:
    moe = arch.shape(CONFIGS["qwen3_moe"])
    assert (moe.experts, moe.experts_per_token, moe.moe_intermediate) == (8, 2, 32)
    mixtral = arch.shape(CONFIGS["mixtral"])
    assert (mixtral.experts, mixtral.moe_intermediate) == (4, 128)
    deepseek = arch.shape(CONFIGS["deepseek_v3"])
    assert deepseek.dense_layers == frozenset({0}) and deepseek.shared_experts == 1
    assert deepseek.layer_params(0) != deepseek.layer_params(1)


def test_layer_prefixes_for_shard_transfer() -> None:
    assert arch.layer_prefix(LLAMA, 3) == "model.layers.3."
    assert arch.layer_prefix(CONFIGS["nemotron_h"], 2) == "backbone.layers.2."
    names = ["model.language_model.layers.0.mlp.up_proj.weight"]
    assert arch.layer_prefix(CONFIGS["gemma3"], 7, names) == "model.language_model.layers.7."
    assert arch.layer_index("backbone.layers.12.mixer.in_proj.weight") == 12
    assert arch.layer_index("language_model.model.layers.4.self_attn.q_proj.weight") == 4
    assert arch.layer_index("model.embed_tokens.weight") is None
    layers = arch.LayerRange(0, 2)
    assert arch.stage_wants("model.layers.1.mlp.up_proj.weight", layers, True, False, True)
    assert not arch.stage_wants("model.layers.2.mlp.up_proj.weight", layers, True, False, True)
    assert arch.stage_wants("model.embed_tokens.weight", layers, False, True, True)
    assert not arch.stage_wants("lm_head.weight", layers, False, True, True)
    assert arch.stage_wants("backbone.norm_f.weight", layers, False, True, False)


def test_bytes_per_layer_at_each_weight_format() -> None:
    shape = arch.shape(LLAMA)
    matrices, vectors = shape.layer_params(0)
    f32 = arch.weight_format(LLAMA, "float32")
    assert shape.layer_bytes(0, f32) == 4 * (matrices + vectors)
    assert shape.layer_bytes(0, arch.weight_format(LLAMA, "bfloat16")) == 2 * (matrices + vectors)
    quantized = {**LLAMA, "quantization": {"group_size": 32, "bits": 4}}
    kept = arch.weight_format(quantized, "keep")
    assert (kept.dtype, kept.bits, kept.group_size) == ("affine", 4, 32)
    # 4 bits per weight plus a float16 scale and bias per 32 weights; norms in float16.
    assert shape.layer_bytes(0, kept) == matrices // 2 + matrices // 32 * 4 + 2 * vectors
    eight = arch.weight_format({**LLAMA, "quantization": {"group_size": 64, "bits": 8}}, "keep")
    assert eight.matrix_bytes(6400) == 6400 + 100 * 4
    assert arch.weight_format(LLAMA, "keep").dtype == "float16"
    with pytest.raises(ValueError, match="dtype"):
        arch.weight_format(LLAMA, "int3")


def _mlx_lm_layer_params(config: dict[str, Any], index: int) -> int:
    import importlib

    from mlx.utils import tree_flatten

    module = importlib.import_module(f"mlx_lm.models.{arch.module_name(config)}")
    model = module.Model(module.ModelArgs.from_dict(config))
    return sum(v.size for _, v in tree_flatten(model.layers[index].parameters()))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_layer_parameters_equal_mlx_lm_models(name: str) -> None:
    config = CONFIGS[name]
    shape = arch.shape(config)
    for index in range(shape.layers):
        assert sum(shape.layer_params(index)) == _mlx_lm_layer_params(config, index), index


def test_latent_attention_parameters_near_mlx_lm_deepseek() -> None:
    # Only norm vectors and the router's correction bias are left out of the estimate.
    config = CONFIGS["deepseek_v3"]
    shape = arch.shape(config)
    for index in (0, 1):
        ours, theirs = sum(shape.layer_params(index)), _mlx_lm_layer_params(config, index)
        assert abs(ours - theirs) / theirs < 0.01, (index, ours, theirs)


@pytest.mark.parametrize("name", ["nemotron_h", "qwen3_next", "gpt_oss"])
def test_hybrid_and_sink_layers_are_sized_near_mlx_lm(name: str) -> None:
    # Mamba / gated-delta mixers, non-gated MLP blocks and experts: within 2% per layer
    # (norms, sinks and small vectors are estimated).
    config = CONFIGS[name]
    shape = arch.shape(config)
    for index in range(shape.layers):
        ours, theirs = sum(shape.layer_params(index)), _mlx_lm_layer_params(config, index)
        assert abs(ours - theirs) / theirs < 0.02, (index, ours, theirs)


@settings(max_examples=40, deadline=None)
@given(heads=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([8, 16, 32]), layers=st.integers(1, 6),
       inter=st.integers(1, 64), vocab=st.integers(8, 512), tied=st.booleans(),
       model_type=st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
def test_dense_shapes_count_what_the_checkpoint_holds(
    heads: int, group: int, head_dim: int, layers: int, inter: int, vocab: int, tied: bool,
    model_type: str,
) -> None:
    kv = max(1, heads // group)
    hidden = heads * head_dim
    config = {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": inter, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab,
              "tie_word_embeddings": tied}
    shape = arch.shape(config)
    q, k = heads * head_dim, kv * head_dim
    expected = hidden * q * 2 + 2 * hidden * k + 3 * hidden * inter + 2 * hidden
    expected += (q + 2 * k) if model_type == "qwen2" else 0
    expected += 2 * head_dim if model_type == "qwen3" else 0
    assert all(sum(shape.layer_params(i)) == expected for i in range(layers))
    assert shape.embedding_params() == vocab * hidden * (1 if tied else 2)
    assert shape.max_kv_bytes_per_token(4) == 2 * k * 4
    divides = heads % 2 == 0 and kv % 2 == 0 and inter % 2 == 0
    assert (arch.refusal(config, "tensor", 2) is None) == divides


def test_registry_imports_no_mlx(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gemma3"]))
    code = ("import sys, json; from agent.models import arch; "
            f"c = arch.read_config({str(tmp_path)!r}); arch.refusal(c); arch.shape(c); "
            "arch.mlx_lm_architectures(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'mlx_lm', 'torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    assert json.loads(out.stdout) == []


def test_placement_shape_reads_nested_configs_and_refuses_what_cannot_run(
    tmp_path: Path,
) -> None:
    from agent.cluster.shape import model_shape

    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gemma3"]))
    # No KeyError: the registry reads text_config (gemma3 runs on the mlx-lm engine).
    assert model_shape(tmp_path, "g").num_layers == arch.shape(CONFIGS["gemma3"]).layers
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(arch.UnsupportedArchitecture, match="'frobnicator' is not supported"):
        model_shape(tmp_path, "g")
    (tmp_path / "config.json").write_text(json.dumps(
        {**CONFIGS["qwen3"], "quantization": {"bits": 4, "group_size": 32}}))
    f32 = model_shape(tmp_path, "q")
    kept = model_shape(tmp_path, "q", dtype="keep")
    assert kept.layer_bytes < f32.layer_bytes / 6 and kept.dtype_bytes == 2
    assert f32.kv_bytes_per_token_per_layer == 2 * 2 * 32 * 4


def test_readme_table_is_the_registrys() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- architectures:begin -->\n") + len("<!-- architectures:begin -->\n")
    assert readme[start:readme.index("<!-- architectures:end -->")] == arch.markdown_table()
