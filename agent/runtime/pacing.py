"""How big a prefill slice is while other streams decode, and the moving averages that size it;
and how a lone prompt's slices through a pipeline are cut so that each costs about the same.

Kept apart from the scheduler so both of its rounds (the synchronous one in `scheduler.py` and
the pipelined one in `ring.py`) size slices by the same rule.
"""

from __future__ import annotations

import math
from typing import Any

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


# Attention runs this many times slower per multiply-add than a layer's matmuls on the CPU
# backend (a prompt slice's queries against the keys before it): fitted to the per-slice CPU
# times of SmolLM2's 15 head layers over a 2,000-token prompt in 250-token slices (each slice
# cost ~54 ms more than the one before, on ~1.05 ms a token of matmul work).
ATTENTION_SLOWDOWN = 2.5


def key_cost(config: Any) -> float:
    """The work of one (query, key) pair of prefill attention relative to one token's matmul
    work through a layer's weights: what makes a slice late in a long prompt cost more than
    the same number of tokens early in it."""
    hidden, heads = config.hidden_size, config.num_heads
    kv_heads, head_dim = config.num_kv_heads, config.head_dim
    attention_weights = hidden * head_dim * (2 * heads + 2 * kv_heads)
    if config.num_experts:
        mlp = 3 * hidden * config.moe_intermediate_size * max(1, config.experts_per_token)
    else:
        mlp = 3 * hidden * config.intermediate_size
    per_token = attention_weights + mlp
    return ATTENTION_SLOWDOWN * 2 * heads * head_dim / per_token if per_token else 0.0


def slice_cost(start: int, tokens: int, per_key: float) -> float:
    """Prefill work of prompt tokens [start, start + tokens), in tokens' matmul work: each
    token's matmuls plus its attention over every key up to itself."""
    return tokens * (1.0 + per_key * (start + (tokens + 1) / 2))


def equal_cost_slice(prompt_tokens: int, done: int, slices: int, per_key: float, *,
                     least: int, most: int) -> int:
    """Tokens for the slice starting at `done` when the prompt is cut into about `slices`
    slices of equal work (`slice_cost`): later slices attend over more keys, so they get fewer
    tokens. A pipelined prompt finishes after the work of the whole prompt plus its dearest
    slice (the ring fills and drains by one slice), so equal work is the least dear. Within
    [least, most]; a remainder smaller than `least` joins this slice when that leaves it at
    most half as long again, else the rest is cut in two halves."""
    left = prompt_tokens - done
    if left <= 0:
        return 0
    target = slice_cost(0, prompt_tokens, per_key) / max(1, slices)
    if per_key <= 0:
        n = target
    else:  # tokens n with slice_cost(done, n) == target: a quadratic in n
        linear = 1.0 + per_key * (done + 0.5)
        n = (-linear + math.sqrt(linear * linear + 2 * per_key * target)) / per_key
    size = max(least, min(most, round(n)))
    if left - size >= least:
        return size
    return left if left <= size + least // 2 else -(-left // 2)
