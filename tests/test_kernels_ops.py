"""The extension's fused small ops (native/flockops.cpp) and its quantized-cache reads compute
what MLX's own ops compute: RMSNorm (with the residual add), SwiGLU, rope + the q/k/v split
against step.py's and nn.RoPE's, decode and prefill attention over a 4/8-bit cache against
dequantize-then-attend, the split long-context decode; head dims 64/128, grouped and ungrouped
heads, odd lengths, rows at different positions, 1 and 2 threads. And SmolLM2's prefill and
decode give the same greedy ids (logits within float32 tolerance) with the kernels on and off,
float32 and 8-bit caches."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from agent.runtime import kernels
from agent.runtime import step as st
from agent.runtime.kv import KvGeometry, KvQuant, KvSlots

ATOL = 2e-5

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not (kernels.NATIVE_DIR / kernels.kernel_filename()).is_file(),
    reason="the kernels are built on Linux by `make native`")


@pytest.fixture(autouse=True, scope="module")
def loaded() -> Iterator[None]:
    assert kernels.set_enabled(True)
    yield
    kernels.set_threads(kernels._default_threads())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 1, 64), (1, 301, 576)])
def test_rms_norm_and_residual_add_match_mlx(threads: int, shape: tuple[int, ...]) -> None:
    kernels.set_threads(threads)
    h, delta = mx.random.normal(shape), mx.random.normal(shape)
    w = mx.random.normal((shape[-1],))
    want = mx.fast.rms_norm(h, w, 1e-5)
    assert mx.allclose(kernels.rms_norm(h, w, 1e-5), want, atol=ATOL).item()
    # A strided view (a transpose) reads the same rows.
    t = mx.random.normal((shape[-1], shape[1])).T
    assert mx.allclose(kernels.rms_norm(t, w, 1e-5), mx.fast.rms_norm(t, w, 1e-5),
                       atol=ATOL).item()
    summed, normed = kernels.add_rms_norm(h, delta, w, 1e-5)
    assert mx.array_equal(summed, h + delta).item()
    assert mx.allclose(normed, mx.fast.rms_norm(h + delta, w, 1e-5), atol=ATOL).item()


@pytest.mark.parametrize("threads", [1, 2])
def test_swiglu_matches_mlx(threads: int) -> None:
    kernels.set_threads(threads)
    for shape in ((1, 1, 2 * 1536), (2, 77, 2 * 96)):
        gate_up = 4 * mx.random.normal(shape)
        gate, up = mx.split(gate_up, 2, axis=-1)
        want = gate * mx.sigmoid(gate) * up
        assert mx.allclose(kernels.swiglu(gate_up), want, atol=ATOL, rtol=1e-5).item()


class _Dec:
    """Just what step's rope helpers read from a Decoder."""

    def __init__(self, head_dim: int, traditional: bool) -> None:
        self.rope = nn.RoPE(head_dim, traditional=traditional, base=10000.0)
        self.config = type("Config", (), {"head_dim": head_dim})()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128)])
def test_rope_qkv_matches_the_split_and_rope_it_replaces(threads: int, traditional: bool,
                                                         heads: int, kv_heads: int,
                                                         head_dim: int) -> None:
    kernels.set_threads(threads)
    dec = _Dec(head_dim, traditional)
    inv = st._inv_freqs(dec)  # type: ignore[arg-type]
    width = (heads + 2 * kv_heads) * head_dim

    def split(qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        rows, n, _ = qkv.shape
        q, k, v = mx.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
        return (q.reshape(rows, n, heads, head_dim).transpose(0, 2, 1, 3),
                k.reshape(rows, n, kv_heads, head_dim).transpose(0, 2, 1, 3),
                v.reshape(rows, n, kv_heads, head_dim).transpose(0, 2, 1, 3))

    # Decode: one token a row, each row at its own position (step._apply_rope's angles).
    positions = mx.array([0, 1, 63, 200, 4095], dtype=mx.int32)
    qkv = mx.random.normal((5, 1, width))
    q, k, v = kernels.rope_qkv(qkv, positions, inv, heads=heads, kv_heads=kv_heads,
                               rope_scale=1.0, traditional=traditional)
    rq, rk, rv = split(qkv)
    angles = st._rope_angles(dec, positions)  # type: ignore[arg-type]
    assert angles is not None
    assert mx.allclose(q, st._apply_rope(dec, rq, angles), atol=1e-4).item()  # type: ignore[arg-type]
    assert mx.allclose(k, st._apply_rope(dec, rk, angles), atol=1e-4).item()  # type: ignore[arg-type]
    assert mx.array_equal(v, rv).item()
    # Prefill: a chunk of 37 tokens at offset 100 (nn.RoPE's offset).
    qkv = mx.random.normal((1, 37, width))
    q, k, v = kernels.rope_qkv(qkv, mx.arange(100, 137, dtype=mx.int32), inv, heads=heads,
                               kv_heads=kv_heads, rope_scale=1.0, traditional=traditional)
    rq, rk, rv = split(qkv)
    assert mx.allclose(q, dec.rope(rq, offset=100), atol=1e-4).item()
    assert mx.allclose(k, dec.rope(rk, offset=100), atol=1e-4).item()
    assert mx.array_equal(v, rv).item()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "n", "heads", "kv_heads", "head_dim"),
                         [(5, 1, 16, 4, 64), (1, 37, 4, 4, 128)])
def test_rope_norm_qkv_norms_each_q_and_k_head_before_rope(threads: int, rows: int, n: int,
                                                           heads: int, kv_heads: int,
                                                           head_dim: int) -> None:
    # qwen3's attention: mx.fast.rms_norm over each q and k head, then RoPE.
    kernels.set_threads(threads)
    dec = _Dec(head_dim, False)
    inv = st._inv_freqs(dec)  # type: ignore[arg-type]
    qkv = mx.random.normal((rows, n, (heads + 2 * kv_heads) * head_dim)) * 3
    q_norm, k_norm = mx.random.uniform(0.5, 1.5, (head_dim,)), mx.random.normal((head_dim,))
    positions = mx.arange(200, 200 + rows * n, dtype=mx.int32)
    q, k, v = kernels.rope_qkv(qkv, positions, inv, heads=heads, kv_heads=kv_heads,
                               rope_scale=1.0, traditional=False, norms=(q_norm, k_norm),
                               eps=1e-6)
    rq, rk, rv = mx.split(qkv.reshape(rows, n, heads + 2 * kv_heads, head_dim),
                          [heads, heads + kv_heads], axis=2)
    rq, rk = mx.fast.rms_norm(rq, q_norm, 1e-6), mx.fast.rms_norm(rk, k_norm, 1e-6)
    for got, want in ((q, rq), (k, rk)):
        want = want.transpose(0, 2, 1, 3)
        if n == 1:
            angles = st._rope_angles(dec, positions)  # type: ignore[arg-type]
            assert angles is not None
            want = st._apply_rope(dec, want, angles)  # type: ignore[arg-type]
        else:
            want = dec.rope(want, offset=200)
        assert mx.allclose(got, want, atol=1e-4).item()
    assert mx.array_equal(v, rv.transpose(0, 2, 1, 3)).item()


def _quantized(x: mx.array, quant: KvQuant) -> list[mx.array]:
    return list(mx.quantize(x, group_size=quant.group, bits=quant.bits))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128)])
def test_decode_reads_the_quantized_cache_as_the_quantized_matmuls_do(
        threads: int, bits: int, heads: int, kv_heads: int, head_dim: int) -> None:
    kernels.set_threads(threads)
    quant = KvQuant(bits, 64)
    rows, capacity = 4, 300
    q = mx.random.normal((rows, heads, 1, head_dim))
    kq = _quantized(mx.random.normal((rows, kv_heads, capacity, head_dim)), quant)
    vq = _quantized(mx.random.normal((rows, kv_heads, capacity, head_dim)), quant)
    positions = mx.array([0, 64, 199, 299], dtype=mx.int32)
    got = kernels.decode_attention(q, kq, vq, positions, scale=head_dim**-0.5, quant=quant)
    assert got is not None
    visible = mx.arange(capacity)[None, :] <= positions[:, None]
    mask = mx.where(visible, 0.0, st.NEG_INF)[:, None, None, :]
    qg = q.reshape(rows, kv_heads, heads // kv_heads, head_dim) * head_dim**-0.5
    want = st.cached_attention(qg, kq, vq, mask, quant).reshape(rows, 1, -1)
    assert mx.allclose(got, want, atol=1e-4).item()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "offset", "n"),
                         [(9, 3, 64, 0, 77), (4, 4, 128, 130, 259), (8, 2, 128, 5, 1)])
def test_prefill_reads_the_quantized_cache_as_dequantize_then_sdpa(
        threads: int, bits: int, heads: int, kv_heads: int, head_dim: int, offset: int,
        n: int) -> None:
    kernels.set_threads(threads)
    quant = KvQuant(bits, 64)
    q = mx.random.normal((1, heads, n, head_dim))
    kq = _quantized(mx.random.normal((1, kv_heads, offset + n, head_dim)), quant)
    vq = _quantized(mx.random.normal((1, kv_heads, offset + n, head_dim)), quant)
    got = kernels.prefill_attention(q, kq, vq, scale=head_dim**-0.5, offset=offset, quant=quant)
    k = mx.dequantize(*kq, group_size=64, bits=bits)
    v = mx.dequantize(*vq, group_size=64, bits=bits)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5,
                                                mask="causal" if n > 1 else None)
    assert mx.allclose(got, want.transpose(0, 2, 1, 3).reshape(1, n, -1), atol=1e-4).item()


@pytest.mark.parametrize("threads", [1, 2])
def test_long_single_row_decode_split_across_threads_matches(threads: int) -> None:
    """One row of 5,000 keys: the keys are split across the threads and the partial softmaxes
    merged (with one thread, one pass)."""
    kernels.set_threads(threads)
    heads, kv_heads, hd, capacity = 9, 3, 64, 5120
    q = mx.random.normal((1, heads, 1, hd))
    k = mx.random.normal((1, kv_heads, capacity, hd))
    v = mx.random.normal((1, kv_heads, capacity, hd))
    positions = mx.array([4999], dtype=mx.int32)
    got = kernels.decode_attention(q, k, v, positions, scale=hd**-0.5)
    ref = mx.fast.scaled_dot_product_attention(q, k[:, :, :5000], v[:, :, :5000], scale=hd**-0.5)
    assert got is not None
    assert mx.allclose(got, ref.reshape(1, 1, -1), atol=ATOL).item()


def _greedy_run(dec: st.Decoder, bits: int | None, on: bool) -> list[mx.array]:
    """Three prompts prefilled (one in two chunks), then two batched greedy decode steps;
    every logits array along the way."""
    kernels.set_enabled(on)
    geometry = KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim, bits=bits)
    kv = KvSlots(geometry)
    for row in range(3):
        kv.acquire(f"r{row}", 300)
    logits = []
    lengths = [37, 5, 130]
    for row, n in enumerate(lengths):
        tokens = mx.array([(7 * j + row) % 1000 + 3 for j in range(n)])
        cut = n - 20 if n > 30 else n
        out = st.prefill(dec, tokens[:cut], 0, row, kv.keys, kv.values, quant=geometry.quant)
        if cut < n:
            out = st.prefill(dec, tokens[cut:], cut, row, kv.keys, kv.values,
                             quant=geometry.quant)
        mx.eval(out, kv.keys, kv.values)
        logits.append(out)
    step = st.make_decode_fn(dec, compiled=True, quant=geometry.quant)
    tokens = mx.array([5, 6, 7] + [0] * (kv.rows - 3))
    positions = mx.array(lengths + [0] * (kv.rows - 3))
    for _ in range(2):
        out = step(tokens, positions, *kv.keys, *kv.values)
        half = len(kv.keys)
        kv.keys, kv.values = list(out[1:1 + half]), list(out[1 + half:])
        mx.eval(out[0], kv.keys, kv.values)
        logits.append(out[0][:3])
        tokens = mx.argmax(out[0], axis=-1).astype(mx.int32)
        positions = positions + 1
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 8])
def test_smollm2_prefill_and_decode_equal_with_the_kernels_on_and_off(
        smollm2_dir: Path, bits: int | None) -> None:
    from agent.runtime.model import load_decoder

    dec = load_decoder(smollm2_dir, fuse=True)
    assert st.fused_layers(dec) is True
    try:
        off = _greedy_run(dec, bits, on=False)
        on = _greedy_run(dec, bits, on=True)
    finally:
        kernels.set_enabled(True)
    # With a quantized cache a float32-rounding difference upstream can move a key across a
    # quantization step (1/255 of its group's range at 8 bits), so the logits agree less
    # closely there (measured up to 0.22 on logits of magnitude ~20); the greedy ids still agree.
    atol = 2e-3 if bits is None else 1.0
    for a, b in zip(off, on, strict=True):
        assert mx.array_equal(mx.argmax(a, axis=-1), mx.argmax(b, axis=-1)).item()
        assert mx.allclose(a, b, atol=atol, rtol=1e-4).item(), mx.abs(a - b).max().item()


def test_inv_freqs_are_the_ones_rope_uses() -> None:
    dec = _Dec(64, False)
    half = 32
    want = [math.exp(-i * math.log(10000.0) / half) for i in range(half)]
    got = st._inv_freqs(dec).tolist()  # type: ignore[arg-type]
    assert all(abs(a - b) < 1e-6 for a, b in zip(got, want, strict=True))
