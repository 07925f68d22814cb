"""Attention sinks (gpt_oss): a learned logit per query head that joins every softmax.

mlx-lm's gpt_oss passes `sinks` to `mx.fast.scaled_dot_product_attention`: each head's sink is
one more key with no value, so it only adds exp(sink) to the softmax's denominator. flock's
cached-attention steps compute the softmax themselves (grouped queries, one matmul per KV head),
so they append the sink as a last score column, take the softmax and drop the column; prefill
passes `sinks=` to MLX's SDPA as mlx-lm does.
"""

from __future__ import annotations

import mlx.core as mx


def grouped(sinks: mx.array, kv_heads: int, queries: int) -> mx.array:
    """Per-head sinks (heads,) laid out as grouped queries (kv_heads, group * queries, 1) are:
    head kv * group + g, query w sits at row g * queries + w of its KV head."""
    group = sinks.shape[0] // kv_heads
    return mx.repeat(sinks.reshape(kv_heads, group), queries, axis=-1)[..., None]


def softmax(scores: mx.array, sinks: mx.array | None) -> mx.array:
    """Softmax over the last axis, the sink (broadcast to scores' rows) in its denominator."""
    if sinks is None:
        return mx.softmax(scores, axis=-1, precise=True)
    column = mx.broadcast_to(sinks.astype(scores.dtype), (*scores.shape[:-1], 1))
    return mx.softmax(mx.concatenate([scores, column], axis=-1), axis=-1,
                      precise=True)[..., :-1]
