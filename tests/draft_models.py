"""Draft models the tests build: a tiny random llama with SmolLM2's vocabulary and tokenizer
files (so it may draft for SmolLM2), and copies of it whose tokenizer differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def make_smollm2_draft(smollm2_dir: Path, directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random llama with SmolLM2's vocabulary size, special token ids and
    tokenizer files: it drafts badly (random weights) but in SmolLM2's ids."""
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    target = json.loads((smollm2_dir / "config.json").read_text())
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "vocab_size": target["vocab_size"],
        "max_position_embeddings": target.get("max_position_embeddings", 8192),
        "bos_token_id": target.get("bos_token_id"), "eos_token_id": target.get("eos_token_id"),
        "pad_token_id": target.get("pad_token_id"),
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, directory / name)
    return directory


def with_swapped_tokens(draft_dir: Path, directory: Path) -> Path:
    """A copy of `draft_dir` whose vocabulary swaps two tokens' ids (same size, other ids)."""
    shutil.copytree(draft_dir, directory, dirs_exist_ok=True)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.__getitem__)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def with_other_eos(draft_dir: Path, directory: Path) -> Path:
    """A copy of `draft_dir` whose end-of-sequence token is another id."""
    shutil.copytree(draft_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"eos_token_id": 0}))
    return directory
