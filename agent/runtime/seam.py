"""The interface between the scheduler and an engine: where a step runs and where its state lives.

Two engines implement it: flock's own decoder (`compute.LocalCompute` / `HeadCompute` over
`kv.KvSlots`) and mlx-lm's model modules (`mlxlm_engine.MlxLmCompute` over
`mlxlm_cache.MlxLmSlots`). The scheduler keeps admission, sampling, stop strings, streaming and
the prefix cache's bookkeeping; it only ever talks to an engine through these two shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx


class Compute(Protocol):
    # Whether a decode step may be queued before the previous one's tokens are read back (the
    # scheduler's lookahead): only when `decode` is lazy MLX work that a dropped step leaves
    # harmless.
    lazy_decode: bool

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        """Logits (1, vocab) of the last of `tokens` (prompt positions [start, start + n))."""
        ...

    def will_decode(self, rows: list[int]) -> None:
        """The rows the next `decode` computes; the others (free, or still in prefill) are
        left alone by engines whose caches cannot take a harmless write."""
        ...

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        """Logits (rows, vocab), indexed by row; `tokens` and `positions` are indexed by row."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PrefillWork:
    """One prefill slice of one sequence: prompt tokens [start, start + len(tokens)) into `row`.
    `logits`: the slice ends the prompt, so its last position's logits are wanted."""

    row: int
    start: int
    tokens: list[int]
    logits: bool = True


@dataclass(frozen=True)
class DecodeWork:
    """One decode step of a micro-batch: the KV rows [first_row, first_row + len(positions)).

    Indexed by row within the range: `tokens[i]` are the tokens row `first_row + i` feeds this
    step (one token a row; a verify micro-batch feeds `width` a row: the pending token, then its
    drafted tokens, padded) and `positions[i]` the cache position of its first token. Rows of
    the range that are not decoding (free, in prefill, or in another micro-batch in flight) feed
    token 0 at their next free position: a harmless write that their own next step overwrites.
    """

    first_row: int
    tokens: list[list[int]]
    positions: list[int]
    # Every member row only takes the argmax of its raw logits (plain greedy: no logprobs,
    # penalties or constraint): a pipeline head may then hand back `Picks` instead of logits.
    greedy: bool = False

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def width(self) -> int:
        """Tokens a row: 1 for a decode step, more for a verify step (every row alike)."""
        return len(self.tokens[0]) if self.tokens else 1

    def flat_tokens(self) -> list[int]:
        assert all(len(t) == 1 for t in self.tokens), "one token a row (a verify step: width)"
        return [t[0] for t in self.tokens]


Work = PrefillWork | DecodeWork


@dataclass(frozen=True)
class Picks:
    """A greedy decode step's outcome without its logits: `ids[i]` is the argmax over the whole
    vocabulary of row `first_row + i`'s logits (ties to the lowest id, as `mx.argmax`)."""

    ids: list[int]


class PipelinedCompute(Compute, Protocol):
    """A compute that can keep several steps in flight (a pipeline head): `submit` starts a
    step and returns once this process's share is queued, `collect` returns the oldest
    submitted step's logits (submission order). `stages`: how many steps in flight keep every
    stage busy (1: nothing gains from overlap; the scheduler then takes its synchronous path).
    Steps run at every stage in submission order, each with the KV journal drained at its
    submit, so followers' caches stay exact however many steps are in flight."""

    stages: int

    def submit(self, work: Work) -> None: ...

    def collect(self) -> tuple[Work, mx.array | Picks | None]:
        """(the work, its logits): (1, vocab) for a prefill slice that ends its prompt (None
        for one that does not), (rows, vocab) for a decode step, or for a `greedy` decode step
        possibly its `Picks` (each row's argmax) instead."""
        ...

    @property
    def in_flight(self) -> int: ...


class CacheGeometry(Protocol):
    @property
    def bytes_per_token(self) -> int:
        """Bytes one more token of one sequence adds to the cache (the admission unit)."""
        ...


class Slots(Protocol):
    """Rows of cache, one per running sequence, that the scheduler admits against."""

    geometry: Any  # a CacheGeometry
    journal: list[tuple] | None
    limit_bytes: int | None

    @property
    def rows(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def allocated_bytes(self) -> int: ...

    @property
    def keys(self) -> list[mx.array]: ...

    @property
    def values(self) -> list[mx.array]: ...

    def free_rows(self) -> int: ...

    def capacity_limit(self, rows: int) -> int | None: ...

    def layout(self, sequences: int, tokens: int) -> int | None: ...

    def acquire(self, owner: str, tokens_needed: int, *, rows: int | None = None) -> int: ...

    def release(self, row: int) -> None: ...

    def ensure_capacity(self, tokens: int) -> None: ...

    def compact(self, lengths: dict[int, int], *, rows: int | None = None) -> dict[int, int]: ...

    def read_row(self, row: int, length: int) -> tuple[list[mx.array], list[mx.array]]: ...

    def write_row(self, row: int, keys: list[mx.array], values: list[mx.array]) -> None: ...
