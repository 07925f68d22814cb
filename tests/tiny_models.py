"""Tiny random-weight models the tests create: real mlx-lm directories, seconds to build.

A byte-level BPE tokenizer (256 byte tokens plus ChatML specials) keeps them self-contained.
Near-tied random logits make greedy tokens fragile, so tests of these compare logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokenizer() -> Tokenizer:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def make_tiny_model(
    directory: Path,
    *,
    architecture: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_tokenizer()
    vocab = tokenizer.get_vocab_size()
    head_dim = hidden // heads
    mx.random.seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> mx.array:
        return mx.random.normal(shape) * scale

    weights: dict[str, mx.array] = {
        "model.embed_tokens.weight": rand(vocab, hidden, scale=0.5),
        "model.norm.weight": 1.0 + rand(hidden),
    }
    if not tie:
        weights["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
            p + "input_layernorm.weight": 1.0 + rand(hidden),
            p + "post_attention_layernorm.weight": 1.0 + rand(hidden),
        }
        if architecture == "qwen2":
            weights |= {
                p + "self_attn.q_proj.bias": rand(heads * head_dim),
                p + "self_attn.k_proj.bias": rand(kv_heads * head_dim),
                p + "self_attn.v_proj.bias": rand(kv_heads * head_dim),
            }
        if architecture == "qwen3":
            weights |= {
                p + "self_attn.q_norm.weight": 1.0 + rand(head_dim),
                p + "self_attn.k_norm.weight": 1.0 + rand(head_dim),
            }
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    config = {
        "model_type": architecture,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie,
        "eos_token_id": 2,
        "bos_token_id": 1,
    }
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 512,
    }))
    return directory
