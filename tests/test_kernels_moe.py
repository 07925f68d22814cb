"""The extension's mixture-of-experts kernel (native/flockmoe.cpp, `kernels.moe_experts`) equals
the gather matmuls it replaces (moe.experts and the weighted sum): 1 to 16 rows, top 1 to 4,
widths that are not a multiple of its chunk, rows sharing experts, 1 to 3 threads; a row's
result does not depend on the other rows of the batch nor on the thread count; it declines
beyond DENSE_MAX_ROWS rows and for other dtypes (the gather path keeps them)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import mlx.core as mx
import pytest

from agent.runtime import kernels, moe
from agent.runtime.model import Dense, FusedGateUp, SparseMoe

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not (kernels.NATIVE_DIR / kernels.kernel_filename()).is_file(),
    reason="the kernels are built on Linux by `make native`")


@pytest.fixture(autouse=True, scope="module")
def loaded() -> Iterator[None]:
    assert kernels.set_enabled(True)
    yield
    kernels.set_enabled(True)
    kernels.set_threads(kernels._default_threads())


def _moe(experts: int, width: int, hidden: int, top_k: int) -> SparseMoe:
    gate_up = mx.random.normal((experts, 2 * width, hidden)) / hidden**0.5
    down = mx.random.normal((experts, width, hidden)) / width**0.5
    router = mx.random.normal((experts, hidden))
    mx.eval(gate_up, down, router)
    return SparseMoe(router=Dense(router), gate_up=FusedGateUp(Dense(gate_up)), down=Dense(down),
                     top_k=top_k, routing="softmax_topk", norm_topk=True,
                     top_from_negated=False)


def _gathered(m: SparseMoe, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
    kernels.set_enabled(False)
    try:
        out = (moe.experts(m, x, inds) * scores[..., None]).sum(axis=-2)
        mx.eval(out)
        return out
    finally:
        kernels.set_enabled(True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "top_k"), [(1, 4), (2, 1), (5, 2), (8, 4), (16, 3)])
@pytest.mark.parametrize(("experts", "width", "hidden"), [(8, 96, 80), (4, 130, 33)])
def test_moe_experts_matches_the_gather_matmuls(threads: int, rows: int, top_k: int,
                                               experts: int, width: int, hidden: int) -> None:
    kernels.set_threads(threads)
    m = _moe(experts, width, hidden, top_k)
    x = mx.random.normal((rows, 1, hidden))
    inds, scores = moe.route(m, x @ m.router.weight.T)
    mx.eval(x, inds, scores)
    got = kernels.moe_experts(x, inds, scores, m.gate_up.gate_up.weight, m.down.weight)
    assert got is not None and got.shape == x.shape
    assert mx.allclose(got, _gathered(m, x, inds, scores), atol=2e-5, rtol=1e-5).item()
    # A row alone gives the same bits as within the batch, and on one thread as on several.
    last = kernels.moe_experts(x[-1:], inds[-1:], scores[-1:], m.gate_up.gate_up.weight,
                               m.down.weight)
    assert last is not None and mx.array_equal(last, got[-1:]).item()
    kernels.set_threads(1)
    alone = kernels.moe_experts(x, inds, scores, m.gate_up.gate_up.weight, m.down.weight)
    assert alone is not None and mx.array_equal(alone, got).item()


def test_sparse_mlp_takes_the_kernel_for_a_decode_and_the_gather_path_beyond() -> None:
    m = _moe(8, 64, 64, 2)
    for rows in (3, kernels.DENSE_MAX_ROWS + 1):
        x = mx.random.normal((rows, 1, 64))
        got = moe.sparse_mlp(m, x, lambda a, p: a @ p.weight.T, lambda mlp, a: a)
        inds, scores = moe.route(m, x @ m.router.weight.T)
        assert mx.allclose(got, _gathered(m, x, inds, scores), atol=2e-5, rtol=1e-5).item()
    x = mx.random.normal((kernels.DENSE_MAX_ROWS + 1, 1, 64))
    assert kernels.moe_experts(x, *moe.route(m, x @ m.router.weight.T),
                               m.gate_up.gate_up.weight, m.down.weight) is None
    half = m.gate_up.gate_up.weight.astype(mx.float16)
    assert kernels.moe_experts(x[:2], *moe.route(m, x[:2] @ m.router.weight.T), half,
                               m.down.weight) is None
