"""GGUF import of mixture-of-experts models: the tiny random qwen3_moe, qwen2_moe and mixtral
models of tests/tiny_archs.py, written as GGUF files in llama.cpp's layout (stacked `*_exps`
experts, `ffn_gate_inp` routers, qwen2moe's shared expert, mixtral as arch `llama`), import to
directories whose greedy ids and logits equal the source model's on mlx-lm and on flock's own
decoder; Q4_1 (and Q8_0) experts stay quantized with `--dtype keep`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import load_model
from tokenizers import Tokenizer

from agent.models.gguf import GGUFImportError, import_gguf
from agent.runtime.model import Quantized, SparseMoe, load_decoder
from agent.runtime.runner import choose_engine
from tests.test_decoder import flock_logits, reference_logits
from tests.test_gguf_import import bpe_metadata, llama_cpp_permute, model_metadata
from tests.test_mlxlm_engine import arch_dir
from tests.tiny_archs import GREEDY_TOKENS, MOE_BUILDERS, PROMPT, mlxlm_greedy

FAMILIES = sorted(MOE_BUILDERS)
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
# mlx-lm module names -> llama.cpp's, stated independently of the importer's tables.
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    **{f"{block}.switch_mlp.{p}_proj": f"ffn_{p}_exps" for block in ("mlp", "block_sparse_moe")
       for p in ("gate", "up", "down")},
    **{f"mlp.shared_expert.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")},
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
             "lm_head": "output"}
ATOL = 2e-4  # float32 flock decoder vs mlx-lm (tests/test_moe.py)


def gguf_tensors(weights: dict[str, mx.array], config: dict, family: str) -> dict[str, mx.array]:
    """The model's tensors under llama.cpp's names and layout."""
    out = {}
    for name, w in weights.items():
        module, kind = name.rsplit(".", 1)
        if module in TOP_NAMES:
            out[f"{TOP_NAMES[module]}.{kind}"] = w
            continue
        _, _, layer, role = module.split(".", 3)
        if family == "mixtral" and role in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config["num_attention_heads" if role.endswith("q_proj")
                           else "num_key_value_heads"]
            w = llama_cpp_permute(w, heads)
        if role == "mlp.shared_expert_gate":
            w = w.reshape(-1)  # llama.cpp's loader takes the (1, hidden) gate as {n_embd}
        out[f"blk.{layer}.{LAYER_NAMES[role]}.{kind}"] = w
    return out


def gguf_metadata(config: dict, family: str, tok: Tokenizer) -> dict[str, Any]:
    arch = GGUF_ARCH[family]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dims = {"max_position_embeddings": 2048, **config}
    meta = {**model_metadata(arch, dims, head_dim), **bpe_metadata(tok, "smollm"),
            f"{arch}.expert_count": u32(config.get("num_experts")
                                         or config.get("num_local_experts")),
            f"{arch}.expert_used_count": u32(config["num_experts_per_tok"])}
    if family != "mixtral":
        meta[f"{arch}.expert_feed_forward_length"] = u32(config["moe_intermediate_size"])
    if family == "qwen2_moe":
        meta[f"{arch}.expert_shared_feed_forward_length"] = u32(
            config["shared_expert_intermediate_size"])
    return meta


def write_gguf(path: Path, tensors: dict[str, mx.array], metadata: dict[str, Any], *,
               quantize: bool, q8_0: str = "") -> None:
    """A GGUF v3 file, F32 tensors or (quantize) weights in llama.cpp's Q4_1 blocks.

    Matrices and expert stacks go to Q4_1 (Q8_0 where the name contains `q8_0`, if given),
    routers stay F32 as llama.cpp's converter keeps them.
    mx.save_gguf writes no quantized types, so the container is written here.
    """
    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    def value(v: Any) -> bytes:
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        if isinstance(v, list):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(string(s) for s in v)
        code, fmt = {"mlx.core.uint32": (4, "I"), "mlx.core.int32": (5, "i"),
                     "mlx.core.float32": (6, "f"), "mlx.core.bool": (7, "?")}[str(v.dtype)]
        if v.ndim == 0:
            return struct.pack(f"<I{fmt}", code, v.item())
        items = v.tolist()
        return struct.pack(f"<IIQ{len(items)}{fmt}", 9, code, len(items), *items)

    blobs, infos, offset = [], [], 0
    for name, w in tensors.items():
        if quantize and q8_0 and q8_0 in name:
            # Q8_0: a float16 scale and 32 int8 values a block, symmetric.
            x = np.array(w.astype(mx.float32)).reshape(-1, 32)
            d = (np.abs(x).max(axis=1, keepdims=True) / 127).astype(np.float16)
            q = np.round(x / np.where(d == 0, 1, d)).clip(-127, 127).astype(np.int8)
            blob = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1).tobytes()
            kind = 8
        elif quantize and w.ndim >= 2 and "gate_inp" not in name:
            # Q4_1 is MLX's affine 4-bit over blocks of 32: value = q * scale + min.
            wq, scales, biases = mx.quantize(w.astype(mx.float16), group_size=32, bits=4)
            q = np.array((wq[..., None] >> (mx.arange(8, dtype=mx.uint32) * 4)) & 0xF,
                         dtype=np.uint8).reshape(-1, 32)
            packed = q[:, :16] | (q[:, 16:] << 4)
            blob = np.concatenate([
                np.array(scales, dtype=np.float16).reshape(-1, 1).view(np.uint8),
                np.array(biases, dtype=np.float16).reshape(-1, 1).view(np.uint8), packed],
                axis=1).tobytes()
            kind = 3
        else:
            blob, kind = np.array(w.astype(mx.float32)).tobytes(), 0
        dims = list(reversed(w.shape))
        infos.append(string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind,
                                                offset))
        blob += b"\0" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(string(k) + value(v) for k, v in metadata.items()) + b"".join(infos)
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"".join(blobs))


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def family_gguf(tmp_path: Path, family: str, smollm2_dir: Path, tok: Tokenizer, *,
                quantize: bool = False, q8_0: str = "", legacy: bool = False
                ) -> tuple[Path, Path, list[int]]:
    """(GGUF path, source mlx-lm directory, mlx-lm's greedy ids for PROMPT)."""
    source, ids = arch_dir(family, smollm2_dir)
    config = json.loads((source / "config.json").read_text())
    tensors = gguf_tensors(mx.load(str(source / "model.safetensors")), config, family)
    if legacy:  # llama.cpp before stacked experts: one tensor per expert
        for name in [n for n in tensors if "_exps." in n]:
            stacked = tensors.pop(name)
            for e in range(stacked.shape[0]):
                tensors[name.replace("_exps.", f".{e}.")] = stacked[e]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, tensors, gguf_metadata(config, family, tok), quantize=quantize,
               q8_0=q8_0)
    return path, source, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_gguf_imports_with_the_source_models_greedy_ids_and_logits(
    tmp_path: Path, family: str, smollm2_dir: Path, smollm2_tok: Tokenizer
) -> None:
    path, source, ids = family_gguf(tmp_path, family, smollm2_dir, smollm2_tok,
                                    legacy=family == "mixtral")
    out = import_gguf(path, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "quantization" not in config
    assert choose_engine(config) == "flock"
    imported, _ = load_model(out)
    assert mlxlm_greedy(imported, PROMPT, GREEDY_TOKENS)[0] == ids
    want = reference_logits(source, PROMPT, ids[:8])
    for a, b in zip(want, reference_logits(out, PROMPT, ids[:8]), strict=True):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()
    dec = load_decoder(out)
    assert all(isinstance(layer.mlp, SparseMoe) for layer in dec.layers)
    got = flock_logits(out, PROMPT, ids[:8], fuse=True, compiled=False)
    for a, b in zip(want, got, strict=True):
        assert mx.allclose(a, b, atol=ATOL).item()
    assert [int(mx.argmax(x)) for x in got] == ids[:9]


@pytest.mark.parametrize(("family", "q8_0"), [(f, "") for f in FAMILIES]
                         + [("qwen3_moe", "ffn_down_exps")])
def test_quantized_experts_stay_quantized_with_keep(
    tmp_path: Path, family: str, q8_0: str, smollm2_dir: Path, smollm2_tok: Tokenizer
) -> None:
    path, _, _ = family_gguf(tmp_path, family, smollm2_dir, smollm2_tok, quantize=True,
                             q8_0=q8_0)
    kept = import_gguf(path, tmp_path / "keep", dtype="keep")
    config = json.loads((kept / "config.json").read_text())
    layers = range(config["num_hidden_layers"])
    # Q8_0 down projections are the modules that differ from the common 4 bits.
    assert config["quantization"] == {"group_size": 32, "bits": 4} | (
        {f"model.layers.{i}.mlp.switch_mlp.down_proj": {"group_size": 32, "bits": 8}
         for i in layers} if q8_0 else {})
    stored = mx.load(str(kept / "model.safetensors"))
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    experts = stored[f"model.layers.0.{block}.switch_mlp.up_proj.weight"]
    assert experts.dtype == mx.uint32 and experts.shape[0] == config.get(
        "num_experts", config.get("num_local_experts"))
    mlxlm, _ = load_model(kept)
    assert isinstance(getattr(mlxlm.layers[0], block).switch_mlp.up_proj, QuantizedSwitchLinear)
    dec = load_decoder(kept, dtype=None)
    assert isinstance(dec.layers[0].mlp.gate_up.gate_up, Quantized)
    assert dec.layers[0].mlp.gate_up.gate_up.bits == 4
    # mlx-lm on the same quantized weights, computing in float32 as flock's decoder does.
    mlxlm.set_dtype(mx.float32)
    want_ids = mlxlm_greedy(mlxlm, PROMPT, 8)[0]
    cache = make_prompt_cache(mlxlm)
    want = [mlxlm(mx.array([PROMPT]), cache=cache)[0, -1]]
    want += [mlxlm(mx.array([[t]]), cache=cache)[0, -1] for t in want_ids[:7]]
    got = flock_logits(kept, PROMPT, want_ids[:7], fuse=True, compiled=False)
    for a, b in zip(want, got, strict=True):
        assert mx.allclose(a, b, atol=1e-3).item()
    assert [int(mx.argmax(x)) for x in got] == want_ids


def test_experts_in_an_unsupported_architecture_are_refused(
    tmp_path: Path, smollm2_dir: Path, smollm2_tok: Tokenizer
) -> None:
    path, _, _ = family_gguf(tmp_path, "qwen3_moe", smollm2_dir, smollm2_tok)
    text = path.read_bytes().replace(b"qwen3moe", b"qwen3xxx")  # same length: offsets hold
    path.write_bytes(text)
    with pytest.raises(GGUFImportError, match="qwen3xxx"):
        import_gguf(path, tmp_path / "model")
    assert not (tmp_path / "model").exists()
