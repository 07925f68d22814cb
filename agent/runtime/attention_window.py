"""Sliding-window attention in flock's decoder: which layers keep a window, and their masks.

A config marks sliding layers the way mlx-lm's llama module (which also loads mistral) reads
it: `layer_types` entries "sliding_attention", with `sliding_window` the window. Such a layer's
query at position p sees keys (p - window, p], as mlx-lm's `create_causal_mask(window_size=)`
and its RotatingKVCache give; full layers see [0, p]. mlx-lm's qwen2 / qwen3 (and its mixtral
and MoE qwens) ignore `use_sliding_window` / `max_window_layers` and a mistral config's
`sliding_window` without `layer_types`: they attend over everything, and so does flock, so
logits stay mlx-lm's.

The window is a mask over the full per-row cache rather than a rotating cache: every row of a
continuous batch keeps its own positions in one preallocated array, a prefix-cache hit copies
rows as they are, and chunked prefill sees exactly the keys a one-pass prefill would. The KV
memory is then the full context's for every layer, which is what placement counts
(`kv_bytes_per_token_per_layer` times the context, per layer).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from agent.runtime import gpt_oss

NEG_INF = -1e30  # as step.NEG_INF: a fully masked row stays finite


def sliding_layers(cfg: dict[str, Any], architecture: str, layers: int
                   ) -> tuple[int, frozenset[int]]:
    """(window, indices of the sliding layers) of a dense config; (0, empty) when none."""
    window = int(cfg.get("sliding_window") or 0)
    types = cfg.get("layer_types")
    if architecture == gpt_oss.ARCHITECTURE:  # its own defaults: 128, alternating layers
        window = int(cfg.get("sliding_window") or gpt_oss.SLIDING_WINDOW)
        types = gpt_oss.layer_types(cfg, layers)
    elif architecture not in ("llama", "mistral"):
        types = None
    if not window or not isinstance(types, list):
        return 0, frozenset()
    sliding = frozenset(i for i, t in enumerate(types[:layers]) if t == "sliding_attention")
    return (window, sliding) if sliding else (0, frozenset())


def window_of(dec: Any, index: int) -> int:
    """The window of the decoder's `index`-th held layer (0: full attention)."""
    config = dec.config
    if not config.sliding_window:
        return 0
    return config.sliding_window if dec.layers_range.start + index in config.sliding_layers \
        else 0


def has_window(dec: Any) -> bool:
    return any(window_of(dec, i) for i in range(len(dec.layers)))


def visible(positions: mx.array, capacity: int, window: int) -> mx.array:
    """Which of `capacity` cached keys each query sees: (*positions.shape, capacity) bools."""
    keys = mx.arange(capacity)
    p = positions[..., None]
    seen = keys <= p
    return seen & (keys > p - window) if window else seen


def additive(seen: mx.array, dtype: mx.Dtype) -> mx.array:
    return mx.where(seen, 0.0, NEG_INF).astype(dtype)


def decode_mask(positions: mx.array, capacity: int, window: int, dtype: mx.Dtype) -> mx.array:
    """The additive mask of one query a row, (rows, 1, 1, capacity), as decode steps use it."""
    return additive(visible(positions, capacity, window), dtype)[:, None, None, :]


def prefill_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, offset: int,
                      window: int, sinks: mx.array | None = None) -> mx.array:
    """Windowed (0: plain) causal attention of q (1, H, n, d) at positions [offset, offset + n)
    over keys (1, KV, offset + n, d), with attention sinks (H,) when given (gpt_oss, as mlx-lm
    passes them to SDPA): (1, n, H * d), as `kernels.prefill_attention` returns it."""
    batch, _, n, _ = q.shape
    positions = offset + mx.arange(n)
    mask = visible(positions, k.shape[2], window)  # (n, keys)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    return out.transpose(0, 2, 1, 3).reshape(batch, n, -1)
