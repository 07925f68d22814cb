"""The extension's few-row projection (native/flockdense.cpp, `kernels.dense`) computes x @ W.T
as MLX does: 1 to 16 rows, odd output and input widths (the kernel's row blocks and tails), a
strided x, a transposed (non-contiguous) weight, 1 and 2 threads; a row's result does not depend
on the other rows of the batch; beyond DENSE_MAX_ROWS rows it declines (the BLAS's GEMM)."""

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
