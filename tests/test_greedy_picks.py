"""A greedy decode step's pick from the two ends of a split vocabulary (`vocab_split.tail_best`,
`join_best`) is `argmax` over the whole vocabulary's logits, ties included (real MLX)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from agent.runtime.vocab_split import join_best, tail_best


def pick(logits: mx.array, boundary: int) -> list[int]:
    values, ids = tail_best(logits[:, boundary:], boundary)
    return join_best(logits[:, :boundary], values, ids).tolist()


def test_ties_go_to_the_lowest_id_on_either_side_of_the_boundary() -> None:
    logits = mx.array([[1.0, 5.0, 2.0, 5.0, 0.0, 5.0],   # tie across: the head's id
                       [1.0, 2.0, 2.0, 0.0, 7.0, 7.0],   # tie inside the tail: its lower id
                       [9.0, 9.0, 2.0, 0.0, 7.0, 3.0],   # tie inside the head
                       [0.0, 1.0, 2.0, 2.5, 2.0, 1.0]])  # the tail strictly greater
    assert pick(logits, 3) == [1, 4, 0, 3] == mx.argmax(logits, axis=-1).tolist()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_random_logits_with_many_ties_pick_as_argmax(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        vocab = int(rng.integers(130, 5000))
        rows = int(rng.integers(1, 17))
        logits = mx.array(rng.integers(-3, 4, size=(rows, vocab)).astype(np.float32)).astype(dtype)
        boundary = int(rng.integers(64, vocab - 64))
        assert pick(logits, boundary) == mx.argmax(logits, axis=-1).tolist()


def test_the_tails_ids_count_from_its_first_vocabulary_row() -> None:
    values, ids = tail_best(mx.array([[0.5, 3.0, 1.0]]), 1000)
    assert ids.tolist() == [1001] and values.tolist() == [3.0]
