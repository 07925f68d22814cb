"""What the scheduler keeps: a running `Sequence`, its `SchedulerLimits` and `SchedulerStats`,
and `SchedulerView`, the part of the scheduler its pipelined round (`ring.py`) and speculative
decoding (`speculation.py`) work through, so neither imports the scheduler that uses them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx

from agent.generation import GenerationRequest
from agent.runtime.protocol import RunnerConfig
from agent.runtime.sampling import RowSampler
from agent.runtime.stops import StopMatcher


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512  # most tokens per prefill slice while other streams decode
    # While others decode, a slice is sized to take at most this many decode steps' time, so a
    # long prompt delays running streams by a bounded factor on any machine (0: fixed slices).
    prefill_gap_steps: float = 6.0
    solo_prefill_chunk: int = 2048  # slice size when nothing else is decoding
    context_length: int = 8192
    kv_budget_bytes: int = 1 << 30

    @classmethod
    def for_runner(cls, config: RunnerConfig, *, context_length: int,
                   kv_budget_bytes: int) -> SchedulerLimits:
        """The limits a runner's configuration sets, with its context and KV budget."""
        return cls(max_batch=config.max_batch, max_queue=config.max_queue,
                   prefill_chunk=config.prefill_chunk,
                   prefill_gap_steps=config.prefill_gap_steps,
                   context_length=context_length, kv_budget_bytes=kv_budget_bytes)


@dataclass
class Sequence:
    request: GenerationRequest
    row: int
    sampler: RowSampler
    detokenizer: Any
    stops: StopMatcher
    max_tokens: int
    prefilled: int = 0
    length: int = 0  # tokens whose KV is in the cache
    next_token: int | None = None  # sampled, not yet in the cache
    # Generated tokens whose text the detokenizer or the stop matcher still holds back: they
    # go out with the next chunk that carries text, so the stream's ids are complete.
    unsent_ids: list[int] = field(default_factory=list)
    generated: int = 0
    cached_tokens: int = 0
    drafter: Any = None  # drafting.PromptLookup when this sequence drafts (speculation.py)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_tokens

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not prefilled yet."""
        return len(self.prompt) - self.prefilled

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt) + self.max_tokens

    @property
    def peak_tokens(self) -> int:
        """The most cache positions this sequence can ever need (its prompt, every reply token
        but the last, and the slot the next decode step writes)."""
        return len(self.prompt) + max(1, self.max_tokens)


@dataclass
class SchedulerStats:
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    requests_total: int = 0
    rejected_total: int = 0
    decode_steps_total: int = 0
    decode_seconds_total: float = 0.0
    lookahead_steps_total: int = 0  # decode steps queued before the previous one was read
    decode_rows_max: int = 0  # the most sequences one decode step computed together


class SchedulerView(Protocol):
    """The scheduler as its rounds see it (ring.py, speculation.py): its state, and the steps
    they share with its synchronous round."""

    running: dict[str, Sequence]
    kv: Any  # seam.Slots
    compute: Any  # seam.Compute
    limits: SchedulerLimits
    stats: SchedulerStats
    speculator: Any  # speculation.Speculator
    decode_step_s: float | None
    prefill_s_per_token: float | None

    def _drop_cancelled(self) -> None: ...

    def _admit(self) -> None: ...

    def _compact(self) -> None: ...

    def _count_step(self, decoding: list[Sequence], started: float) -> None: ...

    def _accept(self, seq: Sequence, token: int, lp: Any) -> None: ...

    def _sample_and_emit(self, seqs: list[Sequence], logits: mx.array,
                         rows_of: list[int] | None = None) -> None: ...
