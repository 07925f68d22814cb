"""A lone prompt's slices round a pipeline: equal work each (pure, no MLX)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.runtime.pacing import equal_cost_slice, key_cost, slice_cost


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


def cut(prompt: int, slices: int, per_key: float, least: int = 128,
        most: int = 2048) -> list[int]:
    done, out = 0, []
    while done < prompt:
        size = equal_cost_slice(prompt, done, slices, per_key, least=least, most=most)
        assert size > 0
        out.append(size)
        done += size
    return out


def test_slices_of_equal_work_shrink_as_the_keys_grow() -> None:
    per_key = key_cost(Geometry())
    assert 6e-4 < per_key < 1e-3  # fitted on SmolLM2: ~8.2e-4 measured
    sizes = cut(2000, 8, per_key)
    assert sum(sizes) == 2000 and len(sizes) == 8
    assert sizes == sorted(sizes, reverse=True)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    costs = [slice_cost(s, n, per_key) for s, n in zip(starts, sizes, strict=True)]
    assert max(costs) / min(costs) < 1.02


def test_without_attention_cost_the_slices_are_equal_and_bounds_hold() -> None:
    assert cut(2000, 8, 0.0) == [250] * 8
    assert cut(100, 1, 1e-3) == [100]  # shorter than the least slice: one slice
    sizes = cut(2000, 12, 8e-4)  # the floor of 128 tokens leaves a remainder: split, not doubled
    assert sum(sizes) == 2000 and min(sizes) >= 100 and max(sizes[-2:]) <= 128
    assert max(cut(100_000, 8, 1e-4)) == 2048
