"""GGUF -> mlx-lm import: turns a llama-family GGUF file into a directory `mlx_lm.load` reads.

Weights come from MLX's own GGUF reader (Q4_0/Q4_1/Q8_0 arrive as MLX-quantized
weight/scales/biases with 32 weights a group, K-quants and other types as float16, floats as
stored); the tokenizer is rebuilt from the
GGUF vocabulary with the `tokenizers` library so that it splits text the way llama.cpp does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from agent.models import arch as registry
from agent.models import gguf_moe  # mixture-of-experts layouts
from agent.models.files import replace_dir
from agent.models.gguf_header import GGUFImportError, refuse_unkept
from agent.models.gguf_moe import MOE_ARCHS, MoeArch
from agent.models.rope_scaling import llama3_scaling_from_divisors, round_float32

DTYPES = ("float32", "float16", "bfloat16", "keep")
GROUP_SIZE = 32  # every GGUF block type MLX reads natively packs 32 weights per scale
SHARD_BYTES = 5 << 30  # split model*.safetensors past this, as mlx-lm's own converter does

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class _Arch:
    model_type: str  # mlx-lm model_type
    permute_qk: bool  # llama.cpp stored q/k rows in its interleaved rope layout
    needs_qkv_bias: bool = False
    qk_norm: bool = False


# Architectures whose GGUF layout maps onto an mlx-lm model without new code. Mistral-style
# models are written by llama.cpp as "llama".
_ARCHS = {
    "llama": _Arch("llama", permute_qk=True),
    "qwen2": _Arch("qwen2", permute_qk=False, needs_qkv_bias=True),
    "qwen3": _Arch("qwen3", permute_qk=False, qk_norm=True),
}

# llama.cpp tensor names -> mlx-lm (HF) module names.
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def import_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Convert `gguf_path` into an mlx-lm directory at `out_dir` and return `out_dir`.

    dtype: "float32" (fastest on MLX CPU), "float16", "bfloat16", or "keep": Q4_0, Q4_1 and
    Q8_0 tensors stay quantized in mlx-lm's `quantization` layout, as stored (no float round
    trip), and the rest become float16; a file with other quantized types (K-quants) is refused,
    since MLX reads those as float16. The whole GGUF is held in memory while converting.
    The directory appears whole or not at all; an existing `out_dir` is replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "keep":
        refuse_unkept(gguf_path)
    try:
        loaded = mx.load(str(gguf_path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise GGUFImportError(f"cannot read {gguf_path} as GGUF: {e}") from e
    weights, raw_meta = loaded  # type: ignore[misc]
    meta = _Metadata(raw_meta)

    arch_name = meta.text("general.architecture")
    arch: _Arch | MoeArch | None = gguf_moe.moe_arch(meta.get, arch_name, weights)
    arch = arch or _ARCHS.get(arch_name)
    if arch is None:
        raise GGUFImportError(
            f"unsupported GGUF architecture {arch_name!r} in {gguf_path.name}: flock imports "
            f"GGUF files of {', '.join(sorted(_ARCHS))} and the mixture-of-experts "
            f"{', '.join(sorted(MOE_ARCHS))} and mixtral (as llama); "
            f"{registry.supported_summary()}"
        )
    config = _model_config(meta, arch_name, arch, weights)
    if isinstance(arch, MoeArch):
        weights = gguf_moe.stack_legacy_experts(weights)
        config.update(gguf_moe.moe_config(meta.get, arch_name, arch, config))
    tensors, quant_bits = _convert_tensors(weights, config, arch, dtype)
    if quant_bits:
        config["quantization"] = _quantization_entry(quant_bits)
    tokenizer, tokenizer_config, special = _build_tokenizer(meta)
    special = {k: v for k, v in special.items() if v is not None}
    config.update(special)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]

    with _atomic_dir(out_dir) as tmp:
        _save_weights(tmp, tensors)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", special)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", _special_tokens_map(tokenizer_config))
        tokenizer.save(str(tmp / "tokenizer.json"))
    return out_dir


# --- metadata -------------------------------------------------------------------------------


class _Metadata:
    """GGUF key/values as plain Python values (MLX hands scalars back as 0-d arrays)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw

    def get(self, key: str, default: Any = None) -> Any:
        value = self._raw.get(key)
        if value is None:
            return default
        if isinstance(value, mx.array):
            return value.item() if value.ndim == 0 else value.tolist()
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"GGUF metadata lacks {key!r}")
        return value

    def text(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, str):
            raise GGUFImportError(f"GGUF metadata {key!r} is not a string")
        return value


def _uniform(value: Any, key: str) -> Any:
    """Some GGUFs store a per-layer list where all layers agree; mlx-lm wants one value."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise GGUFImportError(f"per-layer {key} values differ; not supported")
        return value[0]
    return value


def _model_config(
    meta: _Metadata, name: str, arch: _Arch | MoeArch, weights: dict[str, mx.array]
) -> dict:
    if "token_embd.weight" not in weights:
        raise GGUFImportError("GGUF has no token_embd.weight tensor")
    hidden = int(meta.require(f"{name}.embedding_length"))
    n_heads = int(_uniform(meta.require(f"{name}.attention.head_count"), "head_count"))
    n_kv_heads = int(_uniform(meta.get(f"{name}.attention.head_count_kv", n_heads), "kv heads"))
    head_dim = int(meta.get(f"{name}.attention.key_length", hidden // n_heads))
    if int(meta.get(f"{name}.attention.value_length", head_dim)) != head_dim:
        raise GGUFImportError("different key and value head sizes are not supported")
    if int(meta.get(f"{name}.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError("partial rotary embeddings (rope.dimension_count < head dim)")
    if arch.model_type == "qwen2" and head_dim * n_heads != hidden:
        raise GGUFImportError("qwen2 with head_dim * heads != hidden size is not supported")
    rope_theta = float(meta.get(f"{name}.rope.freq_base", 10000.0))
    context = int(meta.get(f"{name}.context_length", 2048))
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS.get(arch.model_type)],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(meta.require(f"{name}.block_count")),
        "intermediate_size": int(_uniform(meta.require(f"{name}.feed_forward_length"), "ffn")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": round_float32(
            float(meta.get(f"{name}.attention.layer_norm_rms_epsilon", 1e-5))
        ),
        "rope_theta": round_float32(rope_theta),
        "vocab_size": int(weights["token_embd.weight"].shape[0]),
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in weights,
    }
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in weights
        config["mlp_bias"] = "blk.0.ffn_up.bias" in weights
    rope_scaling = _rope_scaling(meta, name, weights, head_dim, rope_theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_scaling(
    meta: _Metadata, name: str, weights: dict[str, mx.array], head_dim: int, theta: float
) -> dict | None:
    kind = meta.get(f"{name}.rope.scaling.type")
    factor = meta.get(f"{name}.rope.scaling.factor")
    if "rope_freqs.weight" in weights:
        # Llama 3.1+: llama.cpp bakes the llama3 scaling into per-frequency divisors and drops
        # its parameters, so recover them by matching against the known parameterisations.
        divisors = weights["rope_freqs.weight"].astype(mx.float32).tolist()
        return llama3_scaling_from_divisors(divisors, head_dim, theta)
    if kind in (None, "none") or factor in (None, 0.0, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = meta.get(f"{name}.rope.scaling.original_context_length")
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise GGUFImportError(f"unsupported rope scaling type {kind!r}")


# --- tensors --------------------------------------------------------------------------------


def _hf_module(gguf_module: str, moe_roles: dict[str, str]) -> str:
    if gguf_module in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_module]
    parts = gguf_module.split(".")
    role = _PER_LAYER.get(parts[-1]) or moe_roles.get(parts[-1])
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and role is not None:
        return f"model.layers.{parts[1]}.{role}"
    raise GGUFImportError(f"unsupported GGUF tensor {gguf_module!r} (another architecture "
                          "variant?)")


def _unpermute_rows(n_rows: int, n_heads: int) -> mx.array:
    """Row order that undoes llama.cpp's `permute(w, n_head)` for q/k projections.

    llama.cpp rotates adjacent pairs (rows 2j, 2j+1 of a head); HF/mlx-lm rotate halves
    (rows j, j + head_dim/2). Gathering rows works for float and packed quantized rows alike.
    """
    head_dim = n_rows // n_heads
    if head_dim * n_heads != n_rows or head_dim % 2:
        raise GGUFImportError(f"cannot split {n_rows} q/k rows into {n_heads} heads")
    idx = mx.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2)
    return idx.reshape(-1)


def _convert_tensors(
    weights: dict[str, mx.array], config: dict, arch: _Arch | MoeArch, dtype: str
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """HF-named tensors in the target dtype, and the bits of each module left quantized."""
    target = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16,
              "keep": mx.float16}[dtype]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out: dict[str, mx.array] = {}
    quant_bits: dict[str, int] = {}
    for name in weights:
        if name == "rope_freqs.weight" or name.endswith((".scales", ".biases")):
            continue  # consumed by the config / by their .weight
        module, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            raise GGUFImportError(f"unsupported GGUF tensor {name!r}")
        hf = _hf_module(module, arch.roles if isinstance(arch, MoeArch) else {})
        role = module.rpartition(".")[2]
        perm = None
        if arch.permute_qk and role in heads:
            perm = _unpermute_rows(weights[name].shape[0], heads[role])
        scales = weights.get(f"{module}.scales")
        if kind == "weight" and scales is not None:
            w, biases = weights[name], weights[f"{module}.biases"]
            bits = w.shape[-1] // scales.shape[-1]
            if perm is not None:
                w, scales, biases = w[perm], scales[perm], biases[perm]
            if dtype == "keep":
                out[f"{hf}.weight"], out[f"{hf}.scales"], out[f"{hf}.biases"] = w, scales, biases
                quant_bits[hf] = bits
                continue
            # Dequantize in float32 so a float32 import carries no float16 rounding.
            tensor = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                   group_size=GROUP_SIZE, bits=bits)
        else:
            tensor = weights[name] if perm is None else weights[name][perm]
        if not mx.issubdtype(tensor.dtype, mx.floating):
            raise GGUFImportError(f"tensor {name!r} has unsupported type {tensor.dtype}")
        out[f"{hf}.{kind}"] = tensor.astype(target)
    _check_complete(out, config, arch)
    if isinstance(arch, MoeArch):
        out = gguf_moe.finish_moe(out, config, arch)
    return out, quant_bits


def _check_complete(tensors: dict[str, mx.array], config: dict, arch: _Arch | MoeArch) -> None:
    required = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    if not isinstance(arch, MoeArch):  # an MoE layer's MLP is checked by finish_moe
        required += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if arch.qk_norm:
        required += ["self_attn.q_norm", "self_attn.k_norm"]
    missing = [f"model.layers.{i}.{m}.weight" for i in range(config["num_hidden_layers"])
               for m in required if f"model.layers.{i}.{m}.weight" not in tensors]
    if arch.needs_qkv_bias:
        biases = [f"model.layers.{i}.self_attn.{p}.bias" for i in range(config["num_hidden_layers"])
                  for p in ("q_proj", "k_proj", "v_proj")]
        missing += [b for b in biases if b not in tensors]
    if "model.norm.weight" not in tensors:
        missing.append("model.norm.weight")
    if missing:
        raise GGUFImportError(f"GGUF lacks tensors for {', '.join(missing[:4])}"
                              + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))


def _quantization_entry(quant_bits: dict[str, int]) -> dict[str, Any]:
    """mlx-lm's `quantization` config: the common bit width, plus the modules that differ."""
    common = Counter(quant_bits.values()).most_common(1)[0][0]
    entry: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common}
    for module, bits in sorted(quant_bits.items()):
        if bits != common:
            entry[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return entry


def _save_weights(directory: Path, tensors: dict[str, mx.array]) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], {"format": "mlx"})
        return
    index: dict[str, Any] = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                             "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / file), shard, {"format": "mlx"})
        index["weight_map"].update(dict.fromkeys(shard, file))
    _write_json(directory / "model.safetensors.index.json", index)


# --- tokenizer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token found in the vocab skips BPE (llama3)
    add_bos: bool = False  # llama.cpp's default when the GGUF does not say
    clean_spaces: bool = True


_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_LLAMA3 = _PreTokenizer((_LLAMA3_RE,), ignore_merges=True, add_bos=True)
_GPT2 = _PreTokenizer((_GPT2_RE,))
_DIGITS_GPT2 = _PreTokenizer((r"\p{N}", _GPT2_RE))
_QWEN2 = _PreTokenizer((_QWEN2_RE,), clean_spaces=False)

# `tokenizer.ggml.pre` -> the regex splits llama.cpp applies before BPE (src/llama-vocab.cpp).
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3_RE,))),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _GPT2),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(("smollm", "command-r", "exaone"),
                    _PreTokenizer((r"\p{N}", _GPT2_RE), clean_spaces=False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "stablelm2": _PreTokenizer((_QWEN2_RE,)),
    "falcon": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]")),
    "tekken": _PreTokenizer((_TEKKEN_RE,), ignore_merges=True, add_bos=True, clean_spaces=False),
}


def _build_tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """The tokenizer, its tokenizer_config.json, and the special ids config.json carries."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFImportError("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        pre_name = meta.get("tokenizer.ggml.pre") or "default"
        rules = _PRE_TOKENIZERS.get(pre_name)
        if rules is None:
            known = ", ".join(sorted(_PRE_TOKENIZERS))
            raise GGUFImportError(f"unsupported pre-tokenizer {pre_name!r}; known: {known}")
        tokenizer = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], rules)
        add_bos_default, clean_spaces = rules.add_bos, rules.clean_spaces
    elif kind == "llama":
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer = _sentencepiece_bpe(tokens, meta.get("tokenizer.ggml.scores"), types,
                                       meta.get("tokenizer.ggml.unknown_token_id"),
                                       add_space_prefix)
        add_bos_default, clean_spaces = True, False
    else:
        raise GGUFImportError(f"unsupported tokenizer model {kind!r}; flock reads 'gpt2' "
                              "(byte-level BPE) and 'llama' (SentencePiece) vocabularies")

    added = _add_special_tokens(tokenizer, tokens, types)

    def token(key: str) -> tuple[int | None, str | None]:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is None or not 0 <= int(tid) < len(tokens):
            return None, None
        return int(tid), tokens[int(tid)]

    bos_id, bos = token("bos")
    eos_id, eos = token("eos")
    _, unk = token("unknown")
    pad_id, pad = token("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    tokenizer.post_processor = _post_processor(kind, bos if add_bos else None, bos_id,
                                               eos if add_eos else None, eos_id)
    # Chat models often end a turn with a token other than eos (llama3 <|eot_id|>): stop on all.
    stop_ids = [t for t in (eos_id, token("eot")[0], token("eom")[0]) if t is not None]
    stop_ids = list(dict.fromkeys(stop_ids))

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": clean_spaces,
        "added_tokens_decoder": added,
    }
    template = _chat_template(meta)
    if template is not None:
        tokenizer_config["chat_template"] = template
    special = {
        "bos_token_id": bos_id,
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None),
        "pad_token_id": pad_id,
    }
    return tokenizer, tokenizer_config, special


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp's lookup does
    return vocab


def _byte_level_bpe(tokens: list[str], merges: list[str], rules: _PreTokenizer) -> Tokenizer:
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFImportError(f"malformed BPE merge {m!r}")
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs,
                                     ignore_merges=rules.ignore_merges, byte_fallback=False))
    # llama.cpp splits with each regex in turn, keeping matches and the text between them;
    # "isolated" Splits in sequence do the same. ByteLevel then only maps bytes to symbols.
    splits = [pre.Split(Regex(r), behavior="isolated", invert=False) for r in rules.regexes]
    tokenizer.pre_tokenizer = pre.Sequence(
        [*splits, pre.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, types: list[int], unk_id: int | None,
    add_space_prefix: bool,
) -> Tokenizer:
    """llama.cpp's SPM tokenizer as a byte-fallback BPE (what HF's LlamaTokenizerFast is).

    llama.cpp merges the adjacent pair whose joined piece has the highest score; a BPE whose
    merges are ranked by that score reproduces it.
    """
    if scores is None or len(scores) != len(tokens):
        raise GGUFImportError("SentencePiece vocabulary without tokenizer.ggml.scores")
    vocab = _vocab(tokens)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (_NORMAL, _USER_DEFINED, _UNUSED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[pid], mergeable[left], mergeable[right], left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(r[3], r[4]) for r in ranked],
                                     unk_token=unk, fuse_unk=True, byte_fallback=True))
    # The legacy Llama normalizer: llama.cpp also prefixes a space after every special token.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> dict:
    """Register control and user-defined tokens as added tokens (matched whole, never split).

    Returns tokenizer_config's `added_tokens_decoder`.
    """
    decoder: dict[str, dict[str, Any]] = {}
    control, user = [], []
    for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (_CONTROL, _USER_DEFINED, _UNKNOWN) or not text:
            continue
        special = kind != _USER_DEFINED
        (control if special else user).append(AddedToken(text, special=special, normalized=False))
        decoder[str(i)] = {"content": text, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": special}
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)
    return decoder


def _post_processor(
    kind: str, bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> Any:
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if kind == "gpt2" else None
    first = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = first + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    specials = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    return processors.TemplateProcessing(single=" ".join(first), pair=" ".join(pair),
                                         special_tokens=list(dict.fromkeys(specials)))


def _chat_template(meta: _Metadata) -> str | list[dict[str, str]] | None:
    default = meta.get("tokenizer.chat_template")
    names = meta.get("tokenizer.chat_templates") or []
    named = [{"name": n, "template": meta.get(f"tokenizer.chat_template.{n}")} for n in names]
    named = [t for t in named if isinstance(t["template"], str)]
    if not named:
        return default
    # tokenizer_config's list form carries extra templates (e.g. "tool_use") by name.
    return ([{"name": "default", "template": default}] if default else []) + named


def _special_tokens_map(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    keys = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {k: tokenizer_config[k] for k in keys if tokenizer_config.get(k) is not None}


# --- files ----------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A temp dir next to `out_dir` that becomes `out_dir` only if the block succeeds."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; a model directory is ordinary data
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    # A crash right after the rename must not leave a complete-looking model with empty files.
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())

