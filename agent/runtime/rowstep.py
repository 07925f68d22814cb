"""The decode step of a micro-batch: a contiguous range of KV rows [first, first + n).

The whole-batch step (`step.decode_step`) computes every row of the cache. A micro-batch must
leave the other rows alone (another micro-batch may be in flight with them) and must not copy
the cache: at 8 rows of SmolLM2 a slice-and-write-back step cost about 40% more than a plain
step over an 8-row cache. So this step writes each row's new key and value straight into the
whole cache with one scatter (in place: `KvSlots.step_in_place` hands the arrays over), and
attends over the range's rows as a slice, a contiguous block since rows are the leading axis.
Per row it is the same arithmetic as `decode_step`, so a row gives the same logits in either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from agent.runtime import attention_window, kernels
from agent.runtime.kv import KvQuant
from agent.runtime.model import Decoder
from agent.runtime.step import (
    NEG_INF,
    _all_sum,
    _fused_layer_qkv,
    _inv_freqs,
    _mlp,
    _rope_angles,
    _whole_layers,
    embed_tokens,
    fused_layers,
    kernel_layer_attention,
    new_layer_kv,
    one_token_attention,
    project_logits,
    projection,
    whole_kernel_layers,
)


def rows_decode_step(dec: Decoder, inputs: mx.array, positions: mx.array, keys: list[mx.array],
                     values: list[mx.array], *, first: int, embed: bool, project: bool,
                     quant: KvQuant | None = None
                     ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """`decode_step` for rows [first, first + len(positions)) of caches holding more rows."""
    h = embed_tokens(dec, inputs)[:, None, :] if embed else inputs
    if fused_layers(dec):
        h, new_keys, new_values = _fused_rows_layers(dec, h, positions, keys, values, first, quant)
        return (project_logits(dec, h[:, 0, :]) if project else h), new_keys, new_values
    rows = h.shape[0]
    stop = first + rows
    capacity = keys[0].shape[2]
    kv_heads = dec.local_kv_heads
    group_size = dec.local_heads // kv_heads
    eps = dec.config.rms_norm_eps
    visible = mx.arange(capacity)[None, :] <= positions[:, None]
    mask = mx.where(visible, 0.0, NEG_INF).astype(h.dtype)[:, None, None, :]
    parts = 1 if quant is None else 3
    # Where each row's new entry goes in the whole cache: (row, head, position), (rows, kv).
    at = ((mx.arange(rows) + first)[:, None], mx.arange(kv_heads)[None, :], positions[:, None])
    angles = _rope_angles(dec, positions)
    new_keys, new_values = [], []
    for i, layer in enumerate(dec.layers):
        k_cache, v_cache = keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts]
        q, k_new, v_new = new_layer_kv(dec, layer, h, angles, positions, quant)
        k_cache = [_write(c, at, n) for c, n in zip(k_cache, k_new, strict=True)]
        v_cache = [_write(c, at, n) for c, n in zip(v_cache, v_new, strict=True)]
        new_keys.extend(k_cache)
        new_values.extend(v_cache)
        k_rows = [c[first:stop] for c in k_cache]
        v_rows = [c[first:stop] for c in v_cache]
        # The same attention as the whole-batch step (the fused kernel where it runs), so
        # splitting a batch into micro-batches never trades it for a slower path.
        window = attention_window.window_of(dec, i)  # sliding layers mask behind the window
        attn = one_token_attention(q, k_rows, v_rows, positions, attention_window.decode_mask(
            positions, capacity, window, h.dtype) if window else mask, quant, group_size,
            fused_ok=not window, sinks=layer.attn.sinks)
        h = h + _all_sum(projection(attn, layer.attn.o), dec.group)
        h = h + _mlp(dec, layer, mx.fast.rms_norm(h, layer.ffn_norm, eps))
    out = project_logits(dec, h[:, 0, :]) if project else h
    return out, new_keys, new_values


def _fused_rows_layers(dec: Decoder, h: mx.array, positions: mx.array, keys: list[mx.array],
                       values: list[mx.array], first: int, quant: KvQuant | None
                       ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The layers of `step._fused_decode_layers` (norm with the residual add, qkv, one kernel
    splitting and roping q, k, v, the attention kernel) for a row range: a micro-batch's step
    was op by op (~40 ops a layer instead of ~12), which made two micro-batches cost their
    stages far more than one whole-batch step. Where the whole-batch step takes the whole-layer
    kernels (`step._whole_layers`: a single stage's dense float32 layers, at most
    `kernels.DENSE_MAX_ROWS` rows) so does this one, over the range's rows."""
    eps = dec.config.rms_norm_eps
    inv_freqs = _inv_freqs(dec)
    rows = h.shape[0]
    stop = first + rows
    kv_heads = dec.local_kv_heads
    hd = dec.config.head_dim
    parts = 1 if quant is None else 3
    at = ((mx.arange(rows) + first)[:, None], mx.arange(kv_heads)[None, :], positions[:, None])

    def write(ks: list[mx.array], vs: list[mx.array], k_new: list[mx.array],
              v_new: list[mx.array]) -> tuple[list[mx.array], list[mx.array]]:
        return ([_write(c, at, n) for c, n in zip(ks, k_new, strict=True)],
                [_write(c, at, n) for c, n in zip(vs, v_new, strict=True)])

    def view(c: mx.array) -> mx.array:
        return c[first:stop]

    new_keys, new_values = [], []
    if _whole_layers(dec, rows):
        # As `step._whole_decode_layers`, which the whole-batch step takes at these few rows:
        # entry and block kernels, 5 ops a layer instead of ~12 (each op a pass over its rows).
        return whole_kernel_layers(dec, h, positions, keys, values, quant, write, view)
    delta: mx.array | None = None
    for i, layer in enumerate(dec.layers):
        h, q, k, v = _fused_layer_qkv(dec, layer, h, delta, positions, inv_freqs)
        attn, k_cache, v_cache = kernel_layer_attention(
            q, k, v, keys[i * parts:(i + 1) * parts], values[i * parts:(i + 1) * parts],
            positions, hd, quant, write, view)
        new_keys.extend(k_cache)
        new_values.extend(v_cache)
        h, x = kernels.add_rms_norm(h, _all_sum(projection(attn, layer.attn.o), dec.group),
                                    layer.ffn_norm, eps)
        delta = _mlp(dec, layer, x)
    assert delta is not None
    return h + delta, new_keys, new_values


def _write(cache: mx.array, at: tuple[mx.array, mx.array, mx.array], new: mx.array) -> mx.array:
    """`new` (rows, kv_heads, 1, dim) into `cache` at each row's (row, head, position)."""
    cache[at] = new[:, :, 0, :]
    return cache


class RowRangeSteps:
    """Step functions over a row range, one compiled function per first row (and shape), built
    from `step_fn(dec, inputs, positions, keys, values, *, first, embed, project, quant)`:
    `RowsDecode` (a micro-batch's decode step) and `verify.RowsVerify` (its verify step)."""

    def __init__(self, step_fn: Callable[..., tuple[mx.array, list[mx.array], list[mx.array]]],
                 dec: Decoder, *, compiled: bool, embed: bool | None = None,
                 project: bool | None = None, quant: KvQuant | None = None) -> None:
        self.step_fn = step_fn
        self.dec = dec
        self.embed = dec.embeds if embed is None else embed
        self.project = dec.projects if project is None else project
        self.quant = quant
        self.compiled = compiled
        self.fns: dict[int, Callable[..., Any]] = {}

    def __call__(self, first: int) -> Callable[..., Any]:
        fn = self.fns.get(first)
        if fn is None:
            fn = self.fns[first] = self._build(first)
        return fn

    def _build(self, first: int) -> Callable[..., Any]:
        step_fn, dec, embed, project, quant = (self.step_fn, self.dec, self.embed, self.project,
                                               self.quant)

        def step(inputs: mx.array, positions: mx.array, *kv: mx.array) -> tuple[mx.array, ...]:
            half = len(kv) // 2
            out, keys, values = step_fn(dec, inputs, positions, list(kv[:half]),
                                        list(kv[half:]), first=first, embed=embed,
                                        project=project, quant=quant)
            return (out, *keys, *values)

        return mx.compile(step) if self.compiled else step


class RowsDecode(RowRangeSteps):
    """Decode-step functions over a row range. A step over every row should use the plain
    decode function (`make_decode_fn`)."""

    def __init__(self, dec: Decoder, **options: Any) -> None:
        super().__init__(rows_decode_step, dec, **options)
