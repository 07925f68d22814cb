"""The KV cache of one runner: a row per running sequence, preallocated and grown in chunks.

Every local layer holds keys and values of shape (rows, kv_heads, capacity, head_dim). A sequence
owns one row; its tokens sit at positions [0, length). Capacity grows in whole chunks (so the
compiled decode step sees few distinct shapes) and the row count in powers of two; when most
rows are free the cache is compacted so decode does not compute rows nobody uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pow2_at_least(value: int) -> int:
    size = 1
    while size < value:
        size *= 2
    return size


@dataclass(frozen=True)
class KvGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: mx.Dtype = mx.float32

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in this runner's cache (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.size


class KvSlots:
    """Rows of preallocated KV cache shared by a runner's sequences."""

    def __init__(self, geometry: KvGeometry, *, chunk: int = 256,
                 journal: list[tuple] | None = None) -> None:
        self.geometry = geometry
        self.chunk = chunk
        # Layout changes, recorded for pipeline followers whose caches mirror this one.
        self.journal = journal
        self.rows = 0
        self.capacity = 0
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self._owner: list[str | None] = []

    # ---- figures -------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.capacity * self.geometry.bytes_per_token

    def owners(self) -> list[str | None]:
        return list(self._owner)

    # ---- rows ----------------------------------------------------------------------------
    def acquire(self, owner: str, tokens_needed: int) -> int:
        """A free row for `owner`, growing rows and capacity as needed."""
        for row, current in enumerate(self._owner):
            if current is None:
                self._owner[row] = owner
                self.ensure_capacity(tokens_needed)
                return row
        self._resize(rows=_pow2_at_least(self.rows + 1),
                     capacity=max(self.capacity, _round_up(max(tokens_needed, 1), self.chunk)))
        row = self._owner.index(None)
        self._owner[row] = owner
        return row

    def release(self, row: int) -> None:
        self._owner[row] = None

    def resize(self, rows: int, capacity: int) -> None:
        """Grow to exactly `rows` x `capacity` (a follower mirroring its head)."""
        self._resize(rows=rows, capacity=capacity)

    def ensure_capacity(self, tokens: int) -> None:
        """Make room for `tokens` positions in every row (grows by whole chunks)."""
        if tokens > self.capacity:
            self._resize(rows=self.rows, capacity=_round_up(tokens, self.chunk))

    def compact(self, lengths: dict[int, int]) -> dict[int, int]:
        """Shrink when at most half the rows are used; returns old row -> new row.

        `lengths` maps each used row to its sequence length, so capacity can shrink too.
        """
        used = [row for row, owner in enumerate(self._owner) if owner is not None]
        if self.rows <= 1 or len(used) > self.rows // 2:
            return {row: row for row in used}
        new_rows = _pow2_at_least(max(len(used), 1))
        longest = max((lengths.get(row, 0) for row in used), default=0)
        new_capacity = max(self.chunk, _round_up(longest + 1, self.chunk))
        new_capacity = min(new_capacity, self.capacity)
        mapping = {row: index for index, row in enumerate(used)}
        index = used + [used[0] if used else 0] * (new_rows - len(used))
        owners = [self._owner[row] for row in used]
        self.gather(index, new_capacity)
        self._owner = owners + [None] * (new_rows - len(used))
        return mapping

    def gather(self, index: list[int], capacity: int) -> None:
        """Keep rows `index` (in that order) and the first `capacity` positions."""
        if self.journal is not None:
            self.journal.append(("gather", list(index), capacity))
        rows = mx.array(index)
        self.keys = [k[rows, :, :capacity] for k in self.keys]
        self.values = [v[rows, :, :capacity] for v in self.values]
        self._owner = (self._owner + [None] * len(index))[: len(index)]
        self.rows, self.capacity = len(index), capacity
        mx.eval(self.keys, self.values)

    def _resize(self, *, rows: int, capacity: int) -> None:
        if self.journal is not None:
            self.journal.append(("resize", rows, capacity))
        g = self.geometry
        if not self.keys:
            shape = (rows, g.kv_heads, capacity, g.head_dim)
            self.keys = [mx.zeros(shape, g.dtype) for _ in range(g.layers)]
            self.values = [mx.zeros(shape, g.dtype) for _ in range(g.layers)]
        else:
            def grow(a: mx.array) -> mx.array:
                if capacity > self.capacity:
                    pad = mx.zeros((a.shape[0], g.kv_heads, capacity - self.capacity, g.head_dim),
                                   g.dtype)
                    a = mx.concatenate([a, pad], axis=2)
                if rows > self.rows:
                    pad = mx.zeros((rows - self.rows, g.kv_heads, capacity, g.head_dim), g.dtype)
                    a = mx.concatenate([a, pad], axis=0)
                return a

            self.keys = [grow(k) for k in self.keys]
            self.values = [grow(v) for v in self.values]
        self._owner += [None] * (rows - self.rows)
        self.rows, self.capacity = rows, capacity
        mx.eval(self.keys, self.values)

    # ---- copying sequences in and out (prefix cache) ---------------------------------------
    def read_row(self, row: int, length: int) -> tuple[list[mx.array], list[mx.array]]:
        keys = [k[row:row + 1, :, :length] for k in self.keys]
        values = [v[row:row + 1, :, :length] for v in self.values]
        return keys, values

    def write_row(self, row: int, keys: list[mx.array], values: list[mx.array]) -> None:
        length = keys[0].shape[2]
        self.ensure_capacity(length + 1)
        for i in range(len(self.keys)):
            self.keys[i][row:row + 1, :, :length] = keys[i]
            self.values[i][row:row + 1, :, :length] = values[i]
