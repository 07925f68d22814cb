"""A lone prompt's slices round a pipeline: planned from a cost model, on the attention
kernel's query blocks (pure, no MLX)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.runtime.pacing import (
    PREFILL_QUERY_BLOCK,
    SLICE_FIXED_TOKENS,
    key_cost,
    pipeline_slices,
    ring_makespan,
    slice_cost,
)
from agent.runtime.ring import PIPELINE_MIN_SLICE, lone_prompt_slices


@dataclass(frozen=True)
class Geometry:  # the fields of DecoderConfig that key_cost reads (SmolLM2-135M's)
    hidden_size: int = 576
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0


def test_slice_cost_grows_with_the_keys_before_it() -> None:
    per_key = key_cost(Geometry())
    assert 3e-4 < per_key < 6e-4  # fitted on SmolLM2's block-aligned slices: ~4.6e-4
    assert slice_cost(0, 256, 0.0) == 256
    # A late slice attends over every key before it: SmolLM2's 256 tokens at 1,792 cost ~1.6x
    # the first 256 (measured 0.43 s against 0.27 s on its 15 head layers).
    late = SLICE_FIXED_TOKENS + slice_cost(1792, 256, per_key)
    early = SLICE_FIXED_TOKENS + slice_cost(0, 256, per_key)
    assert 1.4 < late / early < 1.8
    # Cut anywhere, the parts cost no more than the whole (the whole's own keys aside).
    whole = slice_cost(0, 2000, per_key)
    parts = slice_cost(0, 1000, per_key) + slice_cost(1000, 1000, per_key)
    assert parts <= whole < parts * 1.1


def estimate(done: int, sizes: list[int], stages: int, per_key: float) -> float:
    costs, start = [], done
    for size in sizes:
        costs.append(SLICE_FIXED_TOKENS + slice_cost(start, size, per_key))
        start += size
    return ring_makespan(costs, stages)


def ends(done: int, sizes: list[int]) -> list[int]:
    out = []
    for size in sizes:
        done += size
        out.append(done)
    return out


def test_lone_prompt_slices_end_on_query_blocks() -> None:
    per_key = key_cost(Geometry())
    for prompt, done in [(2000, 0), (2100, 0), (4000, 0), (2000, 37), (700, 300), (9000, 0)]:
        for stages in (2, 3, 4):
            sizes = lone_prompt_slices(prompt, done, stages, per_key, 2048)
            assert sum(sizes) == prompt - done
            assert all(e % PREFILL_QUERY_BLOCK == 0 for e in ends(done, sizes)[:-1])
            assert min(sizes[:-1], default=PIPELINE_MIN_SLICE) >= PIPELINE_MIN_SLICE
            assert max(sizes) <= 2048


def test_the_plan_for_2000_tokens_on_2_stages() -> None:
    """What bench.cluster_throughput's prefill figure runs: eight slices of two blocks (the
    last the remainder), which the ring finishes sooner than fewer, longer slices (a dearer
    fill and drain), more, shorter ones (each pays the fixed cost) or longer early ones (the
    head waits for the ring to drain a step)."""
    per_key = key_cost(Geometry())
    sizes = lone_prompt_slices(2000, 0, 2, per_key, 2048)
    assert sizes == [256] * 7 + [208]
    for other in ([384, 384, 256, 256, 256, 256, 208], [512, 512, 512, 464],
                  [384] * 5 + [80], [256] * 7 + [128, 80], [2000]):
        assert estimate(0, sizes, 2, per_key) < estimate(0, other, 2, per_key)
    # ~0.64 of the prompt on one node (sum + dearest slice, over two stages).
    one = SLICE_FIXED_TOKENS + slice_cost(0, 2000, per_key)
    assert 0.6 < estimate(0, sizes, 2, per_key) / (2 * one) < 0.65


def test_ring_makespan() -> None:
    assert ring_makespan([], 2) == 0.0
    assert ring_makespan([1.0, 1.0, 1.0], 2) == 4.0  # the prompt once, plus a slice to fill
    assert ring_makespan([3.0], 3) == 9.0  # one slice: every stage in turn
    assert ring_makespan([1.0, 1.0, 1.0], 1) == 3.0
    # With sum + (S - 1) x max: the dearest slice fills and drains, wherever it is.
    assert ring_makespan([1.0, 3.0, 1.0], 2) == ring_makespan([3.0, 1.0, 1.0], 2) == 8.0
    # The ring holds S steps: the head waits for slice k - S to come back before slice k.
    assert ring_makespan([3.0, 1.0, 3.0, 1.0], 2) == 13.0  # not 8 + 3


def test_pipeline_slices_bounds_and_short_prompts() -> None:
    per_key = key_cost(Geometry())
    assert pipeline_slices(100, 0, 2, per_key, least=256, most=2048) == [100]
    assert pipeline_slices(2000, 2000, 2, per_key, least=256, most=2048) == []
    # One stage: nothing fills or drains, the fewest slices are best.
    assert len(pipeline_slices(3000, 0, 1, per_key, least=256, most=2048)) == 2
    # A long prompt: slices as long as `most` allows first, shrinking as the keys grow.
    sizes = pipeline_slices(100_000, 0, 2, 1e-4, least=256, most=2048)
    assert sum(sizes) == 100_000 and max(sizes) == 2048 and sizes[0] >= sizes[-2]
    # Without attention cost, equal slices of whole blocks.
    sizes = pipeline_slices(2048, 0, 2, 0.0, least=256, most=2048)
    assert sizes == [256] * 8
    # `most` shorter than a block: slices of at most `most`, ending on a block where they can.
    sizes = pipeline_slices(250, 0, 2, 0.0, block=128, least=16, most=100)
    assert sum(sizes) == 250 and max(sizes) <= 100 and 128 in ends(0, sizes)
