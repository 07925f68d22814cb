"""Sizing mxfp4 checkpoints (pure functions): OpenAI's gpt-oss layout quantizes the routed
experts alone (4-bit values with one uint8 scale per 32: 4.25 bits a weight), and placement
counts them at those bytes, not at the stored float dtype of the rest."""

from __future__ import annotations

from agent.cluster import shape as cluster_shape
from agent.models import arch

H, W, E, LAYERS, VOCAB, HEADS, KV, HD = 256, 128, 8, 2, 1024, 4, 2, 64
OPENAI_OSS = {
    "model_type": "gpt_oss", "hidden_size": H, "intermediate_size": W, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
    "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": VOCAB,
    "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["router"]},
}
EXPERT_VALUES = E * 3 * H * W  # gate, up and down of every routed expert


def test_openai_mxfp4_counts_the_experts_at_4_25_bits() -> None:
    fmt = arch.weight_format(OPENAI_OSS, "keep")
    assert (fmt.dtype, fmt.bits, fmt.group_size, fmt.mode, fmt.experts_only, fmt.rest) == \
        ("affine", 4, 32, "mxfp4", True, "bfloat16")
    dims = arch.shape(OPENAI_OSS)
    matrices, vectors = dims.layer_params(0)
    assert dims.routed_expert_params(0) == EXPERT_VALUES
    expert_bytes = EXPERT_VALUES * 17 // 32  # 16 bytes of values + 1 scale byte per 32
    rest = 2 * (matrices - EXPERT_VALUES) + 2 * vectors  # bfloat16 as stored
    assert dims.layer_bytes(0, fmt) == expert_bytes + rest
    # Before: every value at the stored bfloat16, the experts ~3.8x over what is loaded.
    assert dims.layer_bytes(0, arch.WeightFormat("bfloat16")) == 2 * (matrices + vectors)
    assert fmt.matrix_bytes(dims.embedding_params()) == 2 * dims.embedding_params()
    assert fmt.element_bytes == 2
    # Served at float32 the experts are dequantized: 4 bytes a value, as before.
    f32 = arch.weight_format(OPENAI_OSS, "float32")
    assert dims.layer_bytes(0, f32) == 4 * (matrices + vectors)


def test_mlx_community_mxfp4_scales_are_one_byte_per_group() -> None:
    config = {**OPENAI_OSS, "quantization_config": None,
              "quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    fmt = arch.weight_format(config, "keep")
    assert (fmt.mode, fmt.experts_only) == ("mxfp4", False)
    assert fmt.matrix_bytes(3200) == 1600 + 100
    affine = arch.weight_format({**config, "quantization": {"group_size": 32, "bits": 4}}, "keep")
    assert affine.matrix_bytes(3200) == 1600 + 100 * 4  # float16 scale and offset a group


def test_counted_bytes_of_openai_blocks_at_float32_and_kept() -> None:
    p = "model.layers.0.mlp.experts."
    tensors = {
        p + "gate_up_proj_blocks": ("U8", [E, 2 * W, H // 32, 16]),
        p + "gate_up_proj_scales": ("U8", [E, 2 * W, H // 32]),
        p + "down_proj_blocks": ("U8", [E, H, W // 32, 16]),
        p + "down_proj_scales": ("U8", [E, H, W // 32]),
        "model.layers.0.self_attn.o_proj.weight": ("BF16", [H, HEADS * HD]),
        "model.embed_tokens.weight": ("BF16", [VOCAB, H]),
    }
    quant = arch.quantization(OPENAI_OSS)
    attn = H * HEADS * HD
    kept = cluster_shape._counted_bytes(tensors, quant, 2, keep=True)
    assert kept == (EXPERT_VALUES * 17 // 32 + 2 * attn, 2 * VOCAB * H)
    # Dequantized: each block byte is two values, and the scales are gone.
    widened = cluster_shape._counted_bytes(tensors, quant, 4, keep=False)
    assert widened == (4 * (EXPERT_VALUES + attn), 4 * VOCAB * H)
