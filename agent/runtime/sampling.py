"""Choosing the next token of each row: greedy, temperature, top-k/top-p/min-p, penalties, seeds.

Rows are sampled together when all are greedy (one argmax for the batch); otherwise each row
applies its own settings. A seeded request owns its random key, so its output does not depend on
what else shares the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from agent.generation import SamplingParams


@dataclass
class RowSampler:
    """Sampling state of one sequence."""

    params: SamplingParams
    key: mx.array | None = None
    history: list[int] = field(default_factory=list)  # generated tokens, for penalties
    # Constrained decoding (JSON schema, grammar): see agent.runtime.constraints. It has
    # `allowed() -> mx.array` (bool, vocab), `consume(token)` and `finished() -> bool`.
    constraint: Any = None
    _prompt_ids: set[int] | None = field(default=None, repr=False)  # the prompt's distinct ids

    def __post_init__(self) -> None:
        if self.params.seed is not None and not self.params.greedy:
            # MLX keys take an unsigned 64-bit seed.
            self.key = mx.random.key(self.params.seed % (1 << 64))

    @property
    def needs_logits(self) -> bool:
        """False when a plain argmax over raw logits is this row's whole job."""
        p = self.params
        return not p.greedy or p.logprobs or self._penalised or self.constraint is not None

    @property
    def _penalised(self) -> bool:
        p = self.params
        return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                or p.frequency_penalty != 0.0)

    def recent_tokens(self, prompt: list[int]) -> set[int]:
        """The distinct ids among the last `repetition_context` tokens of prompt + output: the
        window the repetition penalty looks at (a window as long as the context is all of it,
        Ollama's `repeat_last_n: -1`)."""
        window = self.params.repetition_context
        if window <= 0:
            return set()
        recent = set(self.history[-window:])
        room = window - len(self.history)
        if room > 0 and prompt:
            if room >= len(prompt):
                # The whole prompt is in the window from here on: count it once, not per step.
                if self._prompt_ids is None:
                    self._prompt_ids = set(prompt)
                recent |= self._prompt_ids
            else:
                recent.update(prompt[-room:])
        return recent

    def adjust(self, logits: mx.array, prompt: list[int]) -> mx.array:
        """Penalties over recent tokens, as llama.cpp/mlx-lm (repetition) and OpenAI define them;
        `prompt` is the whole prompt (the window decides how much of it counts)."""
        p = self.params
        if self.constraint is not None:
            allowed = self.constraint.allowed()
            logits = mx.where(allowed[: logits.shape[-1]], logits, -mx.inf)
        if not self._penalised:
            return logits
        if p.repetition_penalty != 1.0 and p.repetition_context > 0:
            recent = self.recent_tokens(prompt)
            if recent:
                ids = mx.array(sorted(recent))
                selected = logits[ids]
                selected = mx.where(selected < 0, selected * p.repetition_penalty,
                                    selected / p.repetition_penalty)
                logits[ids] = selected
        if (p.presence_penalty or p.frequency_penalty) and self.history:
            counts = Counter(self.history)
            ids = mx.array(list(counts))
            freq = mx.array([float(c) for c in counts.values()])
            logits[ids] = logits[ids] - p.presence_penalty - p.frequency_penalty * freq
        return logits

    def choose(self, logits: mx.array) -> mx.array:
        """The next token id (a 0-d array) from adjusted logits of shape (vocab,)."""
        if self.params.greedy:
            return mx.argmax(logits)
        return mx.random.categorical(self.filtered(logits), key=self.next_key())

    def next_key(self) -> mx.array | None:
        """A fresh subkey of this row's random key (None: unseeded, MLX's global state)."""
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def filtered(self, logits: mx.array) -> mx.array:
        """Adjusted logits as this row samples them: tempered, tokens outside top-k / min-p /
        top-p at -inf (softmax of it is the distribution `choose` draws from)."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = mx.sort(logits)[-p.top_k]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if p.min_p > 0.0:
            probs = mx.softmax(logits)
            logits = mx.where(probs < p.min_p * probs.max(), -mx.inf, logits)
        if p.top_p < 1.0:
            order = mx.argsort(-logits)
            sorted_logits = logits[order]
            cumulative = mx.cumsum(mx.softmax(sorted_logits))
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            drop_sorted = (cumulative - mx.softmax(sorted_logits)) >= p.top_p
            drop = mx.zeros_like(drop_sorted)
            drop[order] = drop_sorted
            logits = mx.where(drop, -mx.inf, logits)
        return logits


def top_logprobs(logits: mx.array, chosen: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """(chosen token's logprob, top-k ids, their logprobs) of the model's distribution."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen_lp = logprobs[chosen]
    if k <= 0:
        return chosen_lp, mx.array([], dtype=mx.int32), mx.array([])
    ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
    lps = logprobs[ids]
    order = mx.argsort(-lps)
    return chosen_lp, ids[order], lps[order]
