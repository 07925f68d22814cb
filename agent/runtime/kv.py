"""The KV cache of one runner: a row per running sequence, preallocated and grown in chunks.

Every local layer holds keys and values of shape (rows, kv_heads, capacity, head_dim). A sequence
owns one row; its tokens sit at positions [0, length). Capacity grows in whole chunks (so the
compiled decode step sees few distinct shapes) and the row count in powers of two; when most
rows are free the cache is compacted so decode does not compute rows nobody uses.

Allocated bytes stay within a budget when one is set (`limit_bytes`): capacity growth stops at
what the budget allows for the current rows, and `layout` tells the scheduler whether (and with
how many rows) one more sequence fits, falling back from a power of two to the exact row count
and from whole chunks to the exact capacity only when the budget leaves no other choice.

With `KvGeometry.bits` set (4 or 8) every key and value is stored quantized along head_dim, as
MLX's `mx.quantize` lays it out: packed uint32 codes plus a scale and a bias per group, each of
shape (rows, kv_heads, capacity, ...). A layer's keys are then three arrays instead of one; the
cache keeps them as a flat list (`parts` arrays per layer) so every operation that slices rows or
positions treats them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from agent.runtime.journal import Gather, Journal, Resize

# Group size of the quantized KV cache along head_dim (the cluster's placement assumes the same,
# agent/cluster/placement.py _KV_QUANT_GROUP); head dims that are not a multiple of it use 32.
KV_QUANT_GROUP = 64


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pow2_at_least(value: int) -> int:
    size = 1
    while size < value:
        size *= 2
    return size


@dataclass(frozen=True)
class KvQuant:
    """How keys and values are quantized: `bits` per element, a scale and bias per `group`."""

    bits: int
    group: int


@dataclass(frozen=True)
class KvGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: mx.Dtype = mx.float32
    bits: int | None = None  # quantized KV cache (4 or 8); None stores `dtype`

    def __post_init__(self) -> None:
        if self.bits is not None:
            if self.bits not in (4, 8):
                raise ValueError(f"kv_bits must be 4 or 8, not {self.bits}")
            if self.head_dim % 32:
                raise ValueError(f"a quantized KV cache needs a head_dim that is a multiple of "
                                 f"32; this model's is {self.head_dim}")

    @property
    def quant(self) -> KvQuant | None:
        if self.bits is None:
            return None
        group = KV_QUANT_GROUP if self.head_dim % KV_QUANT_GROUP == 0 else 32
        return KvQuant(self.bits, group)

    @property
    def parts(self) -> list[tuple[int, mx.Dtype]]:
        """(last dimension, dtype) of each array one layer's keys (or values) are stored in."""
        quant = self.quant
        if quant is None:
            return [(self.head_dim, self.dtype)]
        groups = self.head_dim // quant.group
        return [(self.head_dim * quant.bits // 32, mx.uint32), (groups, self.dtype),
                (groups, self.dtype)]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in this runner's cache (keys and values)."""
        per_head = sum(dim * dtype.size for dim, dtype in self.parts)
        return 2 * self.layers * self.kv_heads * per_head


class KvSlots:
    """Rows of preallocated KV cache shared by a runner's sequences.

    `keys` and `values` are flat lists: layer i's keys are `keys[i * parts:(i + 1) * parts]`
    (one array unquantized, codes/scales/biases quantized).
    """

    def __init__(self, geometry: KvGeometry, *, chunk: int = 256,
                 journal: Journal | None = None, limit_bytes: int | None = None) -> None:
        self.geometry = geometry
        self.chunk = chunk
        # Layout changes, recorded for pipeline followers whose caches mirror this one.
        self.journal = journal
        # Allocated bytes never exceed this (None: unbounded). The scheduler sets its budget.
        self.limit_bytes = limit_bytes
        self.rows = 0
        self.capacity = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self._owner: list[str | None] = []

    # ---- figures -------------------------------------------------------------------------
    @property
    def parts(self) -> int:
        return len(self.geometry.parts)

    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.capacity * self.geometry.bytes_per_token

    def owners(self) -> list[str | None]:
        return list(self._owner)

    def free_rows(self) -> int:
        return sum(1 for owner in self._owner if owner is None)

    def capacity_limit(self, rows: int) -> int | None:
        """The most positions `rows` rows may hold within the limit (None: unbounded)."""
        if self.limit_bytes is None:
            return None
        return self.limit_bytes // (max(rows, 1) * self.geometry.bytes_per_token)

    def layout(self, sequences: int, tokens: int) -> int | None:
        """Rows for `sequences` sequences of up to `tokens` positions each within the limit: a
        power of two when it fits, else exactly `sequences`; None when neither fits."""
        for rows in (_pow2_at_least(sequences), sequences):
            limit = self.capacity_limit(rows)
            if limit is None or limit >= tokens:
                return rows
        return None

    def _capacity_for(self, tokens: int, rows: int) -> int:
        """Whole chunks covering `tokens`, cut back to what the limit allows for `rows`."""
        capacity = _round_up(max(tokens, 1), self.chunk)
        limit = self.capacity_limit(rows)
        if limit is not None and capacity > limit:
            capacity = max(limit, tokens)
        return capacity

    # ---- rows ----------------------------------------------------------------------------
    def acquire(self, owner: str, tokens_needed: int, *, rows: int | None = None) -> int:
        """A free row for `owner`, growing rows (to `rows` when given) and capacity as needed."""
        for row, current in enumerate(self._owner):
            if current is None:
                self._owner[row] = owner
                self.ensure_capacity(tokens_needed)
                return row
        new_rows = rows if rows is not None else _pow2_at_least(self.rows + 1)
        assert new_rows > self.rows
        capacity = max(self.capacity, self._capacity_for(tokens_needed, new_rows))
        self._resize(rows=new_rows, capacity=capacity)
        row = self._owner.index(None)
        self._owner[row] = owner
        return row

    def release(self, row: int) -> None:
        self._owner[row] = None

    def resize(self, rows: int, capacity: int) -> None:
        """Grow to exactly `rows` x `capacity` (a follower mirroring its head)."""
        self._resize(rows=rows, capacity=capacity)

    def ensure_capacity(self, tokens: int) -> None:
        """Make room for `tokens` positions in every row (grows by whole chunks, or up to what
        the limit allows)."""
        if tokens > self.capacity:
            self._resize(rows=self.rows, capacity=self._capacity_for(tokens, self.rows))

    def compact(self, lengths: dict[int, int], *, rows: int | None = None) -> dict[int, int]:
        """Shrink when at most half the rows are used or the capacity is at least twice what
        the longest sequence needs (or to exactly `rows` rows when given); returns old row ->
        new row.

        `lengths` maps each used row to its sequence length, so capacity can shrink too.
        """
        used = [row for row, owner in enumerate(self._owner) if owner is not None]
        longest = max((lengths.get(row, 0) for row in used), default=0)
        if rows is None:
            fewer_rows = self.rows > 1 and len(used) <= self.rows // 2
            # Capacity left behind by a long sequence that finished: decode attends over every
            # position of the capacity (masked), so short sequences would pay for it each step.
            needed = _round_up(longest + 1, self.chunk)
            shorter = self.capacity >= 2 * needed
            if not (fewer_rows or shorter):
                return {row: row for row in used}
            rows = _pow2_at_least(max(len(used), 1)) if fewer_rows else self.rows
        assert rows >= len(used)
        new_capacity = min(self._capacity_for(longest + 1, rows), self.capacity)
        mapping = {row: index for index, row in enumerate(used)}
        index = used + [used[0] if used else 0] * (rows - len(used))
        owners = [self._owner[row] for row in used]
        self.gather(index, new_capacity)
        self._owner = owners + [None] * (rows - len(used))
        return mapping

    def gather(self, index: list[int], capacity: int) -> None:
        """Keep rows `index` (in that order) and the first `capacity` positions."""
        if self.journal is not None:
            self.journal.append(Gather(list(index), capacity))
        rows = mx.array(index)
        self.keys = [k[rows, :, :capacity] for k in self.keys]
        self.values = [v[rows, :, :capacity] for v in self.values]
        self._owner = (self._owner + [None] * len(index))[: len(index)]
        self.rows, self.capacity = len(index), capacity
        mx.eval(self.keys, self.values)

    def _resize(self, *, rows: int, capacity: int) -> None:
        if self.journal is not None:
            self.journal.append(Resize(rows, capacity))
        g = self.geometry
        parts = g.parts * g.layers
        if not self.keys:
            self.keys = [mx.zeros((rows, g.kv_heads, capacity, dim), dtype)
                         for dim, dtype in parts]
            self.values = [mx.zeros((rows, g.kv_heads, capacity, dim), dtype)
                           for dim, dtype in parts]
        else:
            def grow(a: mx.array) -> mx.array:
                dim, dtype = a.shape[3], a.dtype
                if capacity > self.capacity:
                    pad = mx.zeros((a.shape[0], g.kv_heads, capacity - self.capacity, dim), dtype)
                    a = mx.concatenate([a, pad], axis=2)
                if rows > self.rows:
                    pad = mx.zeros((rows - self.rows, g.kv_heads, capacity, dim), dtype)
                    a = mx.concatenate([a, pad], axis=0)
                return a

            self.keys = [grow(k) for k in self.keys]
            self.values = [grow(v) for v in self.values]
        self._owner += [None] * (rows - self.rows)
        self.rows, self.capacity = rows, capacity
        mx.eval(self.keys, self.values)

    # ---- the decode step ---------------------------------------------------------------------
    def step_in_place(self, fn: Callable[..., Any], *inputs: mx.array) -> mx.array:
        """Run `fn(*inputs, *keys, *values)` (a decode step returning `(out, *keys, *values)`),
        handing the KV arrays over: once the step is queued, nothing but the step itself refers
        to the old arrays, so MLX writes the new keys and values into their buffers instead of
        copying the whole cache (at batch 8 the copies took a third of each step; at 4K context,
        more). Returns `out`; the cache holds the step's (lazy) KV arrays."""
        keys, values = self.keys, self.values
        self.keys, self.values = [], []
        try:
            result = fn(*inputs, *keys, *values)
        except BaseException:
            self.keys, self.values = keys, values
            raise
        del keys, values
        arrays = (len(result) - 1) // 2
        self.keys = list(result[1:1 + arrays])
        self.values = list(result[1 + arrays:])
        return result[0]

    # ---- copying sequences in and out (prefix cache) ---------------------------------------
    def read_row(self, row: int, length: int) -> tuple[list[mx.array], list[mx.array]]:
        """The row's first `length` positions, in the cache's own (possibly quantized) form."""
        keys = [k[row:row + 1, :, :length] for k in self.keys]
        values = [v[row:row + 1, :, :length] for v in self.values]
        return keys, values

    def write_row(self, row: int, keys: list[mx.array], values: list[mx.array]) -> None:
        """Put back what `read_row` returned (any length up to the row's capacity)."""
        length = keys[0].shape[2]
        self.ensure_capacity(length + 1)
        for i in range(len(self.keys)):
            self.keys[i][row:row + 1, :, :length] = keys[i]
            self.values[i][row:row + 1, :, :length] = values[i]
