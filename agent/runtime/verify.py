"""The verification step: the batched decode step with several tokens per row.

Row r feeds `width` tokens at positions start[r], start[r] + 1, ...: its pending token and its
drafted tokens (rows with shorter drafts, or none, are padded). Every token's keys and values
are written at its position before attention, and a token sees the keys up to its own position,
so the logits at each position are what decoding the tokens one by one would give. Positions
past what a row keeps (rejected drafts, padding) hold stale KV that nobody reads: the row's
length says where its next token goes, and that step overwrites them. One pure function of
arrays, compiled per shape like `step.decode_step`, and shared by the head, its tensor peers
and pipeline stages.

A pipeline's micro-batch (a range of KV rows, `rowstep.py`) verifies its drafts on its ordinary
trip round the ring (`ring.py`): `RowsVerify` is the same step over rows [first, first + n) of a
cache that holds more rows, writing into the whole cache in place and attending over the
range's rows only, as the row-range decode step does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from agent.runtime import attention_sinks, attention_window, kernels
from agent.runtime.kv import KvQuant
from agent.runtime.model import Decoder
from agent.runtime.rowstep import RowRangeSteps
from agent.runtime.step import (
    _all_sum,
    _fused_layer_qkv,
    _inv_freqs,
    _mlp,
    cached_attention,
    embed_tokens,
    fused_layers,
    new_layer_kv,
    packed_kv,
    project_logits,
    projection,
    write_layer_kv,
)

# Widths a verification step is compiled for: a row's draft is padded up to the next one, so
# the step compiles for a handful of shapes instead of one per draft length.
WIDTHS = (2, 3, 5, 9, 13)


def step_width(tokens: int) -> int:
    """The compiled width that holds `tokens` tokens per row (the widest when beyond all)."""
    for width in WIDTHS:
        if tokens <= width:
            return width
    return WIDTHS[-1]


def _rope_angles(dec: Decoder, positions: mx.array) -> tuple[mx.array, mx.array] | None:
    """cos and sin for positions (rows, width), shaped (rows, 1, width, head_dim / 2); None for
    RoPE variants other than the plain one (they take per-row offsets themselves)."""
    rope = dec.rope
    if type(rope) is not nn.RoPE or rope.dims != dec.config.head_dim:
        return None
    half = rope.dims // 2
    inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(rope.base) / half))
    angles = (positions.astype(mx.float32) * rope.scale)[..., None] * inv_freqs
    angles = angles[:, None, :, :]
    return mx.cos(angles), mx.sin(angles)


def verify_step(
    dec: Decoder,
    inputs: mx.array,
    starts: mx.array,
    keys: list[mx.array],
    values: list[mx.array],
    *,
    embed: bool,
    project: bool,
    quant: KvQuant | None = None,
    first: int | None = None,
) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """`inputs`: token ids (rows, width) when `embed`, else hidden states (rows, width, hidden);
    `starts` (rows,): each row's first position. Returns logits (rows, width, vocab) when
    `project`, else hidden states, and the updated KV arrays (as `step.decode_step`).
    `first`: the inputs are rows [first, first + rows) of caches holding more rows (a
    micro-batch); None: one input row per cache row."""
    h = embed_tokens(dec, inputs) if embed else inputs
    if fused_layers(dec):
        h, new_keys, new_values = _fused_verify_layers(dec, h, starts, keys, values, first,
                                                       quant)
        return (project_logits(dec, h) if project else h), new_keys, new_values
    rows, width = h.shape[0], h.shape[1]
    capacity = keys[0].shape[2]
    kv_heads, hd = dec.local_kv_heads, dec.config.head_dim
    group_size = dec.local_heads // kv_heads
    scale = hd**-0.5
    eps = dec.config.rms_norm_eps
    positions = starts[:, None] + mx.arange(width)[None, :]  # (rows, width)

    def grouped_mask(window: int) -> mx.array:
        # (rows, width, capacity); sliding layers also mask what lies behind their window.
        mask = attention_window.additive(attention_window.visible(positions, capacity, window),
                                         h.dtype)
        # Queries are laid out (rows, kv_heads, group * width, hd): the mask repeats per group.
        mask = mx.broadcast_to(mask[:, None, None], (rows, 1, group_size, width, capacity))
        return mask.reshape(rows, 1, group_size * width, capacity)

    masks = {w: grouped_mask(w) for w in {attention_window.window_of(dec, i)
                                          for i in range(len(dec.layers))}}
    parts = 1 if quant is None else 3
    writes = _CacheWrites.at_positions(positions, keys[:parts], kv_heads, first)
    angles = _rope_angles(dec, positions)
    new_keys, new_values = [], []
    for i, layer in enumerate(dec.layers):
        k_cache, v_cache = keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts]
        q, k_new, v_new = new_layer_kv(dec, layer, h, angles, starts, quant)
        k_cache, v_cache = writes.layer(k_cache, v_cache, k_new, v_new, new_keys, new_values)
        window = attention_window.window_of(dec, i)
        sinks = layer.attn.sinks  # gpt_oss's, laid out as the grouped queries are
        attn = None
        if not window and sinks is None:
            attn = _kernel_attention(q, k_cache, v_cache, starts, scale, quant)
        if attn is None:
            # q (rows, heads, width, hd) with heads = kv_heads * group: one matmul per KV head.
            qg = q.reshape(rows, kv_heads, group_size * width, hd) * scale
            attn = cached_attention(qg, k_cache, v_cache, masks[window], quant,
                                    None if sinks is None else
                                    attention_sinks.grouped(sinks, kv_heads, width))
            attn = attn.reshape(rows, kv_heads * group_size, width, hd).transpose(0, 2, 1, 3)
            attn = attn.reshape(rows, width, kv_heads * group_size * hd)
        h = h + _all_sum(projection(attn, layer.attn.o), dec.group)
        h = h + _mlp(dec, layer, mx.fast.rms_norm(h, layer.ffn_norm, eps))
    out = project_logits(dec, h) if project else h
    return out, new_keys, new_values


def _fused_verify_layers(dec: Decoder, h: mx.array, starts: mx.array, keys: list[mx.array],
                         values: list[mx.array], first: int | None, quant: KvQuant | None
                         ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The decode step's fused layers (`step._fused_decode_layers`: norm with the previous
    residual add, the qkv projection, one kernel splitting and roping q, k, v, the cache writes,
    the attention kernel, the projections through `step.projection`) for `width` positions a
    row: the row's positions fold into the projections' row dimension (`projection` takes the
    few-row kernel up to `kernels.DENSE_MAX_ROWS` of them and the BLAS GEMM beyond), and the
    attention is one decode-kernel call per position (`_kernel_attention`). The op-by-op path
    cost ~40 ops a layer instead of ~12 and its output projection bypassed the few-row kernel.
    `first`: as `verify_step`'s (a micro-batch's rows of a larger cache)."""
    eps = dec.config.rms_norm_eps
    inv_freqs = _inv_freqs(dec)
    width = h.shape[1]
    kv_heads, hd = dec.local_kv_heads, dec.config.head_dim
    scale = hd**-0.5
    parts = 1 if quant is None else 3
    positions = starts[:, None] + mx.arange(width)[None, :]  # (rows, width)
    flat = positions.reshape(-1)  # token t of row r at flat[r * width + t], as rope_qkv reads
    writes = _CacheWrites.at_positions(positions, keys[:parts], kv_heads, first)
    new_keys, new_values = [], []
    delta: mx.array | None = None
    for i, layer in enumerate(dec.layers):
        h, q, k, v = _fused_layer_qkv(dec, layer, h, delta, flat, inv_freqs)
        k_new, v_new = packed_kv(k, v, quant)
        k_cache, v_cache = keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts]
        k_cache, v_cache = writes.layer(k_cache, v_cache, k_new, v_new, new_keys, new_values)
        attn = _kernel_attention(q, k_cache, v_cache, starts, scale, quant)
        assert attn is not None  # fused_layers checked the kernels are loaded
        h, x = kernels.add_rms_norm(h, _all_sum(projection(attn, layer.attn.o), dec.group),
                                    layer.ffn_norm, eps)
        delta = _mlp(dec, layer, x)
    assert delta is not None
    return h + delta, new_keys, new_values


@dataclass(frozen=True)
class _CacheWrites:
    """Where a verify step's new keys and values go: `wheres` (per cache array's last dim) for
    one input row per cache row, or `at` (row, head, position) indices into a cache holding
    more rows, whose rows `first:first + rows` the step reads (a micro-batch)."""

    wheres: dict[int, mx.array]
    at: tuple[mx.array, mx.array, mx.array] | None
    first: int | None
    rows: int

    @staticmethod
    def at_positions(positions: mx.array, caches: list[mx.array], kv_heads: int,
                     first: int | None) -> _CacheWrites:
        rows, width = positions.shape
        wheres = {a.shape[3]: mx.broadcast_to(positions[:, None, :, None],
                                              (rows, kv_heads, width, a.shape[3]))
                  for a in caches}
        # A micro-batch's entries go straight into the whole cache: (row, head, position) each.
        at = None if first is None else (
            (mx.arange(rows) + first)[:, None, None], mx.arange(kv_heads)[None, :, None],
            positions[:, None, :])
        return _CacheWrites(wheres, at, first, rows)

    def layer(self, k_cache: list[mx.array], v_cache: list[mx.array], k_new: list[mx.array],
              v_new: list[mx.array], new_keys: list[mx.array], new_values: list[mx.array]
              ) -> tuple[list[mx.array], list[mx.array]]:
        """Write one layer's new keys and values, append the written arrays to `new_keys` /
        `new_values` (the step's outputs), and return what attention reads: the whole cache,
        or a micro-batch's rows of it."""
        if self.at is None:
            k_cache, v_cache = write_layer_kv(k_cache, v_cache, self.wheres, k_new, v_new)
            new_keys.extend(k_cache)
            new_values.extend(v_cache)
            return k_cache, v_cache
        at = self.at
        k_cache = [_write_rows(c, at, n) for c, n in zip(k_cache, k_new, strict=True)]
        v_cache = [_write_rows(c, at, n) for c, n in zip(v_cache, v_new, strict=True)]
        new_keys.extend(k_cache)
        new_values.extend(v_cache)
        assert self.first is not None
        stop = self.first + self.rows
        return [c[self.first:stop] for c in k_cache], [c[self.first:stop] for c in v_cache]


def _kernel_attention(q: mx.array, k_cache: list[mx.array], v_cache: list[mx.array],
                      starts: mx.array, scale: float, quant: KvQuant | None) -> mx.array | None:
    """q (rows, heads, width, hd) over the caches as `width` one-query steps of the decode
    attention kernel, query j of row r seeing keys [0, starts[r] + j]: (rows, width, heads *
    hd), or None where the kernel is not in use. MLX's CPU softmax over (rows, heads, width,
    capacity) scores was most of a wide verify step (8 rows x 13 positions: 10 ms a layer,
    against 4 ms for the kernel calls, `bench.speculative_cost`'s shapes)."""
    k = k_cache if quant is not None else k_cache[0]
    v = v_cache if quant is not None else v_cache[0]
    outs = []
    for j in range(q.shape[2]):
        out = kernels.decode_attention(mx.contiguous(q[:, :, j:j + 1, :]), k, v, starts + j,
                                       scale=scale, quant=quant)
        if out is None:
            return None
        outs.append(out)
    return mx.concatenate(outs, axis=1)


def _write_rows(cache: mx.array, at: tuple[mx.array, mx.array, mx.array], new: mx.array
                ) -> mx.array:
    """`new` (rows, kv_heads, width, dim) into `cache` at each (row, head, position)."""
    cache[at] = new
    return cache


def make_verify_fn(dec: Decoder, *, compiled: bool, embed: bool | None = None,
                   project: bool | None = None, quant: KvQuant | None = None
                   ) -> Callable[..., Any]:
    """The verification step as a function of arrays only (inputs, starts, then the keys'
    arrays and the values'), compiled per shape when asked."""
    embed = dec.embeds if embed is None else embed
    project = dec.projects if project is None else project

    def step(inputs: mx.array, starts: mx.array, *kv: mx.array) -> tuple[mx.array, ...]:
        half = len(kv) // 2
        out, keys, values = verify_step(dec, inputs, starts, list(kv[:half]), list(kv[half:]),
                                        embed=embed, project=project, quant=quant)
        return (out, *keys, *values)

    return mx.compile(step) if compiled else step


class RowsVerify(RowRangeSteps):
    """Verify-step functions over a row range: a verify micro-batch. A step over every row
    should use `make_verify_fn`'s."""

    def __init__(self, dec: Decoder, **options: Any) -> None:
        super().__init__(verify_step, dec, **options)
