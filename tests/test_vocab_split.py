"""How a pipeline's head and last stage share decode's vocabulary projection (pure decisions)."""

from __future__ import annotations

from agent.runtime.vocab_split import (
    MAX_MOVES,
    MIN_ROWS,
    REBALANCE_STEPS,
    WINDOW,
    VocabBalance,
    head_vocab_rows,
    rebalanced_rows,
)

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


def test_the_boundary_moves_whole_quanta_towards_the_end_that_waits() -> None:
    q, per_row = 192, 1e-6  # a quantum's projection: 0.192 ms at the head
    # The last stage waits 1 ms a step more than the head: it takes rows; closing the gap
    # takes 1 ms / (2 x 0.192 ms) = 2.6 quanta, so 2 (no overshoot).
    assert rebalanced_rows(24576, 0.0, 1e-3, per_row, 18432, 30720, q) == 24576 - 2 * q
    # The head waits more: it takes rows back.
    assert rebalanced_rows(24576, 1e-3, 0.0, per_row, 18432, 30720, q) == 24576 + 2 * q
    # A gap under two quanta's worth stays: the boundary settles.
    assert rebalanced_rows(24576, 0.0, 3.5e-4, per_row, 18432, 30720, q) == 24576
    # At most MAX_MOVES quanta at once, never past the window.
    assert rebalanced_rows(24576, 0.0, 1.0, per_row, 18432, 30720, q) == 24576 - MAX_MOVES * q
    assert rebalanced_rows(18432 + q, 0.0, 1.0, per_row, 18432, 30720, q) == 18432
    assert rebalanced_rows(30720, 1.0, 0.0, per_row, 18432, 30720, q) == 30720
    assert rebalanced_rows(24576, 0.0, 1.0, 0.0, 18432, 30720, q) == 24576  # nothing known


def test_a_balance_decides_every_window_on_medians() -> None:
    balance = VocabBalance(VOCAB, VOCAB // 2)
    q = balance.quantum
    assert balance.lo == VOCAB // 2 - round(VOCAB * WINDOW) // q * q and balance.lo >= MIN_ROWS
    assert balance.hi == VOCAB - balance.lo
    rows = balance.rows
    # One step after an idle spell (the last stage waited seconds) does not swing it.
    balance.note(0.0, 5.0, 24576 * 1e-6, 24576)
    for _ in range(REBALANCE_STEPS - 2):
        balance.note(0.0, 0.0, 24576 * 1e-6, 24576)
    assert balance.rows == rows
    balance.note(0.0, 0.0, 24576 * 1e-6, 24576)
    assert balance.rows == rows  # decided: balanced, it stays
    for _ in range(REBALANCE_STEPS):  # the head is the slower end: the last stage waits
        balance.note(0.0, 1e-3, 24576 * 1e-6, 24576)
    assert balance.rows == rows - int(1e-3 / (2 * 1e-6 * q)) * q < rows
