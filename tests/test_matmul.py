"""The projection matmul: every operand order it picks gives x @ W.T (+ bias) at float32
tolerance, for one row, a decode batch and a prompt."""

from __future__ import annotations

import mlx.core as mx
import pytest

from agent.runtime.matmul import SWAPPED_MAX_ROWS, linear
from agent.runtime.model import Dense


@pytest.mark.parametrize("rows", [1, 2, 8, SWAPPED_MAX_ROWS, SWAPPED_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_x_times_w_transposed(rows: int, bias: bool) -> None:
    mx.random.seed(rows)
    w = mx.random.normal((96, 64))
    b = mx.random.normal((96,)) if bias else None
    x = mx.random.normal((rows, 1, 64))
    got = linear(x, Dense(w, b))
    want = x @ w.T + (b if b is not None else 0)
    assert got.shape == (rows, 1, 96)
    assert mx.allclose(got, want, atol=1e-4).item()
