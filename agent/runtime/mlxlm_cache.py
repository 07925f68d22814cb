"""Rows of mlx-lm caches for the scheduler: one prompt cache per sequence while it prefills, one
batch cache for every sequence that decodes.

A sequence prefills into its own `make_prompt_cache` list (exactly what mlx-lm's generate does).
When it starts decoding, its cache is merged into the running batch as mlx-lm's BatchGenerator
does it (`merge` to a `BatchKVCache` / `BatchRotatingKVCache` / batched `ArraysCache`, then
`extend`: rows of different lengths are left-padded, each keeps its own offset, so rope and the
masks see each row's true positions); a finished sequence leaves with `filter`. The scheduler's
row numbers stay stable: this module maps them to batch positions.

Bytes are the caches' real `nbytes`; the admission unit (`CacheCost.bytes_per_token`) is measured
once from a real cache after one token, per layer kind: attention layers grow per token (sliding
windows counted as if they did not stop, an upper bound), recurrent state is a fixed cost per
sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import CacheList, KVCache, make_prompt_cache

from agent.runtime.journal import KvOp, RowAcquire, RowRelease


@dataclass(frozen=True)
class CacheCost:
    """What one sequence's cache costs: per token, and fixed (recurrent state)."""

    bytes_per_token: int
    bytes_per_sequence: int
    reusable: bool  # every layer a plain KVCache: a prefix can be copied out and back in
    batchable: bool  # every layer's cache type can merge into a batch cache
    kinds: tuple[str, ...]  # cache class names, for reports


def _leaves(cache: Any) -> list[Any]:
    if isinstance(cache, CacheList):
        return [leaf for c in cache.caches for leaf in _leaves(c)]
    return [cache]


Forward = Callable[[mx.array, list[Any]], mx.array]


def _call_model(model: Any) -> Forward:
    return lambda inputs, cache: model(inputs, cache=cache)


def measure_cost(model: Any, forward: Forward | None = None) -> CacheCost:
    """Run one token through a fresh cache and read what each layer's cache holds.
    `forward(inputs, cache)`: how to call the model (a pipeline stage calls its slice)."""
    call = forward or _call_model(model)
    cache = make_prompt_cache(model)
    call(mx.array([[0]]), cache)
    mx.eval([c.state for c in cache])
    per_token = fixed = 0
    for leaf in (leaf for c in cache for leaf in _leaves(c)):
        keys = getattr(leaf, "keys", None)
        if isinstance(keys, mx.array) and keys.ndim == 4 and keys.shape[2] > 0:
            per_token += leaf.nbytes // keys.shape[2]
        else:
            fixed += leaf.nbytes
    leaves = [leaf for c in cache for leaf in _leaves(c)]
    return CacheCost(
        bytes_per_token=max(per_token, 1),
        bytes_per_sequence=fixed,
        reusable=all(type(leaf) is KVCache for leaf in leaves),
        batchable=all(hasattr(c, "merge") for c in cache) and batches_correctly(model, call),
        kinds=tuple(sorted({type(leaf).__name__ for leaf in leaves})),
    )


def batches_correctly(model: Any, forward: Forward | None = None) -> bool:
    """Whether batched decode of rows at different positions gives each row's own logits.

    Some mlx-lm modules break with batch caches (gemma2's attention broadcasts the batch mask
    over its KV heads), so this is checked once at load, on two short rows, before any request
    relies on it; a model that fails decodes each row with its own call instead."""
    prompts, nexts = [[1, 2, 3], [4]], [5, 6]
    call = forward or _call_model(model)

    def prefilled() -> list[list[Any]]:
        caches = []
        for prompt in prompts:
            cache = make_prompt_cache(model)
            call(mx.array([prompt]), cache)
            caches.append(cache)
        return caches

    try:
        solo = [call(mx.array([[t]]), c)[:, -1, :]
                for t, c in zip(nexts, prefilled(), strict=True)]
        caches = prefilled()
        batch = [caches[0][i].merge([c[i] for c in caches]) for i in range(len(caches[0]))]
        both = call(mx.array([[t] for t in nexts]), batch)[:, -1, :]
        want = mx.concatenate(solo, axis=0).astype(mx.float32)
        scale = float(mx.abs(want).max().item()) + 1.0
        return float(mx.abs(both.astype(mx.float32) - want).max().item()) <= 1e-2 * scale
    except Exception:  # any failure means: do not batch this model
        return False


def _arrays(caches: list[Any]) -> list[mx.array]:
    return [a for c in caches for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]


class MlxLmSlots:
    """The scheduler's rows over mlx-lm caches (the `seam.Slots` shape)."""

    def __init__(self, model: Any, cost: CacheCost, *, limit_bytes: int | None = None) -> None:
        self.model = model
        self.geometry = cost
        self.journal: list[tuple] | None = None  # no followers mirror this engine's caches
        self.limit_bytes = limit_bytes
        self._owner: list[str | None] = []
        self.lengths: list[int] = []  # tokens in each row's cache
        self.solo: list[list[Any] | None] = []  # a row's own cache, until it joins the batch
        self.batch: list[Any] | None = None
        self.order: list[int] = []  # row of each batch position
        # Row events for tensor-parallel peers that mirror these rows (None: nobody does).
        self.events: list[KvOp] | None = None

    # ---- figures -------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self._owner)

    @property
    def capacity(self) -> int:
        return max(self.lengths, default=0)

    @property
    def allocated_bytes(self) -> int:
        caches = [c for s in self.solo if s for c in s] + (self.batch or [])
        return sum(c.nbytes for c in caches)

    @property
    def keys(self) -> list[mx.array]:
        """Every cache array (what the scheduler evaluates after a step)."""
        return _arrays([c for s in self.solo if s for c in s] + (self.batch or []))

    @property
    def values(self) -> list[mx.array]:
        return []

    def owners(self) -> list[str | None]:
        return list(self._owner)

    def free_rows(self) -> int:
        return sum(1 for owner in self._owner if owner is None)

    def _row_bytes(self, tokens: int) -> int:
        return self.geometry.bytes_per_sequence + tokens * self.geometry.bytes_per_token

    def capacity_limit(self, rows: int) -> int | None:
        if self.limit_bytes is None:
            return None
        rows = max(rows, 1)
        room = self.limit_bytes - rows * self.geometry.bytes_per_sequence
        return max(0, room // (rows * self.geometry.bytes_per_token))

    def layout(self, sequences: int, tokens: int) -> int | None:
        """Rows for `sequences` sequences of up to `tokens` positions: the batch cache pads
        every row to the longest and grows by whole steps, so all of them at `tokens` plus a
        step must fit. One sequence always fits here (the scheduler refused it already if its
        tokens cannot), at worst a step over the budget."""
        if self.limit_bytes is None or sequences <= 1:
            return max(sequences, 1)
        need = sequences * self._row_bytes(tokens + KVCache.step)
        return sequences if need <= self.limit_bytes else None

    # ---- rows ----------------------------------------------------------------------------
    def acquire(self, owner: str, tokens_needed: int, *, rows: int | None = None) -> int:
        row = next((r for r, current in enumerate(self._owner) if current is None),
                   len(self._owner))
        self.take_row(row, owner)
        if self.events is not None:
            self.events.append(RowAcquire(row))
        return row

    def take_row(self, row: int, owner: str = "peer") -> None:
        """Give `row` (a free one, or the next new one) to `owner`, empty."""
        while len(self._owner) <= row:
            self._owner.append(None)
            self.lengths.append(0)
            self.solo.append(None)
        self._owner[row] = owner
        self.lengths[row] = 0
        self.solo[row] = None

    def release(self, row: int) -> None:
        if self.events is not None:
            self.events.append(RowRelease(row))
        self._owner[row] = None
        self.lengths[row] = 0
        self.solo[row] = None
        if row in self.order:
            self._leave_batch([row])

    def ensure_capacity(self, tokens: int) -> None:
        pass  # mlx-lm caches grow themselves (256-token steps)

    def compact(self, lengths: dict[int, int], *, rows: int | None = None) -> dict[int, int]:
        """Drop trailing free rows; rows in use keep their numbers (nothing moves)."""
        while self._owner and self._owner[-1] is None:
            self._owner.pop()
            self.lengths.pop()
            self.solo.pop()
        return {row: row for row, owner in enumerate(self._owner) if owner is not None}

    def cache_of(self, row: int) -> list[Any]:
        """The row's own cache (made on first use); the row must not be in the batch."""
        assert row not in self.order, "a decoding row does not prefill"
        if self.solo[row] is None:
            self.solo[row] = make_prompt_cache(self.model)
        return self.solo[row]  # type: ignore[return-value]

    # ---- the batch -----------------------------------------------------------------------
    def batch_for(self, rows: list[int]) -> list[Any]:
        """The batch cache holding exactly `rows` (in `self.order`): rows that stopped
        decoding leave, rows that start decoding are merged in."""
        gone = [r for r in self.order if r not in rows]
        if gone:
            self._leave_batch(gone)
        joining = [r for r in rows if r not in self.order]
        if joining:
            caches = [self.cache_of(r) for r in joining]
            merged = [caches[0][i].merge([c[i] for c in caches]) for i in range(len(caches[0]))]
            if self.batch is None:
                self.batch = merged
            else:
                for mine, theirs in zip(self.batch, merged, strict=True):
                    mine.extend(theirs)
            self.order += joining
            for r in joining:
                self.solo[r] = None
        assert self.batch is not None
        return self.batch

    def _leave_batch(self, rows: list[int]) -> None:
        keep = [i for i, r in enumerate(self.order) if r not in rows]
        self.order = [self.order[i] for i in keep]
        if not keep:
            self.batch = None
            return
        assert self.batch is not None
        for cache in self.batch:
            cache.filter(keep)

    def _row_caches(self, row: int) -> list[Any]:
        if row in self.order:
            assert self.batch is not None
            index = self.order.index(row)
            return [c.extract(index) for c in self.batch]
        return self.cache_of(row)

    # ---- copying sequences in and out (prefix cache; plain KVCache layers only) ------------
    def read_row(self, row: int, length: int) -> tuple[list[mx.array], list[mx.array]]:
        caches = self._row_caches(row)
        keys = [c.keys[:, :, :length] for c in caches]
        values = [c.values[:, :, :length] for c in caches]
        return keys, values

    def write_row(self, row: int, keys: list[mx.array], values: list[mx.array]) -> None:
        caches = []
        for k, v in zip(keys, values, strict=True):
            cache = KVCache()
            cache.keys, cache.values, cache.offset = k, v, k.shape[2]
            caches.append(cache)
        self.solo[row] = caches
        self.lengths[row] = keys[0].shape[2]

