"""gpt_oss on flock's decoder: what its config and checkpoints differ in from the llama family.

gpt_oss (mlx-lm's models/gpt_oss.py) is a mixture of experts with q/k/v/o biases, a learned
attention sink per head (runtime/attention_sinks.py), sliding-window and full layers
alternating (runtime/attention_window.py), a router with a bias whose top-k logits are
softmaxed, experts with biases and a clamped SwiGLU (`swiglu_oai`). This module holds its
defaults, its activation and the renaming of Hugging Face's fused expert tensors into the
stacked gate/up/down layout mlx-lm's sanitize writes (and flock's loader reads).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

ARCHITECTURE = "gpt_oss"
# mlx-lm's ModelArgs defaults where a config is silent.
ROPE_THETA = 150000.0
RMS_NORM_EPS = 1e-5
SLIDING_WINDOW = 128
ALPHA = 1.702
LIMIT = 7.0


def layer_types(cfg: dict[str, Any], layers: int) -> list[str]:
    """The config's layer_types, or mlx-lm's default: sliding and full alternating."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return [str(t) for t in types]
    return ["sliding_attention", "full_attention"] * (layers // 2)


def swiglu_oai(gate: mx.array, up: mx.array) -> mx.array:
    """mlx-lm's SwigluOAI: the gate clipped from above, up clipped both ways and offset by 1."""
    gate = mx.minimum(gate, LIMIT)
    up = mx.clip(up, -LIMIT, LIMIT)
    return (up + 1.0) * (gate * mx.sigmoid(ALPHA * gate))


# OpenAI's own checkpoints quantize the experts to mxfp4 (`quantization_config.quant_method`),
# as MLX's "mxfp4" mode packs them: mlx-lm loads them with these parameters.
MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}


def _split_rows(out: dict[str, mx.array], name: str, v: mx.array, suffix: str) -> None:
    """gate and up rows interleaved along the rows (axis -2 of matrices, -1 of biases)."""
    if suffix == "bias":
        gate, up = v[..., ::2], v[..., 1::2]
    else:
        gate, up = v[..., ::2, :], v[..., 1::2, :]
    out[name.replace("gate_up_proj", f"gate_proj.{suffix}")] = mx.contiguous(gate)
    out[name.replace("gate_up_proj", f"up_proj.{suffix}")] = mx.contiguous(up)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Hugging Face's fused `experts.gate_up_proj` (gate and up rows interleaved) and
    `down_proj` tensors, with their `_bias` vectors and, in OpenAI's mxfp4 checkpoints, as
    `_blocks` (uint8, (..., rows, groups, 16): MLX's mxfp4 codes viewed as uint32) and
    `_scales`, renamed and split as mlx-lm's sanitize does:
    `experts.{gate,up,down}_proj.{weight,scales,bias}`. Already-split names pass through."""
    fused = ("gate_up_proj", "down_proj")
    if not any(f"experts.{f}{tail}" in k for k in weights for f in fused
               for tail in ("", "_blocks")):
        return weights
    out: dict[str, mx.array] = {}
    for k, v in weights.items():
        base, _, tail = k.rpartition("_")
        if ".experts." not in k or not k.rsplit(".", 1)[-1].startswith(fused):
            out[k] = v
            continue
        if tail == "blocks":
            v, suffix = v.view(mx.uint32).flatten(-2), "weight"
        elif tail in ("scales", "bias"):
            suffix = tail
        else:
            base, suffix = k, "weight"
        if base.endswith("gate_up_proj"):
            _split_rows(out, base, v, suffix)
        else:
            out[f"{base}.{suffix}"] = v
    return out
