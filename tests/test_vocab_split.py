"""How a pipeline's head and last stage share decode's vocabulary projection (pure decisions)."""

from __future__ import annotations

from agent.runtime.vocab_split import MIN_ROWS, head_vocab_rows

VOCAB, LAYER, PROJECTION = 49152, 14.2e6, 113.2e6  # SmolLM2-135M at float32


def test_an_even_split_shares_the_vocabulary_in_half() -> None:
    assert head_vocab_rows(VOCAB, 15, 15, LAYER, PROJECTION) == VOCAB // 2


def test_the_end_with_more_layers_projects_less() -> None:
    shares = [head_vocab_rows(VOCAB, h, 30 - h, LAYER, PROJECTION) for h in range(11, 20)]
    assert shares == sorted(shares, reverse=True)
    # Ends even: head layers + its rows' share of the projection == the last stage's.
    rows = head_vocab_rows(VOCAB, 14, 16, LAYER, PROJECTION)
    head = 14 * LAYER + rows / VOCAB * PROJECTION
    last = 16 * LAYER + (1 - rows / VOCAB) * PROJECTION
    assert abs(head - last) < PROJECTION / VOCAB * 2


def test_lopsided_splits_clamp_and_tiny_shares_are_not_split() -> None:
    assert head_vocab_rows(VOCAB, 2, 28, LAYER, PROJECTION) == VOCAB  # the head keeps it all
    assert head_vocab_rows(VOCAB, 28, 2, LAYER, PROJECTION) == MIN_ROWS  # the last, all but
    assert head_vocab_rows(MIN_ROWS, 5, 5, LAYER, PROJECTION) == MIN_ROWS  # half is too small
    assert head_vocab_rows(VOCAB, 5, 5, LAYER, 0) == VOCAB  # nothing known: no split
