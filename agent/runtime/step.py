"""Forward passes over a Decoder: prefill of one sequence, and the batched decode step.

The decode step is one pure function of (tokens or hidden states, positions, KV arrays) so it can
run under `mx.compile`: each row has its own position, new keys/values are written at that
position, and attention groups the query heads that share a KV head into one matmul (on CPU
this does about half the work of `mx.fast.scaled_dot_product_attention` at long context).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from agent.runtime import attention_sinks, attention_window, kernels, moe
from agent.runtime.kv import KvQuant
from agent.runtime.matmul import linear  # also imported from here by rowstep, verify
from agent.runtime.model import Decoder, Dense, FusedGateUp, FusedQKV, Layer, Mlp, SparseMoe

NEG_INF = -1e30  # large finite number: a fully masked row stays finite


def _all_sum(x: mx.array, group: Any) -> mx.array:
    return mx.distributed.all_sum(x, group=group) if group is not None else x


def projection(x: mx.array, proj: Any) -> mx.array:
    """`linear`, or for a float32 weight without bias and a decode's few rows the extension's
    bandwidth-bound kernel (`kernels.dense`) where it is loaded."""
    if isinstance(proj, Dense) and proj.bias is None:
        out = kernels.dense(x, proj.weight)
        if out is not None:
            return out
    return linear(x, proj)


def _qkv(dec: Decoder, layer: Layer, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Projected q, k, v in (batch, heads, tokens, head_dim), normed where the model says."""
    batch, tokens, _ = x.shape
    heads, kv_heads, hd = dec.local_heads, dec.local_kv_heads, dec.config.head_dim
    attn = layer.attn
    if isinstance(attn.qkv, FusedQKV):
        qkv = projection(x, attn.qkv.qkv)
        q, k, v = mx.split(qkv, [heads * hd, (heads + kv_heads) * hd], axis=-1)
    else:
        q, k, v = (projection(x, p) for p in (attn.qkv.q, attn.qkv.k, attn.qkv.v))
    q = q.reshape(batch, tokens, heads, hd)
    k = k.reshape(batch, tokens, kv_heads, hd)
    v = v.reshape(batch, tokens, kv_heads, hd)
    eps = dec.config.rms_norm_eps
    if attn.q_norm is not None:
        q = mx.fast.rms_norm(q, attn.q_norm, eps)
    if attn.k_norm is not None:
        k = mx.fast.rms_norm(k, attn.k_norm, eps)
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _dense_mlp(mlp: Mlp, x: mx.array) -> mx.array:
    if isinstance(mlp.gate_up, FusedGateUp):
        # One kernel where flockops is loaded, else MLX's split, sigmoid and products.
        return projection(kernels.swiglu(projection(x, mlp.gate_up.gate_up)), mlp.down)
    gate, up = projection(x, mlp.gate_up.gate), projection(x, mlp.gate_up.up)
    return projection(gate * mx.sigmoid(gate) * up, mlp.down)


def _mlp(dec: Decoder, layer: Layer, x: mx.array) -> mx.array:
    if isinstance(layer.mlp, SparseMoe):  # mixture of experts (runtime/moe.py)
        return _all_sum(moe.sparse_mlp(layer.mlp, x, linear, _dense_mlp), dec.group)
    return _all_sum(_dense_mlp(layer.mlp, x), dec.group)


def embed_tokens(dec: Decoder, tokens: mx.array) -> mx.array:
    embed = dec.embed
    assert embed is not None
    if isinstance(embed, Dense):
        return embed.weight[tokens]
    # Only the looked-up rows are dequantized (mlx-lm's QuantizedEmbedding does the same).
    return mx.dequantize(embed.weight[tokens], embed.scales[tokens],
                         None if embed.biases is None else embed.biases[tokens],
                         group_size=embed.group_size, bits=embed.bits, mode=embed.mode)


def project_logits(dec: Decoder, h: mx.array) -> mx.array:
    assert dec.norm is not None
    return projection(kernels.rms_norm(h, dec.norm, dec.config.rms_norm_eps), dec.head)


def _plain_rope(dec: Decoder) -> bool:
    rope = dec.rope
    return type(rope) is nn.RoPE and rope.dims == dec.config.head_dim


def _inv_freqs(dec: Decoder) -> mx.array:
    half = dec.rope.dims // 2
    return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(dec.rope.base) / half))


def _rope_angles(dec: Decoder, positions: mx.array) -> tuple[mx.array, mx.array] | None:
    """cos and sin of every row's rotation angles, (rows, 1, 1, head_dim / 2), computed once per
    step and shared by every layer's q and k. None when the model's RoPE is not the plain kind
    (scaled variants keep their own implementation)."""
    rope = dec.rope
    if not _plain_rope(dec):
        return None
    inv_freqs = _inv_freqs(dec)
    angles = (positions.astype(mx.float32) * rope.scale)[:, None] * inv_freqs[None, :]
    angles = angles[:, None, None, :]
    return mx.cos(angles), mx.sin(angles)


def _apply_rope(dec: Decoder, x: mx.array, angles: tuple[mx.array, mx.array]) -> mx.array:
    """Rotate (rows, heads, 1, head_dim) by precomputed angles, as `mx.fast.rope` would."""
    cos, sin = angles
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    if dec.rope.traditional:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        return rotated.reshape(x.shape)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def new_layer_kv(dec: Decoder, layer: Layer, h: mx.array, angles: tuple[mx.array, mx.array] | None,
                 offsets: mx.array, quant: KvQuant | None
                 ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """A layer's queries and the keys/values its new tokens add to the cache (roped; packed as
    the cache holds them when `quant`): what every decode-shaped step computes first."""
    q, k, v = _qkv(dec, layer, kernels.rms_norm(h, layer.attn_norm, dec.config.rms_norm_eps))
    if angles is not None:
        q, k = _apply_rope(dec, q, angles), _apply_rope(dec, k, angles)
    else:
        q, k = dec.rope(q, offset=offsets), dec.rope(k, offset=offsets)
    k_new, v_new = packed_kv(k, v, quant)
    return q, k_new, v_new


def packed_kv(k: mx.array, v: mx.array, quant: KvQuant | None
              ) -> tuple[list[mx.array], list[mx.array]]:
    """New keys and values as the cache holds them: as they are, or quantized (data, scales,
    biases) when `quant`."""
    if quant is None:
        return [k], [v]
    return (list(mx.quantize(k, group_size=quant.group, bits=quant.bits)),
            list(mx.quantize(v, group_size=quant.group, bits=quant.bits)))


def cached_attention(qg: mx.array, k_cache: list[mx.array], v_cache: list[mx.array],
                     mask: mx.array, quant: KvQuant | None, sinks: mx.array | None = None
                     ) -> mx.array:
    """Grouped queries (rows, kv_heads, n, hd), already scaled, against a cache (float or
    quantized): one matmul per KV head. `sinks` (kv_heads, n, 1): gpt_oss's per-head sink
    logits laid out as the queries are (`attention_sinks.grouped`)."""
    if quant is not None:
        return _quantized_attention(qg, k_cache, v_cache, mask, quant, sinks)
    scores = qg @ k_cache[0].transpose(0, 1, 3, 2) + mask
    return attention_sinks.softmax(scores, sinks) @ v_cache[0]


def write_layer_kv(k_cache: list[mx.array], v_cache: list[mx.array],
                   wheres: dict[int, mx.array], k_new: list[mx.array], v_new: list[mx.array]
                   ) -> tuple[list[mx.array], list[mx.array]]:
    """A layer's caches with its new keys/values put at `wheres` (indices by last-axis width)."""
    return ([mx.put_along_axis(c, wheres[c.shape[3]], n, axis=2)
             for c, n in zip(k_cache, k_new, strict=True)],
            [mx.put_along_axis(c, wheres[c.shape[3]], n, axis=2)
             for c, n in zip(v_cache, v_new, strict=True)])


def one_token_attention(q: mx.array, k_cache: list[mx.array], v_cache: list[mx.array],
                        positions: mx.array, mask: mx.array, quant: KvQuant | None,
                        group_size: int, *, fused_ok: bool = True,
                        sinks: mx.array | None = None) -> mx.array:
    """One query a row (rows, heads, 1, hd) over its cache: the fused CPU kernel where it runs
    (and `fused_ok`: it sees keys [0, position], not a sliding window's mask), else grouped
    matmuls; (rows, 1, heads * hd). `sinks` (heads,): gpt_oss's, which the kernel lacks."""
    rows, heads, _, hd = q.shape
    scale = hd**-0.5
    # The kernel reads a quantized cache's packed parts directly; it knows neither a sliding
    # window's mask nor sinks.
    fused = None if not fused_ok or sinks is not None else kernels.decode_attention(
        q, k_cache if quant else k_cache[0], v_cache if quant else v_cache[0], positions,
        scale=scale, quant=quant)
    if fused is not None:
        return fused
    # (rows, kv, group, hd) @ (rows, kv, hd, capacity): one matmul per KV head.
    qg = q.reshape(rows, heads // group_size, group_size, hd) * scale
    grouped = None if sinks is None else attention_sinks.grouped(sinks, heads // group_size, 1)
    return cached_attention(qg, k_cache, v_cache, mask, quant, grouped).reshape(
        rows, 1, heads * hd)


def decode_step(
    dec: Decoder,
    inputs: mx.array,
    positions: mx.array,
    keys: list[mx.array],
    values: list[mx.array],
    *,
    embed: bool,
    project: bool,
    quant: KvQuant | None = None,
) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """One token for every row. `inputs`: token ids (rows,) when `embed`, else hidden states
    (rows, 1, hidden). Returns logits (rows, vocab) when `project`, else hidden states, and the
    updated KV arrays (flat lists as `KvSlots` holds them; three arrays a layer when `quant`)."""
    h = embed_tokens(dec, inputs)[:, None, :] if embed else inputs
    if fused_layers(dec):
        h, new_keys, new_values = _fused_decode_layers(dec, h, positions, keys, values, quant)
        return (project_logits(dec, h[:, 0, :]) if project else h), new_keys, new_values
    rows = h.shape[0]
    capacity = keys[0].shape[2]
    kv_heads = dec.local_kv_heads
    group_size = dec.local_heads // kv_heads
    eps = dec.config.rms_norm_eps
    # Key j is visible to a row at position p when j <= p (its own new key included).
    visible = mx.arange(capacity)[None, :] <= positions[:, None]
    mask = mx.where(visible, 0.0, NEG_INF).astype(h.dtype)[:, None, None, :]
    parts = 1 if quant is None else 3
    wheres = {a.shape[3]: mx.broadcast_to(positions[:, None, None, None],
                                          (rows, kv_heads, 1, a.shape[3]))
              for a in keys[:parts]}
    angles = _rope_angles(dec, positions)
    windows = {w: attention_window.decode_mask(positions, capacity, w, h.dtype)
               for w in {attention_window.window_of(dec, i) for i in range(len(dec.layers))} if w}
    new_keys, new_values = [], []
    for i, layer in enumerate(dec.layers):
        k_cache, v_cache = keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts]
        q, k_new, v_new = new_layer_kv(dec, layer, h, angles, positions, quant)
        k_cache, v_cache = write_layer_kv(k_cache, v_cache, wheres, k_new, v_new)
        new_keys.extend(k_cache)
        new_values.extend(v_cache)
        window = attention_window.window_of(dec, i)
        attn = one_token_attention(q, k_cache, v_cache, positions,
                                   windows[window] if window else mask, quant, group_size,
                                   fused_ok=not window, sinks=layer.attn.sinks)
        h = h + _all_sum(projection(attn, layer.attn.o), dec.group)
        h = h + _mlp(dec, layer, kernels.rms_norm(h, layer.ffn_norm, eps))
    out = project_logits(dec, h[:, 0, :]) if project else h
    return out, new_keys, new_values


def fused_layers(dec: Decoder) -> bool:
    """Whether a layer's small ops run as flockops kernels (norm + residual add, the qkv split,
    q/k head norms where the model has them (qwen3) and rope): float32 weights, one fused qkv
    projection, plain RoPE, no sinks or sliding window. Everything else keeps the op-by-op
    path."""
    if not kernels.enabled() or not _plain_rope(dec):
        return False

    def norms_ok(attn: Any) -> bool:
        if attn.q_norm is None and attn.k_norm is None:
            return True
        return attn.q_norm is not None and attn.k_norm is not None and kernels.norm_rope() \
            and attn.q_norm.dtype == mx.float32 and attn.k_norm.dtype == mx.float32

    return all(isinstance(layer.attn.qkv, FusedQKV) and norms_ok(layer.attn)
               and layer.attn_norm.dtype == mx.float32
               and layer.attn.sinks is None and not attention_window.window_of(dec, i)
               for i, layer in enumerate(dec.layers))


def _fused_layer_qkv(dec: Decoder, layer: Any, h: mx.array, delta: mx.array | None,
                     positions: mx.array, inv_freqs: mx.array
                     ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """A fused layer's entry: the previous layer's residual add (`delta`, None for the first
    layer) with the attention norm, the qkv projection, then one kernel splitting the heads and
    roping q and k. Returns the residual stream and q, k, v."""
    eps = dec.config.rms_norm_eps
    if delta is None:
        x = kernels.rms_norm(h, layer.attn_norm, eps)
    else:
        h, x = kernels.add_rms_norm(h, delta, layer.attn_norm, eps)
    attn = layer.attn
    q, k, v = kernels.rope_qkv(projection(x, attn.qkv.qkv), positions, inv_freqs,
                               heads=dec.local_heads, kv_heads=dec.local_kv_heads,
                               rope_scale=dec.rope.scale, traditional=dec.rope.traditional,
                               norms=None if attn.q_norm is None else (attn.q_norm, attn.k_norm),
                               eps=eps)
    return h, q, k, v


def _whole_layers(dec: Decoder, rows: int) -> bool:
    """Whether fused layers take the whole-layer kernels (`kernels.layer_entry` /
    `layer_block`): a single node's dense SwiGLU layers, float32 weights without biases or q/k
    norms, a decode's few rows."""
    if dec.group is not None or rows > kernels.DENSE_MAX_ROWS:
        return False

    def plain(p: Any) -> bool:
        return isinstance(p, Dense) and p.bias is None and p.weight.dtype == mx.float32

    return all(isinstance(layer.mlp, Mlp) and isinstance(layer.mlp.gate_up, FusedGateUp)
               and layer.attn.q_norm is None and plain(layer.attn.qkv.qkv) and plain(layer.attn.o)
               and plain(layer.mlp.gate_up.gate_up) and plain(layer.mlp.down)
               for layer in dec.layers)


def kernel_layer_attention(q: mx.array, k: mx.array, v: mx.array, layer_keys: list[mx.array],
                           layer_values: list[mx.array], positions: mx.array, hd: int,
                           quant: KvQuant | None, write: Callable[..., Any],
                           view: Callable[[mx.array], mx.array] | None = None
                           ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """A fused layer's new keys and values packed as the cache holds them, put in the layer's
    caches by `write(keys, values, k_new, v_new)`, and the decode-attention kernel over the
    caches (or over `view` of each: a micro-batch's rows). Returns attention, keys, values."""
    k_new, v_new = packed_kv(k, v, quant)
    k_cache, v_cache = write(layer_keys, layer_values, k_new, v_new)
    ks, vs = (k_cache, v_cache) if view is None else ([view(c) for c in k_cache],
                                                       [view(c) for c in v_cache])
    attn = kernels.decode_attention(q, ks if quant else ks[0], vs if quant else vs[0], positions,
                                    scale=hd**-0.5, quant=quant)
    assert attn is not None  # fused_layers checked the kernels are loaded
    return attn, k_cache, v_cache


def _whole_decode_layers(dec: Decoder, h: mx.array, positions: mx.array, keys: list[mx.array],
                         values: list[mx.array], quant: KvQuant | None
                         ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The fused decode layers as 3 kernels a layer around MLX's in-place cache writes: the
    entry (norm, qkv, rope), the attention kernel, the block (o + residual, norm, MLP +
    residual): 5 ops a layer instead of ~11."""
    rows, kv_heads = h.shape[0], dec.local_kv_heads
    parts = 1 if quant is None else 3
    wheres = {a.shape[3]: mx.broadcast_to(positions[:, None, None, None],
                                          (rows, kv_heads, 1, a.shape[3]))
              for a in keys[:parts]}

    def write(ks: list[mx.array], vs: list[mx.array], k_new: list[mx.array],
              v_new: list[mx.array]) -> tuple[list[mx.array], list[mx.array]]:
        return write_layer_kv(ks, vs, wheres, k_new, v_new)

    return whole_kernel_layers(dec, h, positions, keys, values, quant, write)


def whole_kernel_layers(dec: Decoder, h: mx.array, positions: mx.array, keys: list[mx.array],
                        values: list[mx.array], quant: KvQuant | None, write: Callable[..., Any],
                        view: Callable[[mx.array], mx.array] | None = None
                        ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The whole-layer kernel loop: per layer the entry kernel (norm, qkv, rope), the cache
    writes by `write` and the attention kernel (over `view` of each cache where given: a
    micro-batch's rows), the block kernel (o + residual, norm, MLP + residual)."""
    eps = dec.config.rms_norm_eps
    inv_freqs = _inv_freqs(dec)
    hd = dec.config.head_dim
    parts = 1 if quant is None else 3
    new_keys, new_values = [], []
    for i, layer in enumerate(dec.layers):
        q, k, v = kernels.layer_entry(h, layer.attn_norm, layer.attn.qkv.qkv.weight, positions,
                                      inv_freqs, heads=dec.local_heads,
                                      kv_heads=dec.local_kv_heads, eps=eps,
                                      rope_scale=dec.rope.scale,
                                      traditional=dec.rope.traditional)
        attn, k_cache, v_cache = kernel_layer_attention(
            q, k, v, keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts],
            positions, hd, quant, write, view)
        new_keys.extend(k_cache)
        new_values.extend(v_cache)
        mlp = layer.mlp
        h = kernels.layer_block(h, attn, layer.attn.o.weight, layer.ffn_norm,
                                mlp.gate_up.gate_up.weight, mlp.down.weight, eps)
    return h, new_keys, new_values


def _fused_decode_layers(dec: Decoder, h: mx.array, positions: mx.array, keys: list[mx.array],
                         values: list[mx.array], quant: KvQuant | None
                         ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """decode_step's layers with the small ops fused: per layer a norm (with the previous
    residual add), the qkv projection, one kernel splitting and roping q, k, v, the cache
    writes (MLX's scatter, in place), the attention kernel (reading a quantized cache packed),
    the output projection, add + norm, the MLP: ~12 ops a layer instead of ~40."""
    if _whole_layers(dec, h.shape[0]):
        return _whole_decode_layers(dec, h, positions, keys, values, quant)
    eps = dec.config.rms_norm_eps
    inv_freqs = _inv_freqs(dec)
    rows = h.shape[0]
    kv_heads = dec.local_kv_heads
    hd = dec.config.head_dim
    parts = 1 if quant is None else 3
    wheres = {a.shape[3]: mx.broadcast_to(positions[:, None, None, None],
                                          (rows, kv_heads, 1, a.shape[3]))
              for a in keys[:parts]}

    def write(ks: list[mx.array], vs: list[mx.array], k_new: list[mx.array],
              v_new: list[mx.array]) -> tuple[list[mx.array], list[mx.array]]:
        return write_layer_kv(ks, vs, wheres, k_new, v_new)

    new_keys, new_values = [], []
    delta: mx.array | None = None
    for i, layer in enumerate(dec.layers):
        h, q, k, v = _fused_layer_qkv(dec, layer, h, delta, positions, inv_freqs)
        attn, k_cache, v_cache = kernel_layer_attention(
            q, k, v, keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts],
            positions, hd, quant, write)
        new_keys.extend(k_cache)
        new_values.extend(v_cache)
        h, x = kernels.add_rms_norm(h, _all_sum(projection(attn, layer.attn.o), dec.group),
                                    layer.ffn_norm, eps)
        delta = _mlp(dec, layer, x)
    assert delta is not None
    return h + delta, new_keys, new_values


def _quantized_attention(qg: mx.array, k_cache: list[mx.array], v_cache: list[mx.array],
                         mask: mx.array, quant: KvQuant, sinks: mx.array | None = None
                         ) -> mx.array:
    """Decode attention over a quantized cache. The quantized matmuls read the packed codes
    directly; dequantizing the cache first and using plain matmuls was measured slower on
    SmolLM2 at 1K context (CPU, 8-bit: 275 ms vs 220-225 ms a step; 4-bit: 280-300 vs 225-250)."""
    scores = mx.quantized_matmul(qg, *k_cache, transpose=True, group_size=quant.group,
                                 bits=quant.bits) + mask
    weights = attention_sinks.softmax(scores, sinks)
    return mx.quantized_matmul(weights, *v_cache, transpose=False, group_size=quant.group,
                               bits=quant.bits)


def prefill(
    dec: Decoder,
    inputs: mx.array,
    start: int,
    row: int,
    keys: list[mx.array],
    values: list[mx.array],
    *,
    embed: bool | None = None,
    project: bool | None = None,
    all_logits: bool = False,
    quant: KvQuant | None = None,
) -> mx.array:
    """Run tokens [start, start + n) of the sequence in `row`, writing its KV in place.

    `inputs`: token ids (n,) when embedding, else hidden states (1, n, hidden). Returns the last
    position's logits (1, vocab) when projecting (all positions with `all_logits`), else the
    hidden states for the next stage. Both default to what the decoder holds. With `quant` the
    KV arrays are the quantized parts (three a layer) and the chunk's keys and values are
    quantized as they are stored; attention reads the stored (quantized) form, so a prompt
    sees the same keys whether it is prefilled in one pass or in chunks, or decoded.
    """
    embed = dec.embeds if embed is None else embed
    project = dec.projects if project is None else project
    h = embed_tokens(dec, inputs)[None] if embed else inputs
    hd = dec.config.head_dim
    scale = hd**-0.5
    eps = dec.config.rms_norm_eps
    fused = fused_layers(dec)
    if fused:
        h = _fused_prefill_layers(dec, h, start, row, keys, values, quant)
    for i, layer in enumerate([] if fused else dec.layers):
        q, k, v = _qkv(dec, layer, kernels.rms_norm(h, layer.attn_norm, eps))
        q = dec.rope(q, offset=start)
        k = dec.rope(k, offset=start)
        k_all, v_all = _store_prompt_kv(keys, values, i, row, start, k, v, quant)
        # (1, n, heads * hd): the fused kernel where loaded (reading a quantized cache's parts
        # directly), else MLX's causal SDPA; a sliding layer masks what lies behind its window.
        window = attention_window.window_of(dec, i)
        if window or layer.attn.sinks is not None:  # the kernels know neither
            if quant is not None:
                k_all, v_all = (mx.dequantize(*parts_of, group_size=quant.group,
                                              bits=quant.bits) for parts_of in (k_all, v_all))
            attn = attention_window.prefill_attention(q, k_all, v_all, scale=scale,
                                                      offset=start, window=window,
                                                      sinks=layer.attn.sinks)
        else:
            attn = kernels.prefill_attention(q, k_all, v_all, scale=scale, offset=start,
                                             quant=quant)
        h = h + _all_sum(linear(attn, layer.attn.o), dec.group)
        h = h + _mlp(dec, layer, kernels.rms_norm(h, layer.ffn_norm, eps))
    if not project:
        return h
    return project_logits(dec, h[0] if all_logits else h[0, -1:])


def _store_prompt_kv(keys: list[mx.array], values: list[mx.array], layer: int, row: int,
                     start: int, k: mx.array, v: mx.array, quant: KvQuant | None
                     ) -> tuple[Any, Any]:
    """Write a chunk's keys and values (1, kv_heads, n, head_dim) into the row's positions
    [start, start + n) of a layer's cache; returns the layer's keys and values for positions
    [0, start + n): arrays, or a quantized cache's parts (three a side)."""
    end = start + k.shape[2]
    if quant is None:
        keys[layer][row:row + 1, :, start:end] = k
        values[layer][row:row + 1, :, start:end] = v
        return keys[layer][row:row + 1, :, :end], values[layer][row:row + 1, :, :end]
    return (_store_quantized(keys, layer * 3, row, start, k, quant),
            _store_quantized(values, layer * 3, row, start, v, quant))


def _store_quantized(arrays: list[mx.array], first: int, row: int, start: int, x: mx.array,
                     quant: KvQuant) -> list[mx.array]:
    """Quantize `x` (1, kv_heads, n, head_dim) into the row's positions [start, start + n) of
    the parts `arrays[first:first + 3]`; returns those parts' positions [0, start + n)."""
    end = start + x.shape[2]
    stored = []
    for j, part in enumerate(mx.quantize(x, group_size=quant.group, bits=quant.bits)):
        arrays[first + j][row:row + 1, :, start:end] = part
        stored.append(arrays[first + j][row:row + 1, :, :end])
    return stored


def _fused_prefill_layers(dec: Decoder, h: mx.array, start: int, row: int,
                          keys: list[mx.array], values: list[mx.array], quant: KvQuant | None
                          ) -> mx.array:
    """prefill's layers with the small ops fused (as `_fused_decode_layers`)."""
    eps = dec.config.rms_norm_eps
    inv_freqs = _inv_freqs(dec)
    scale = dec.config.head_dim**-0.5
    end = start + h.shape[1]
    positions = mx.arange(start, end, dtype=mx.int32)
    delta: mx.array | None = None
    for i, layer in enumerate(dec.layers):
        h, q, k, v = _fused_layer_qkv(dec, layer, h, delta, positions, inv_freqs)
        k_all, v_all = _store_prompt_kv(keys, values, i, row, start, k, v, quant)
        attn = kernels.prefill_attention(q, k_all, v_all, scale=scale, offset=start, quant=quant)
        h, x = kernels.add_rms_norm(h, _all_sum(linear(attn, layer.attn.o), dec.group),
                                    layer.ffn_norm, eps)
        delta = _mlp(dec, layer, x)
    assert delta is not None
    return h + delta


def make_decode_fn(dec: Decoder, *, compiled: bool, embed: bool | None = None,
                   project: bool | None = None, quant: KvQuant | None = None
                   ) -> Callable[..., Any]:
    """The decode step as a function of arrays only (the keys' arrays, then the values');
    compiled per shape when asked."""
    embed = dec.embeds if embed is None else embed
    project = dec.projects if project is None else project

    def step(inputs: mx.array, positions: mx.array, *kv: mx.array) -> tuple[mx.array, ...]:
        half = len(kv) // 2
        out, keys, values = decode_step(dec, inputs, positions, list(kv[:half]),
                                        list(kv[half:]), embed=embed, project=project,
                                        quant=quant)
        return (out, *keys, *values)

    return mx.compile(step) if compiled else step


def make_project_fn(dec: Decoder, *, compiled: bool) -> Callable[[mx.array], mx.array]:
    """Hidden states (rows, hidden) to logits: the pipeline head's last act of a step."""

    def project(h: mx.array) -> mx.array:
        return project_logits(dec, h)

    return mx.compile(project) if compiled else project
