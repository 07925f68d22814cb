"""The cost model that decides whether a verification step pays and how wide it is
(`draft_cost.py`), and the acceptance estimate prompt lookup feeds it: pure functions."""

from __future__ import annotations

import pytest

from agent.runtime.draft_cost import (
    MEASURED_MIN_SAMPLES,
    MeasuredCost,
    RowDraft,
    acceptance,
    choose_width,
    cpu_step_cost,
    expected_tokens,
    match_prior,
)
from agent.runtime.drafting import PromptLookup, match_length

WIDTHS = (2, 3, 5, 9, 13)


def test_expected_tokens() -> None:
    assert expected_tokens(0, 0.9) == 1.0
    assert expected_tokens(4, 1.0) == 5.0
    assert expected_tokens(2, 0.5) == pytest.approx(1.75)
    assert expected_tokens(3, 0.0) == 1.0


def test_cpu_cost_grows_with_positions() -> None:
    assert cpu_step_cost(1, 1) == pytest.approx(1.0)
    # Any second position costs a lot on a CPU (sgemv -> GEMM), more positions a little more.
    assert cpu_step_cost(1, 2) > 1.4
    assert cpu_step_cost(1, 2) < cpu_step_cost(1, 13) < cpu_step_cost(8, 13)
    assert cpu_step_cost(8, 1) < cpu_step_cost(8, 2)


def test_a_doubtful_draft_at_one_row_is_not_verified() -> None:
    # Chat: a short echo (prior ~0.5) never pays the wider step.
    assert choose_width(1, [RowDraft(4, match_prior(2))], WIDTHS) == 1
    assert choose_width(1, [RowDraft(4, 0.4)], WIDTHS) == 1
    # At 0.6 a kept token a position pays for the fused verify step's measured cost.
    assert choose_width(1, [RowDraft(4, 0.6)], WIDTHS) > 1
    # A copied span: verified, as wide as the draft.
    assert choose_width(1, [RowDraft(12, 0.95)], WIDTHS) == 13
    assert choose_width(1, [RowDraft(4, 0.95)], WIDTHS) == 5


def test_forced_drafts_verify_even_when_they_do_not_pay() -> None:
    assert choose_width(1, [RowDraft(4, 0.1)], WIDTHS, forced=True) > 1
    assert choose_width(1, [], WIDTHS, forced=True) == 1  # nobody decoding: nothing to do


def test_batch_width_weighs_every_row() -> None:
    assert choose_width(8, [RowDraft(12, 1.0)] * 8, WIDTHS) == 13
    # Less sure: a narrower step, whose tokens cost less each.
    assert choose_width(8, [RowDraft(12, 0.95)] * 8, WIDTHS) == 9
    # One good row among seven without drafts: the whole batch would pay the wide step.
    lone = [RowDraft(12, 0.95)] + [RowDraft(0, 0.0)] * 7
    assert choose_width(8, lone, WIDTHS) == 1
    # Rows still in prefill are computed too but yield nothing: fewer decoding rows, less value.
    assert choose_width(8, [RowDraft(12, 0.95)], WIDTHS) > 1  # 13 tokens vs 1 for the row
    assert choose_width(8, [RowDraft(4, 0.5)], WIDTHS) == 1


def test_width_never_beyond_the_longest_draft() -> None:
    assert choose_width(1, [RowDraft(2, 1.0)], WIDTHS) == 3
    assert choose_width(4, [RowDraft(1, 1.0)] * 4, WIDTHS) == 2


def test_acceptance_estimate_follows_outcomes() -> None:
    assert acceptance(0.0, 0.0, 0.8) == pytest.approx(0.8)
    assert acceptance(12.0, 0.0, 0.5) > 0.9  # whole drafts kept
    assert acceptance(0.0, 3.0, 0.8) < 0.4  # drafts rejected at once


def test_match_prior_and_length() -> None:
    assert match_prior(0) == 0.0
    assert match_prior(2) < match_prior(8) < match_prior(32) < 1.0
    tokens = [1, 2, 3, 4, 5, 6, 9, 2, 3, 4, 5]
    # "2 3 4 5" found ending at index 5 (continuation at 5); the tokens before differ (1 vs 9).
    assert match_length(tokens, 5, 2, 32) == 4
    assert match_length(tokens, 5, 2, 3) == 3


def test_lookup_prior_grows_with_the_copied_span() -> None:
    passage = list(range(100, 140))
    short, long = PromptLookup(), PromptLookup()
    short.extend([*passage, 7, 100, 101])  # a two-token echo of the passage's start
    long.extend([*passage, 7, *passage[:20]])  # copying the passage from its start
    assert long.propose(4, 0) == passage[20:24]
    assert short.propose(4, 0) == passage[2:6]
    assert short.expected_acceptance() < 0.6 < 0.85 < long.expected_acceptance()
    long.feedback(4, 0)
    long.feedback(4, 0)
    assert long.expected_acceptance() < 0.7  # it failed: the estimate follows


def _measured(samples: dict[tuple[int, int], float], count: int = MEASURED_MIN_SAMPLES + 2
              ) -> MeasuredCost:
    costs = MeasuredCost()
    for _ in range(count):
        for (rows, width), seconds in samples.items():
            costs.record(rows, width, seconds)
    return costs


def test_measured_costs_start_from_the_prior() -> None:
    costs = MeasuredCost()
    assert costs(8, 13) == cpu_step_cost(8, 13)
    # The first samples of a shape (its compilation) are not averaged in.
    for _ in range(MEASURED_MIN_SAMPLES - 1):
        costs.record(8, 1, 5.0)
        costs.record(8, 13, 50.0)
    assert costs.measured(8, 1) is None
    assert costs(8, 13) == cpu_step_cost(8, 13)


def test_measured_costs_are_ratios_to_the_plain_step() -> None:
    costs = _measured({(8, 1): 0.05, (8, 13): 0.5, (1, 13): 0.2})
    assert costs.measured(8, 1) == pytest.approx(0.05)
    assert costs(8, 1) == cpu_step_cost(8, 1)  # the unit stays the prior's
    assert costs(8, 13) == pytest.approx(cpu_step_cost(8, 1) * 10)
    # A width without samples, or rows without a measured plain step: the prior.
    assert costs(8, 5) == cpu_step_cost(8, 5)
    assert costs(1, 13) == cpu_step_cost(1, 13)


def test_measured_average_follows_the_steps() -> None:
    costs = _measured({(1, 1): 0.02, (1, 5): 0.04})
    for _ in range(30):
        costs.record(1, 5, 0.08)  # the machine got busier for wide steps
    assert costs(1, 5) == pytest.approx(4.0, rel=0.01)


def test_a_measured_expensive_width_gives_way_to_a_narrower_one() -> None:
    rows = [RowDraft(12, 0.95)] * 8
    assert choose_width(8, rows, WIDTHS) == 9  # the prior's choice
    # Measured: 9 and 13 positions a row cost 6 and 9 plain steps, 5 only 2.2.
    costs = _measured({(8, 1): 0.05, (8, 5): 0.11, (8, 9): 0.3, (8, 13): 0.45})
    assert choose_width(8, rows, WIDTHS, cost=costs) == 5
    # Measured so dear that nothing pays: plain steps.
    dear = _measured({(8, 1): 0.05, (8, 2): 0.2, (8, 3): 0.3, (8, 5): 0.5, (8, 9): 0.9,
                      (8, 13): 1.3})
    assert choose_width(8, rows, WIDTHS, cost=dear) == 1
