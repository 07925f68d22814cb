"""The extension's few-row projection (native/flockdense.cpp, `kernels.dense`) computes x @ W.T
as MLX does: 1 to 16 rows, odd output and input widths (the kernel's row blocks and tails), a
strided x, a transposed (non-contiguous) weight, 1 and 2 threads; a row's result does not depend
on the other rows of the batch; beyond DENSE_MAX_ROWS rows it declines (the BLAS's GEMM). The
whole-layer decode kernels (native/flocklayer.cpp) equal the ops they replace."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import mlx.core as mx
import pytest

from agent.runtime import kernels
from agent.runtime import step as st
from agent.runtime.model import Dense

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not (kernels.NATIVE_DIR / kernels.kernel_filename()).is_file(),
    reason="the kernels are built on Linux by `make native`")


@pytest.fixture(autouse=True, scope="module")
def loaded() -> Iterator[None]:
    assert kernels.set_enabled(True)
    yield
    kernels.set_threads(kernels._default_threads())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize(("out", "inp"), [(960, 576), (101, 37), (4099, 64)])
def test_dense_matches_the_matmul(threads: int, rows: int, out: int, inp: int) -> None:
    kernels.set_threads(threads)
    x, w = mx.random.normal((rows, 1, inp)), mx.random.normal((out, inp)) / inp**0.5
    mx.eval(x, w)
    got = kernels.dense(x, w)
    assert got is not None and got.shape == (rows, 1, out)
    assert mx.allclose(got, x @ w.T, atol=2e-5, rtol=1e-5).item()
    # Each row alone gives the same bits as within the batch.
    assert mx.array_equal(kernels.dense(x[rows - 1:], w), got[rows - 1:]).item()


def test_dense_reads_strided_inputs_and_a_transposed_weight() -> None:
    x = mx.random.normal((96, 4)).T  # rows of x 1 apart, elements 4 apart
    w = mx.random.normal((96, 200)).T  # (200, 96), not row-contiguous
    mx.eval(x, w)
    got = kernels.dense(x, w)
    assert got is not None
    assert mx.allclose(got, x @ w.T, atol=1e-4, rtol=1e-5).item()


def test_dense_declines_wide_products_and_projection_falls_back() -> None:
    x, w = mx.random.normal((kernels.DENSE_MAX_ROWS + 1, 64)), mx.random.normal((32, 64))
    assert kernels.dense(x, w) is None
    assert mx.allclose(st.projection(x, Dense(w)), x @ w.T, atol=1e-5).item()
    bias = mx.random.normal((32,))
    assert mx.allclose(st.projection(x[:2], Dense(w, bias)), x[:2] @ w.T + bias,
                       atol=1e-5).item()


def _rand(*shape: int) -> mx.array:
    return mx.random.normal(shape) / shape[-1] ** 0.5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128)])
@pytest.mark.parametrize("traditional", [False, True])
def test_layer_entry_is_norm_qkv_and_rope(threads: int, rows: int, heads: int, kv_heads: int,
                                          head_dim: int, traditional: bool) -> None:
    kernels.set_threads(threads)
    dim = 192
    h, norm_w = mx.random.normal((rows, 1, dim)), mx.random.normal((dim,))
    qkv_w = _rand((heads + 2 * kv_heads) * head_dim, dim)
    positions = mx.array([3 + 700 * r for r in range(rows)], dtype=mx.int32)
    inv = mx.exp(mx.arange(0, -head_dim // 2, -1, dtype=mx.float32)
                 * (9.21 / (head_dim // 2)))
    mx.eval(h, norm_w, qkv_w, inv)
    got = kernels.layer_entry(h, norm_w, qkv_w, positions, inv, heads=heads, kv_heads=kv_heads,
                              eps=1e-5, rope_scale=1.0, traditional=traditional)
    qkv = mx.fast.rms_norm(h, norm_w, 1e-5) @ qkv_w.T
    want = kernels.rope_qkv(qkv, positions, inv, heads=heads, kv_heads=kv_heads, rope_scale=1.0,
                            traditional=traditional)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert mx.allclose(g, w, atol=1e-4, rtol=1e-4).item()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_layer_block_is_o_residual_norm_and_mlp(threads: int, rows: int) -> None:
    kernels.set_threads(threads)
    dim, attn_dim, ffn = 192, 256, 520
    h, attn = mx.random.normal((rows, 1, dim)), mx.random.normal((rows, 1, attn_dim))
    o_w, norm_w = _rand(dim, attn_dim), mx.random.normal((dim,))
    gate_up_w, down_w = _rand(2 * ffn, dim), _rand(dim, ffn)
    mx.eval(h, attn, o_w, norm_w, gate_up_w, down_w)
    got = kernels.layer_block(h, attn, o_w, norm_w, gate_up_w, down_w, 1e-5)
    s = h + attn @ o_w.T
    gate, up = mx.split(mx.fast.rms_norm(s, norm_w, 1e-5) @ gate_up_w.T, 2, axis=-1)
    want = s + (gate * mx.sigmoid(gate) * up) @ down_w.T
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
