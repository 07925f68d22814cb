"""Tiny random-weight models of mlx-lm architectures, built from mlx-lm's own model classes.

One function per architecture gives its `ModelArgs` (widths multiples of 64, the SmolLM2
vocabulary of 49152 so its tokenizer fits); `make_arch_model` builds the model, saves it as an
mlx-lm directory with mlx-lm's save helpers and the SmolLM2 tokenizer, and picks a seed for
which greedy decoding is not near a tie (mlx-lm's top-2 logit gap above `MIN_GAP` at every step),
so greedy ids compare exactly between engines.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

VOCAB = 49152  # SmolLM2's tokenizer
HIDDEN = 128
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 2365, 30, 198, 31, 5248, 6733, 42]
GREEDY_TOKENS = 32
MIN_GAP = 1e-3
PERTURB = 0.05
MIN_DISTINCT = 6
SPECIAL_IDS = set(range(17))  # SmolLM2's special tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")


def _args(model_type: str, **fields: Any) -> Any:
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    return module.ModelArgs.from_dict({"model_type": model_type, "vocab_size": VOCAB, **fields})


DENSE = dict(hidden_size=HIDDEN, num_hidden_layers=2, intermediate_size=256,
             num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
             max_position_embeddings=2048)


def gemma3_text() -> Any:
    return _args("gemma3_text", **DENSE | dict(num_hidden_layers=4, head_dim=64,
                 query_pre_attn_scalar=64, sliding_window=8, sliding_window_pattern=2))


def gemma2() -> Any:
    return _args("gemma2", **DENSE | dict(head_dim=64, query_pre_attn_scalar=64))


def phi3() -> Any:
    return _args("phi3", **DENSE | dict(num_key_value_heads=2,
                                        original_max_position_embeddings=2048))


def granite() -> Any:
    return _args("granite", **DENSE | dict(
        logits_scaling=1.0, attention_multiplier=0.125, embedding_multiplier=1.0,
        residual_multiplier=1.0, attention_bias=False, mlp_bias=False, rope_theta=10000.0))


def olmo2() -> Any:
    return _args("olmo2", **DENSE)


def starcoder2() -> Any:
    return _args("starcoder2", **DENSE)


def cohere() -> Any:
    return _args("cohere", **DENSE | dict(num_key_value_heads=2))


def smollm3() -> Any:
    return _args("smollm3", **DENSE | dict(num_hidden_layers=4))


def ministral3() -> Any:
    return _args("ministral3", **DENSE | dict(
        num_hidden_layers=2, head_dim=64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                         "llama_4_scaling_beta": 0.1,
                         "original_max_position_embeddings": 2048}))


def lfm2() -> Any:
    return _args("lfm2", hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=2048, norm_eps=1e-5,
                 conv_bias=False, conv_L_cache=3, block_dim=HIDDEN, block_ff_dim=256,
                 block_multiple_of=64, block_ffn_dim_multiplier=1.0,
                 block_auto_adjust_ff_dim=False, full_attn_idxs=[1, 3])


def qwen3_next() -> Any:
    return _args("qwen3_next", **DENSE | dict(
        num_hidden_layers=4, full_attention_interval=2, head_dim=64,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_conv_kernel_dim=4, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=128,
        mlp_only_layers=[], moe_intermediate_size=128, rope_theta=10000.0,
        partial_rotary_factor=0.5, norm_topk_prob=True))


def nemotron_h() -> Any:
    return _args("nemotron_h", hidden_size=HIDDEN, intermediate_size=256,
                 max_position_embeddings=2048, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=64, attention_bias=False, mamba_num_heads=2, mamba_head_dim=64,
                 mamba_proj_bias=False, ssm_state_size=64, conv_kernel=4, n_groups=1,
                 mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
                 hybrid_override_pattern=["M", "*", "-", "E"], num_hidden_layers=4,
                 moe_intermediate_size=64, moe_shared_expert_intermediate_size=64, n_group=1,
                 n_routed_experts=4, n_shared_experts=1, topk_group=1, num_experts_per_tok=2,
                 norm_topk_prob=True, routed_scaling_factor=1.0)


MLA = dict(hidden_size=HIDDEN, intermediate_size=256, moe_intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
           n_shared_experts=1, n_routed_experts=4, kv_lora_rank=64, q_lora_rank=64,
           qk_rope_head_dim=64, v_head_dim=64, qk_nope_head_dim=64, num_experts_per_tok=2,
           first_k_dense_replace=1, max_position_embeddings=2048)


def deepseek_v3() -> Any:
    return _args("deepseek_v3", **MLA | dict(n_group=1, topk_group=1, norm_topk_prob=True))


def deepseek_v2() -> Any:
    return _args("deepseek_v2", **MLA | dict(topk_method="greedy", n_group=1, topk_group=1,
                 rope_scaling={"type": "yarn", "factor": 1.0, "mscale": 1.0,
                               "mscale_all_dim": 0.0,
                               "original_max_position_embeddings": 2048}))


def qwen3_moe() -> Any:
    return _args("qwen3_moe", **DENSE | dict(
        num_experts=8, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=128, head_dim=64, rope_theta=10000.0,
        tie_word_embeddings=False, norm_topk_prob=True))


def qwen2_moe() -> Any:
    # Two KV heads: the tensor-parallel test splits them over two ranks.
    return _args("qwen2_moe", **DENSE | dict(
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=128,
        shared_expert_intermediate_size=128))


def mixtral() -> Any:
    return _args("mixtral", **DENSE | dict(num_local_experts=8, num_experts_per_tok=4))


def gpt_oss() -> Any:
    return _args("gpt_oss", hidden_size=HIDDEN, num_hidden_layers=2, intermediate_size=128,
                 head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                 num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                 rope_theta=10000.0)


def glm4_moe() -> Any:
    return _args("glm4_moe", **DENSE | dict(
        moe_intermediate_size=64, norm_topk_prob=True, n_group=1, head_dim=64, topk_group=1,
        n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0,
        num_experts_per_tok=2, first_k_dense_replace=1, rope_theta=10000.0,
        rope_scaling=None, use_qk_norm=True, tie_word_embeddings=False, attention_bias=False,
        partial_rotary_factor=0.5))


def minimax() -> Any:
    return _args("minimax", **DENSE | dict(
        intermediate_size=128, num_experts_per_tok=2, num_local_experts=4,
        shared_intermediate_size=0, rope_theta=10000.0, rotary_dim=32, head_dim=64))


# The architectures mlx-lm's engine runs in flock (tests/test_mlxlm_engine.py and the pipeline
# tests go over these).
BUILDERS: dict[str, Callable[[], Any]] = {f.__name__: f for f in (
    gemma3_text, phi3, granite, olmo2, starcoder2, cohere, lfm2, qwen3_next, nemotron_h,
    deepseek_v3, gpt_oss, glm4_moe, minimax, gemma2, smollm3, ministral3, deepseek_v2)}
# The mixture-of-experts families flock's own decoder runs (tests/test_moe.py): 8 experts, top
# 4, so the 16-token prompt's 64 (token, expert) pairs take the sorted path as in mlx-lm.
MOE_BUILDERS: dict[str, Callable[[], Any]] = {f.__name__: f for f in (
    qwen3_moe, qwen2_moe, mixtral)}


# flock's own decoder runs these (the tests above are for mlx-lm's engine); the bench
# compares both engines' families through the API. mistral has no mlx-lm module of its own:
# mlx-lm loads it with llama's.
FLOCK_DECODER_MODULES = {"mistral": "llama"}


def llama() -> Any:
    return _args("llama", **DENSE | dict(head_dim=64, rope_theta=10000.0))


def mistral() -> Any:
    module = importlib.import_module("mlx_lm.models.llama")
    return module.ModelArgs.from_dict({"model_type": "mistral", "vocab_size": VOCAB, **DENSE,
                                       "head_dim": 64, "rope_theta": 10000.0,
                                       "tie_word_embeddings": False})


def qwen2() -> Any:
    return _args("qwen2", **DENSE | dict(rope_theta=10000.0))


def qwen3() -> Any:
    return _args("qwen3", **DENSE | dict(head_dim=64, tie_word_embeddings=True,
                                         rope_theta=10000.0))


FLOCK_DECODER_BUILDERS: dict[str, Callable[[], Any]] = {
    **{f.__name__: f for f in (llama, mistral, qwen2, qwen3)}, **MOE_BUILDERS}


def mlxlm_greedy(model: Any, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """mlx-lm's own greedy generation: the ids and the smallest top-2 logit gap on the way."""
    from mlx_lm.generate import generate_step

    ids, smallest = [], float("inf")
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=tokens):
        top2 = mx.sort(logprobs)[-2:].tolist()
        smallest = min(smallest, top2[1] - top2[0])
        ids.append(int(token))
    return ids, smallest


def make_arch_model(directory: Path, arch: str, tokenizer_dir: Path, *,
                    seeds: range = range(40)) -> tuple[Path, list[int]]:
    """Build, save and return (model dir, mlx-lm's greedy ids for PROMPT). Cached: a directory
    that already holds a finished build is reused."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    done = directory / "flock-expected.json"
    if done.exists():
        return directory, json.loads(done.read_text())["ids"]
    args = (BUILDERS.get(arch) or FLOCK_DECODER_BUILDERS[arch])()
    module = importlib.import_module(
        f"mlx_lm.models.{FLOCK_DECODER_MODULES.get(arch, arch)}")
    for seed in seeds:
        mx.random.seed(seed)
        model = module.Model(args)
        # Default inits leave some tensors (norms at one, biases at zero): perturb everything
        # so each weight matters, at a scale that keeps activations finite.
        params = tree_flatten(model.parameters())
        model.load_weights([(k, v + PERTURB * mx.random.normal(v.shape).astype(v.dtype))
                            for k, v in params if mx.issubdtype(v.dtype, mx.floating)],
                           strict=False)
        mx.eval(model.parameters())
        ids, gap = mlxlm_greedy(model, PROMPT, GREEDY_TOKENS)
        # Special tokens (end of text among them) would end the stream early.
        # Repeating one token would hide position bugs: ask for some variety too.
        if gap > MIN_GAP and not set(ids) & SPECIAL_IDS and len(set(ids)) >= MIN_DISTINCT:
            break
    else:
        raise AssertionError(f"no seed in {seeds} gives {arch} a top-2 gap above {MIN_GAP}")
    if directory.exists():
        shutil.rmtree(directory)
    save_model(directory, model)
    # Unset optional fields stay out: transformers validates config.json when the tokenizer
    # loads, and rejects some of them as None.
    required = {f.name for f in dataclasses.fields(args)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    config = {k: v for k, v in dataclasses.asdict(args).items()
              if v is not None or k in required}
    config["eos_token_id"] = 2
    save_config(config, directory / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    done.write_text(json.dumps({"ids": ids, "seed": seed, "gap": gap}))
    return directory, ids
