"""Whether a verification step pays, and how wide it should be: drafting's value (the tokens a
step is expected to yield) against what the wider step costs. Pure Python: no MLX.

A verification step computes `width` positions for every KV row, drafted or not. On a CPU that
is far from free: a one-row decode step's projections are sgemv, and any second position turns
them into a GEMM, which OpenBLAS runs well below sgemv's speed for so few columns (measured by
`bench.speculative_cost` on the fused verify layers: a one-row verify step of 2 positions costs
1.42 plain steps, of 13 2.85; eight rows of 13 positions 5.94 eight-row plain steps). A draft
that the model then rejects makes the stream slower, so a lookup draft is verified only when
the expected yield, from each row's estimated per-token acceptance, beats a plain step's one
token a row by `MARGIN` per unit of cost. Drafts the caller must verify (a request's
prediction, a configured draft model) still get the width that pays best among the verifying
ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# A verify step must beat the plain step by this much: plain steps keep the scheduler's
# lookahead (the next step overlaps reading this one's tokens back), and acceptance is an
# estimate.
MARGIN = 0.1


def expected_tokens(drafted: int, p: float) -> float:
    """Tokens a row's verification yields when each drafted token is kept with probability `p`
    given the ones before it were: the kept prefix plus the model's own next token,
    1 + p + p^2 + ... + p^drafted."""
    if drafted <= 0:
        return 1.0
    if p >= 1.0:
        return float(drafted + 1)
    return (1.0 - p ** (drafted + 1)) / (1.0 - p)


def cpu_step_cost(rows: int, width: int) -> float:
    """A CPU step of `rows` KV rows, `width` positions each, in one-row plain steps.

    Fitted to `bench.speculative_cost`'s SmolLM2 figures on the fused verify layers (2
    OpenBLAS threads, ~400 positions of context, SWAPPED_MAX_ROWS 128): a plain step of 1 row
    costs 1, of 8 rows 2.1; a verify step of 1 row 1.4 at width 2 and 2.8 at 13, of 8 rows 3.2
    at width 2 and 12.6 at 13 (the printed ratios times the 8-row plain step's 2.1). The fixed
    part is the switch from sgemv to GEMM, the rest grows with the positions and, a little, the
    width. Only a prior: `MeasuredCost` replaces it with the runner's own step times once a
    shape has samples."""
    if width <= 1:
        return 0.85 + 0.15 * rows
    return 1.3 + 0.10 * rows * width + 0.03 * width


def accelerator_step_cost(rows: int, width: int) -> float:
    """A GPU step: memory-bound until the positions reach the hundreds, so a wider step costs
    little more (an assumption of the usual GPU regime, not a figure measured here)."""
    return 1.0 + (rows * width - 1) / 256


# A step time's moving average: this weight on the newest sample.
MEASURED_WEIGHT = 0.3
# Samples of a (rows, width) shape (and of the plain step of as many rows) before its measured
# time replaces the prior: a shape's first step or two also pay its compilation.
MEASURED_MIN_SAMPLES = 3


@dataclass
class MeasuredCost:
    """Step costs from the scheduler's own steps: a moving average of the seconds a step of
    (rows, width) took (width 1: a plain decode step), fed by `record`. As a cost function
    (`cost(rows, width)`, what `choose_width` takes) it returns the prior's plain-step cost
    times the measured ratio of the width's step to the plain step of as many rows, so only
    measured ratios decide; a shape without enough samples (or without a measured plain step
    beside it) keeps the prior's figure. The prior is optimistic about wide steps, so an
    unmeasured width gets tried, and then judged by what it cost. No clock in here: the
    caller times its steps."""

    prior: Callable[[int, int], float] = cpu_step_cost
    weight: float = MEASURED_WEIGHT
    min_samples: int = MEASURED_MIN_SAMPLES
    seconds: dict[tuple[int, int], float] = field(default_factory=dict)
    samples: dict[tuple[int, int], int] = field(default_factory=dict)

    def record(self, rows: int, width: int, seconds: float) -> None:
        key = (rows, max(1, width))
        n = self.samples.get(key, 0)
        # The first samples (compilation, a cold cache) are dropped from the average: the
        # average starts at the sample that makes the count reach `min_samples`.
        self.samples[key] = n + 1
        if n + 1 < self.min_samples:
            return
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + self.weight * (seconds - old)

    def measured(self, rows: int, width: int) -> float | None:
        """The average seconds of a (rows, width) step, None before enough samples."""
        return self.seconds.get((rows, max(1, width)))

    def __call__(self, rows: int, width: int) -> float:
        base = self.prior(rows, 1)
        if width <= 1:
            return base
        plain, wide = self.measured(rows, 1), self.measured(rows, width)
        if plain is None or wide is None or plain <= 0.0:
            return self.prior(rows, width)
        return base * wide / plain


@dataclass(frozen=True)
class RowDraft:
    """One decoding row's offer to a verify step: how many tokens it drafted (0: none) and the
    estimated chance each is kept."""

    drafted: int
    p: float


def choose_width(kv_rows: int, rows: Sequence[RowDraft], widths: Sequence[int], *,
                 forced: bool = False,
                 cost: Callable[[int, int], float] = cpu_step_cost,
                 margin: float = MARGIN) -> int:
    """The step's width: 1 (a plain decode step, nobody's draft verified) or one of `widths`,
    whichever yields the most expected tokens per unit of cost. Every one of the `kv_rows` KV
    rows computes `width` positions; `rows` are the decoding rows (the others yield nothing).
    `forced`: some draft must be verified (width 1 is not a choice)."""
    if not rows:
        return 1
    best, best_rate = 1, -1.0
    if not forced:
        best_rate = len(rows) / cost(kv_rows, 1) * (1.0 + margin)
    longest = max(r.drafted for r in rows)
    for width in widths:
        if width < 2:
            continue
        value = sum(expected_tokens(min(r.drafted, width - 1), r.p) for r in rows)
        rate = value / cost(kv_rows, width)
        if rate > best_rate:
            best, best_rate = width, rate
        if width - 1 >= longest:  # wider only pads
            break
    return best


# Prior per-token acceptance of a lookup draft, by how many tokens of the text so far match
# where its continuation was found: a two-token echo is a coincidence as often as not, a
# dozen-token match is a copied span.
def match_prior(match: int) -> float:
    if match <= 0:
        return 0.0
    return match / (match + 2.0)


PRIOR_WEIGHT = 2.0  # the prior counts as this many observed draft tokens
DECAY = 0.7  # a row's older verification outcomes fade: acceptance follows the text


def acceptance(kept: float, failed: float, prior: float, weight: float = PRIOR_WEIGHT) -> float:
    """Per-token acceptance from a row's (decayed) kept tokens and rejections, shrunk toward
    `prior`: each draft is a run of kept tokens ended by a rejection (or by the draft's end)."""
    return (kept + weight * prior) / (kept + failed + weight)
