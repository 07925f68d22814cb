"""How big a prefill slice is while other streams decode, and the moving averages that size it;
and how a lone prompt's slices through a pipeline are cut (`pipeline_slices`): on the attention
kernel's query blocks, as few and as even in cost as the fill and drain of the ring allow.

Kept apart from the scheduler so both of its rounds (the synchronous one in `scheduler.py` and
the pipelined one in `ring.py`) size slices by the same rule.
"""

from __future__ import annotations

import bisect
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
# backend (a prompt slice's queries against the keys before it): fitted to the CPU times of
# SmolLM2's 15 head layers (one BLAS thread) for block-aligned slices of 128-2,000 tokens at
# 0-1,792 tokens in. (2.5 was fitted to slices that started inside a query block, whose padded
# block the kernel computed twice.)
ATTENTION_SLOWDOWN = 1.4
# The attention kernel's query block (flockattn.cpp `kQueryBlock`): a prefill call computes
# every block its queries touch at full size, aligned to absolute positions (so chunked prefill
# gives one pass's bits), so a slice that starts or ends inside a block pays for the whole
# block, and its neighbour pays for it again. `bench.stage_balance --splits 15:shared`
# estimated a 2,000-token prompt on 2 stages at 0.730x one node in the old unaligned slices
# of equal work and 0.626x in aligned ones.
PREFILL_QUERY_BLOCK = 128
# What a prefill slice costs a stage whatever its length, in tokens of matmul work: reading
# (and packing) every weight matrix once, the hop and the per-step bookkeeping. Fitted with
# ATTENTION_SLOWDOWN to the CPU times of 128-, 256- and 512-token slices through SmolLM2's 15
# head layers on one BLAS thread.
SLICE_FIXED_TOKENS = 45.0


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


def pipeline_slices(prompt_tokens: int, done: int, stages: int, per_key: float, *,
                    block: int = PREFILL_QUERY_BLOCK, least: int, most: int,
                    fixed: float = SLICE_FIXED_TOKENS) -> list[int]:
    """Slice lengths for prompt tokens [done, prompt_tokens) prefilled alone through `stages`
    stages of about equal speed.

    Each slice ends on a multiple of `block` (the attention kernel's query block) or at the
    prompt's end, and is at least `least` tokens (but a remainder) and at most `most`. With S
    stages and slice costs c (`fixed` + `slice_cost`), the ring finishes after about
    (sum(c) + (S - 1) x max(c)) / S (`ring_makespan`): the whole prompt once, plus its dearest
    slice filling and draining the ring. Each slice adds `fixed` to the sum, each longer slice
    to the max. So for each slice count n (from the fewest `most` allows, up to 16 a stage more)
    this finds the least cap on a slice's cost within which the greedy cut (the longest slice
    that fits, at every step) takes at most n slices, and keeps the plan the ring finishes
    soonest (the fewer slices on a tie)."""
    left = prompt_tokens - done
    if left <= 0:
        return []
    least = max(1, min(least, most))
    fewest = -(-left // most)
    best: tuple[float, list[int]] | None = None
    seen: set[tuple[int, ...]] = set()
    for n in range(fewest, min(-(-left // least), fewest + 16 * stages) + 1):
        plan = _within_slices(prompt_tokens, done, n, per_key, block=block, least=least,
                              most=most, fixed=fixed)
        if tuple(plan) in seen:
            continue
        seen.add(tuple(plan))
        costs, start = [], done
        for size in plan:
            costs.append(fixed + slice_cost(start, size, per_key))
            start += size
        estimate = ring_makespan(costs, stages)
        if best is None or estimate < best[0] - 1e-9:
            best = (estimate, plan)
    assert best is not None
    return best[1]


def ring_makespan(costs: list[float], stages: int) -> float:
    """When the last of a prompt's slices leaves the ring, each slice costing every stage
    `costs[k]` (stages of equal speed, so in units of one stage's share): stage s starts slice
    k once it has finished slice k - 1 and stage s - 1 has finished slice k, and the head
    starts slice k only once slice k - S is back (the ring holds at most S steps, ring.py)."""
    done = [[0.0] * len(costs) for _ in range(stages)]
    for k, cost in enumerate(costs):
        for s in range(stages):
            ready = done[s][k - 1] if k else 0.0
            if s:
                ready = max(ready, done[s - 1][k])
            elif k >= stages:
                ready = max(ready, done[stages - 1][k - stages])
            done[s][k] = ready + cost
    return done[-1][-1] if costs else 0.0


def _within_slices(prompt_tokens: int, done: int, n: int, per_key: float, *, block: int,
                   least: int, most: int, fixed: float) -> list[int]:
    """The greedy cut under the least cost cap (by bisection) that gives at most n slices, or
    the cut of the loosest cap when none does."""
    low = fixed
    high = fixed + slice_cost(max(done, prompt_tokens - most), min(most, prompt_tokens - done),
                              per_key)
    plan = _capped_slices(prompt_tokens, done, high, per_key, block=block, least=least,
                          most=most, fixed=fixed)
    if len(plan) > n:
        return plan
    for _ in range(24):
        cap = (low + high) / 2
        trial = _capped_slices(prompt_tokens, done, cap, per_key, block=block, least=least,
                               most=most, fixed=fixed)
        if len(trial) <= n:
            high, plan = cap, trial
        else:
            low = cap
    return plan


def _capped_slices(prompt_tokens: int, done: int, cap: float, per_key: float, *, block: int,
                   least: int, most: int, fixed: float) -> list[int]:
    """Greedy: from `done`, the longest block-aligned slice (or the rest) within [least, most]
    tokens whose cost is at most `cap`, else the shortest such slice; until the prompt ends."""
    sizes: list[int] = []
    start = done
    while start < prompt_tokens:
        if prompt_tokens - start <= least:
            sizes.append(prompt_tokens - start)
            break
        ends = list(range((start + least + block - 1) // block * block,
                          min(prompt_tokens, start + most) + 1, block))
        if prompt_tokens - start <= most and (not ends or ends[-1] != prompt_tokens):
            ends.append(prompt_tokens)
        if not ends:  # `most` too short to reach a block boundary: an unaligned slice
            ends = [start + most]
        fit = bisect.bisect_right(
            ends, cap, key=lambda end: fixed + slice_cost(start, end - start, per_key))
        end = ends[max(0, fit - 1)]
        sizes.append(end - start)
        start = end
    return sizes
