"""Pacing of a scheduler's work: how big a prefill slice may be while other streams decode, and
the moving averages of step times that size it (pure functions)."""

from __future__ import annotations

MIN_PREFILL_SLICE = 16  # tokens: below this a slice is mostly weight traffic
FIRST_PREFILL_SLICE = 32  # tokens, before the prefill speed has been measured


def prefill_slice(max_tokens: int, gap_steps: float, decode_step_s: float | None,
                  prefill_s_per_token: float | None) -> int:
    """Tokens for the next prefill slice while other streams decode: as many as take at most
    `gap_steps` decode steps' time at the measured prefill speed, within [MIN_PREFILL_SLICE,
    max_tokens]; `max_tokens` when adaptation is off."""
    if gap_steps <= 0:
        return max_tokens
    if decode_step_s is None or prefill_s_per_token is None:
        return min(max_tokens, FIRST_PREFILL_SLICE)
    tokens = int(gap_steps * decode_step_s / max(prefill_s_per_token, 1e-9))
    return max(min(MIN_PREFILL_SLICE, max_tokens), min(max_tokens, tokens))


def moving_average(previous: float | None, sample: float, weight: float = 0.25) -> float:
    return sample if previous is None else previous + weight * (sample - previous)
