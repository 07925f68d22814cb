"""GGUF import: tiny random GGUFs checked against mlx-lm reference models, then the real SmolLM2."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.utils import load_model
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from agent.models.gguf import GGUFImportError, import_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "hello world, the quick brown fox jumps over the lazy dog 1234567890",
    "café naïve déjà vu — Grüße aus München! 東京 😀",
    "def f(x):\n    return x * 2\n\n\tindented   spaces",
]
TEXTS = [
    "What is the capital of France?",
    "  leading and   inner   spaces ",
    "numbers 12345 and 3.14159",
    "unicode: café, 東京, 😀, Ünïcødé",
    "line one\nline two\r\n\ttab",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "it's we've they'll I'd",
    "",
]
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
}
IDS = mx.array([[1, 5, 77, 120, 33, 250, 9, 14, 200, 61]])

# HF module names -> llama.cpp's, stated independently of the importer's own table.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# --- building GGUFs the way llama.cpp's converter does --------------------------------------


def trained_bpe(pre_tokenizer: Any) -> Tokenizer:
    """A small byte-level BPE, the reference the imported tokenizer must agree with."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def bpe_metadata(tok: Tokenizer, pre: str) -> dict[str, Any]:
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(0, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def model_metadata(arch: str, args: dict[str, Any], head_dim: int) -> dict[str, Any]:
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    f32 = lambda v: mx.array(v, dtype=mx.float32)  # noqa: E731
    return {
        "general.architecture": arch,
        f"{arch}.block_count": u32(args["num_hidden_layers"]),
        f"{arch}.embedding_length": u32(args["hidden_size"]),
        f"{arch}.feed_forward_length": u32(args["intermediate_size"]),
        f"{arch}.attention.head_count": u32(args["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(args["num_key_value_heads"]),
        f"{arch}.attention.key_length": u32(head_dim),
        f"{arch}.attention.value_length": u32(head_dim),
        f"{arch}.attention.layer_norm_rms_epsilon": f32(args["rms_norm_eps"]),
        f"{arch}.rope.freq_base": f32(args["rope_theta"]),
        f"{arch}.rope.dimension_count": u32(head_dim),
        f"{arch}.context_length": u32(args["max_position_embeddings"]),
    }


def llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (q/k rows to its rope layout)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def reference_model(arch: str, vocab_size: int, seed: int = 0, **extra: Any) -> nn.Module:
    """An mlx-lm model with every parameter random (norms too, so a mix-up shows)."""
    module = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}[arch]
    args = {**TINY, "model_type": arch, "vocab_size": vocab_size, "tie_word_embeddings": False,
            "head_dim": 16, **extra}
    if arch == "qwen2":
        args.pop("head_dim")
    model = module.Model(module.ModelArgs.from_dict(args))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.2, model.parameters()))
    mx.eval(model.parameters())
    return model


def gguf_tensors(model: nn.Module, arch: str) -> dict[str, mx.array]:
    n_heads, n_kv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    out = {}
    for name, w in tree_flatten(model.parameters()):
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                w = llama_cpp_permute(w, n_heads if module.endswith("q_proj") else n_kv)
            out[f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"] = w
    return out


def write_tiny_gguf(path: Path, arch: str, tok: Tokenizer, pre: str = "gpt-2",
                    **extra: Any) -> nn.Module:
    model = reference_model(arch, tok.get_vocab_size(), **extra)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"] if arch == "qwen2" else 16
    metadata = {**model_metadata(arch, TINY, head_dim), **bpe_metadata(tok, pre)}
    mx.save_gguf(str(path), gguf_tensors(model, arch), metadata)
    return model


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))


def logits(model: nn.Module) -> mx.array:
    out = model(IDS)
    mx.eval(out)
    return out


# --- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_imported_model_reproduces_reference_logits(
    tmp_path: Path, gpt2_tok: Tokenizer, arch: str
) -> None:
    reference = write_tiny_gguf(tmp_path / "m.gguf", arch, gpt2_tok)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    imported, config = load_model(out)
    assert config["model_type"] == arch
    assert mx.allclose(logits(imported), logits(reference), atol=1e-5, rtol=1e-5)


def test_import_undoes_llama_cpp_rope_permutation(tmp_path: Path, gpt2_tok: Tokenizer) -> None:
    reference = write_tiny_gguf(tmp_path / "m.gguf", "llama", gpt2_tok)
    imported, _ = load_model(import_gguf(tmp_path / "m.gguf", tmp_path / "model"))
    for layer_ref, layer_imp in zip(reference.model.layers, imported.model.layers, strict=True):
        assert mx.array_equal(layer_imp.self_attn.q_proj.weight, layer_ref.self_attn.q_proj.weight)
        assert mx.array_equal(layer_imp.self_attn.k_proj.weight, layer_ref.self_attn.k_proj.weight)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(
    tmp_path: Path, gpt2_tok: Tokenizer
) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    reference = reference_model("llama", gpt2_tok.get_vocab_size(), rope_scaling=scaling)
    # What llama.cpp's converter writes instead of the parameters: one divisor per frequency.
    divisors = []
    for i in range(0, 16, 2):
        wavelen = 2 * math.pi * 10000.0 ** (i / 16)
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        divisors.append(1.0 if wavelen < 8192 / 4.0 else 8.0 if wavelen > 8192 / 1.0
                        else 1 / ((1 - smooth) / 8.0 + smooth))
    assert 1.0 < divisors[-2] < 8.0  # the tiny head still has a frequency in the smooth band
    tensors = {**gguf_tensors(reference, "llama"), "rope_freqs.weight": mx.array(divisors)}
    metadata = {**model_metadata("llama", TINY, 16), **bpe_metadata(gpt2_tok, "gpt-2")}
    mx.save_gguf(str(tmp_path / "m.gguf"), tensors, metadata)
    imported, config = load_model(import_gguf(tmp_path / "m.gguf", tmp_path / "model"))
    assert config["rope_scaling"] == scaling
    assert mx.allclose(logits(imported), logits(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_import_stores_half_weights(
    tmp_path: Path, gpt2_tok: Tokenizer, dtype: str
) -> None:
    reference = write_tiny_gguf(tmp_path / "m.gguf", "llama", gpt2_tok)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model", dtype=dtype)
    stored = mx.load(str(out / "model.safetensors"))
    assert {str(w.dtype) for w in stored.values()} == {f"mlx.core.{dtype}"}
    imported, _ = load_model(out)
    # Rounding to 8 (bfloat16) or 11 (float16) significant bits: ~1e-2 at most on logits ~1.
    assert mx.allclose(logits(imported).astype(mx.float32), logits(reference), atol=0.05)


def test_unknown_dtype_is_refused(tmp_path: Path, gpt2_tok: Tokenizer) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", "llama", gpt2_tok)
    with pytest.raises(GGUFImportError, match="dtype"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "model", dtype="int8")
    assert not (tmp_path / "model").exists()


# --- quantized GGUFs --------------------------------------------------------------------------


QuantizedTensor = tuple[mx.array, mx.array, mx.array]  # MLX 4-bit weight, scales, biases


def write_gguf_q4_1(path: Path, tensors: dict[str, mx.array | QuantizedTensor],
                    metadata: dict[str, Any]) -> None:
    """A GGUF v3 file with MLX-quantized tensors in llama.cpp's Q4_1 blocks, the rest F32.

    mx.save_gguf writes no quantized types, so this writes the container by hand.
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
        if isinstance(w, tuple):
            # Q4_1 is MLX's affine 4-bit: value = q * scale + bias over blocks of 32.
            wq, scales, biases = w
            q = (wq[..., None] >> (mx.arange(8, dtype=mx.uint32) * 4)) & 0xF
            q = q.reshape(wq.shape[0], -1, 32).astype(mx.uint8)
            shape = (wq.shape[0], wq.shape[1] * 8)
            packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(-1, 16)
            blob = b"".join(
                struct.pack("<ee", s, b) + bytes(p)
                for s, b, p in zip(scales.reshape(-1).tolist(), biases.reshape(-1).tolist(),
                                   packed.tolist(), strict=True)
            )
            kind = 3
        else:
            blob, kind, shape = bytes(memoryview(w.astype(mx.float32))), 0, w.shape
        dims = list(reversed(shape))
        info = struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
        infos.append(string(name) + info)
        blob += b"\0" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(string(k) + value(v) for k, v in metadata.items()) + b"".join(infos)
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"".join(blobs))


def test_q4_1_gguf_dequantizes_or_stays_quantized(tmp_path: Path, gpt2_tok: Tokenizer) -> None:
    reference = reference_model("llama", gpt2_tok.get_vocab_size())
    tensors: dict[str, Any] = gguf_tensors(reference, "llama")
    deq = dict(tensors)
    for name, w in tensors.items():
        if w.ndim == 2:
            wq, scales, biases = mx.quantize(w.astype(mx.float16), group_size=32, bits=4)
            tensors[name] = (wq, scales, biases)
            # What llama.cpp computes with: the block values, exactly.
            deq[name] = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32),
                                      group_size=32, bits=4)
    metadata = {**model_metadata("llama", TINY, 16), **bpe_metadata(gpt2_tok, "gpt-2")}
    write_gguf_q4_1(tmp_path / "q.gguf", tensors, metadata)
    mx.save_gguf(str(tmp_path / "deq.gguf"), deq, metadata)

    expected, _ = load_model(import_gguf(tmp_path / "deq.gguf", tmp_path / "deq"))
    as_float, _ = load_model(import_gguf(tmp_path / "q.gguf", tmp_path / "f32"))
    assert mx.allclose(logits(as_float), logits(expected), atol=1e-4, rtol=1e-4)

    kept = import_gguf(tmp_path / "q.gguf", tmp_path / "keep", dtype="keep")
    config = json.loads((kept / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    as_quant, _ = load_model(kept)
    assert isinstance(as_quant.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    # float16 compute: ~3e-3 off here; a mis-ordered row would be off by ~logit size (~1).
    assert mx.allclose(logits(as_quant).astype(mx.float32), logits(expected), atol=0.03)
    assert (kept / "model.safetensors").stat().st_size < (tmp_path / "f32" / "model.safetensors"
                                                         ).stat().st_size / 4


# --- tokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pre", "reference_pre"),
    [
        ("gpt-2", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
        ("smollm", pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])),
    ],
)
def test_byte_level_tokenizer_encodes_like_the_original(
    tmp_path: Path, pre: str, reference_pre: Any
) -> None:
    reference = trained_bpe(reference_pre)
    write_tiny_gguf(tmp_path / "m.gguf", "llama", reference, pre=pre)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    imported = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        expected = reference.encode(text).ids
        assert imported.encode(text).ids == expected, text
        assert hf.encode(text) == expected, text
        assert hf.decode(expected) == text


def test_chat_template_and_special_tokens_survive_import(
    tmp_path: Path, gpt2_tok: Tokenizer
) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", "llama", gpt2_tok)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    hf = AutoTokenizer.from_pretrained(str(out))
    ids = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    im_start, im_end = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert hf.decode(ids, skip_special_tokens=True) == "user\nHi\nassistant\n"
    assert (hf.bos_token, hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def spm_vocab(pieces: list[str]) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))  # distinct scores, as SentencePiece BPE vocabularies have
    return tokens, scores, types


def llama_cpp_spm_encode(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SPM tokenizer: merge the best-scoring adjacent pair, leftmost on ties."""
    if not text:
        return []  # llama.cpp tokenizes no fragment at all, so adds no space prefix
    vocab = {t: i for i, t in enumerate(tokens)}
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            tid = vocab.get(symbols[i] + symbols[i + 1])
            if tid is not None and tid > 258 and (best is None or scores[tid] > best[0]):
                best = (scores[tid], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        ids.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])
    return ids


SPM_PIECES = ["▁", "a", "b", "c", "d", "e", "▁a", "ab", "bc", "▁ab", "abc", "cd", "de", "▁abc",
              "cde", "▁b", "ea", "▁c", "dd", "bcd", "▁d", "ee", "▁e", "▁de", "aa", "ba", "▁ba"]


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("spm")
    tokens, scores, types = spm_vocab(SPM_PIECES)
    model = reference_model("llama", len(tokens))
    metadata = {
        **model_metadata("llama", TINY, 16),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array(scores, dtype=mx.float32),
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=mx.uint32),
    }
    mx.save_gguf(str(tmp / "spm.gguf"), gguf_tensors(model, "llama"), metadata)
    return AutoTokenizer.from_pretrained(str(import_gguf(tmp / "spm.gguf", tmp / "model")))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcde é", max_size=24))
def test_sentencepiece_tokenizer_merges_like_llama_cpp(spm_tokenizer: Any, text: str) -> None:
    tokens, scores, _ = spm_vocab(SPM_PIECES)
    expected = [1, *llama_cpp_spm_encode(text, tokens, scores)]  # llama adds BOS by default
    assert spm_tokenizer.encode(text) == expected
    assert spm_tokenizer.decode(expected, skip_special_tokens=True) == text


# --- failures -------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_unsupported_architecture_fails_clearly_and_leaves_no_directory(
    tmp_path: Path, gpt2_tok: Tokenizer
) -> None:
    model = reference_model("llama", gpt2_tok.get_vocab_size())
    metadata = {**model_metadata("gptneox", TINY, 16), **bpe_metadata(gpt2_tok, "gpt-2")}
    mx.save_gguf(str(tmp_path / "m.gguf"), gguf_tensors(model, "llama"), metadata)
    with pytest.raises(GGUFImportError, match="unsupported GGUF architecture 'gptneox'") as e:
        import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert leftovers(tmp_path) == []
    # The refusal says what is supported.
    assert "llama, qwen2, qwen3" in str(e.value) and "flock runs" in str(e.value)


def test_unknown_pre_tokenizer_fails_without_touching_an_existing_model(
    tmp_path: Path, gpt2_tok: Tokenizer
) -> None:
    write_tiny_gguf(tmp_path / "good.gguf", "llama", gpt2_tok)
    out = import_gguf(tmp_path / "good.gguf", tmp_path / "model")
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    write_tiny_gguf(tmp_path / "bad.gguf", "llama", gpt2_tok, pre="no-such-pre")
    with pytest.raises(GGUFImportError, match="pre-tokenizer 'no-such-pre'"):
        import_gguf(tmp_path / "bad.gguf", out)
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    assert leftovers(tmp_path) == []


def test_unreadable_file_is_a_gguf_import_error(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFImportError, match="cannot read"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_reimport_replaces_the_previous_directory(tmp_path: Path, gpt2_tok: Tokenizer) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", "llama", gpt2_tok)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "model")
    (out / "stale.txt").write_text("from an older import")
    import_gguf(tmp_path / "m.gguf", out, dtype="float16")
    assert not (out / "stale.txt").exists()
    assert mx.load(str(out / "model.safetensors"))["model.norm.weight"].dtype == mx.float16
    assert leftovers(tmp_path) == []


# --- the real SmolLM2 -------------------------------------------------------------------------

# Token ids llama.cpp produces for SmolLM2's vocabulary ("smollm" pre-tokenizer).
SMOLLM2_IDS = {
    "Hello, we can use": [19556, 28, 392, 416, 722],
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "\n": [198],
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
}


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2_dir: Path) -> None:
    from mlx_lm import generate, load

    model, tokenizer = load(str(smollm2_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert generate(model, tokenizer, prompt, max_tokens=20) == "The capital of France is Paris."


@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_cpp(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for text, ids in SMOLLM2_IDS.items():
        assert tokenizer.encode(text) == ids, text
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(f"a{special}b")) == 3
    text = "Grüße, 東京 😀 — naïve\tcafé\n\n  ok"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.slow
def test_smollm2_keep_import_stays_4bit(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = import_gguf(smollm2_gguf, tmp_path / "keep", dtype="keep")
    config = json.loads((out / "config.json").read_text())
    # Q4_1 matrices, and the Q8_0 embedding table this file carries.
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert (out / "model.safetensors").stat().st_size < 1.05 * smollm2_gguf.stat().st_size
