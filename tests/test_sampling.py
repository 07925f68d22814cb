"""RowSampler's penalty window: how far back the repetition penalty looks (Ollama's
`repeat_last_n`: a count, -1 for the whole context, 0 for none)."""

from __future__ import annotations

import mlx.core as mx

from agent.generation import SamplingParams
from agent.runtime.sampling import RowSampler

VOCAB = 16


def penalised(window: int, prompt: list[int], history: list[int]) -> set[int]:
    """The ids whose logits the penalty changed."""
    sampler = RowSampler(SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=2.0,
                                        repetition_context=window))
    sampler.history.extend(history)
    logits = mx.ones((VOCAB,))
    out = sampler.adjust(logits, prompt)
    return {i for i, v in enumerate(out.tolist()) if v != 1.0}


def test_a_window_as_long_as_the_context_reaches_the_first_prompt_token() -> None:
    prompt = [1] + [2] * 200  # token 1 sits 200 tokens back, far beyond the old fixed 64
    assert penalised(256, prompt, [3]) == {1, 2, 3}
    # Asked again as the output grows: the cached prompt ids stay right.
    sampler = RowSampler(SamplingParams(max_tokens=8, repetition_penalty=2.0,
                                        repetition_context=256))
    assert sampler.recent_tokens(prompt) == {1, 2}
    sampler.history.append(4)
    assert sampler.recent_tokens(prompt) == {1, 2, 4}


def test_a_short_window_counts_only_the_latest_tokens() -> None:
    prompt = [1, 2, 3, 4, 5]
    assert penalised(3, prompt, [6]) == {4, 5, 6}
    assert penalised(2, prompt, [6, 7, 8]) == {7, 8}


def test_window_zero_penalises_nothing() -> None:
    assert penalised(0, [1, 2, 3], [4]) == set()
