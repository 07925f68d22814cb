"""The interface between the scheduler and an engine: where a step runs and where its state lives.

Two engines implement it: flock's own decoder (`compute.LocalCompute` / `HeadCompute` over
`kv.KvSlots`) and mlx-lm's model modules (`mlxlm_engine.MlxLmCompute` over
`mlxlm_cache.MlxLmSlots`). The scheduler keeps admission, sampling, stop strings, streaming and
the prefix cache's bookkeeping; it only ever talks to an engine through these two shapes.
"""

from __future__ import annotations

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
