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


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Hugging Face's fused `experts.gate_up_proj` (gate and up rows interleaved) and
    `down_proj` tensors, with their `_bias` vectors, renamed and split as mlx-lm's sanitize
    does: `experts.{gate,up,down}_proj.{weight,bias}`. Already-split names pass through."""
    if not any(".experts.gate_up_proj" in k or k.endswith("experts.down_proj") for k in weights):
        return weights
    out: dict[str, mx.array] = {}
    for k, v in weights.items():
        if k.endswith("experts.gate_up_proj"):
            out[k.replace("gate_up_proj", "gate_proj.weight")] = mx.contiguous(v[..., ::2, :])
            out[k.replace("gate_up_proj", "up_proj.weight")] = mx.contiguous(v[..., 1::2, :])
        elif k.endswith("experts.gate_up_proj_bias"):
            out[k.replace("gate_up_proj_bias", "gate_proj.bias")] = mx.contiguous(v[..., ::2])
            out[k.replace("gate_up_proj_bias", "up_proj.bias")] = mx.contiguous(v[..., 1::2])
        elif k.endswith("experts.down_proj"):
            out[k + ".weight"] = v
        elif k.endswith("experts.down_proj_bias"):
            out[k.replace("down_proj_bias", "down_proj.bias")] = v
        else:
            out[k] = v
    return out
