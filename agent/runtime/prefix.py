"""Prefix cache: KV state of recent sequences, reused by any request that starts the same way.

Chat clients resend the whole conversation every turn, so turn N+1 starts with turn N's tokens.
Causal attention makes the KV of positions [0, n) depend only on tokens [0, n), so any common
prefix is reusable, whole or in part. Entries are bounded by bytes and evicted least recently
used first. Each pipeline stage keeps its own entries for its own layers, keyed by the same
tokens, so the stages agree on what is cached without talking about it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from agent.runtime.journal import Journal, PrefixDrop


@dataclass
class PrefixEntry:
    id: int
    tokens: tuple[int, ...]
    keys: list[mx.array]  # per layer: (1, kv_heads, len(tokens), head_dim)
    values: list[mx.array]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.keys) + sum(v.nbytes for v in self.values)


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    hit_tokens: int = 0


def common_prefix_length(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: conversations share thousands of tokens.
    block = 256
    while i + block <= n and tuple(a[i:i + block]) == tuple(b[i:i + block]):
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_cache_bytes(configured: int | None, kv_budget_bytes: int) -> int:
    """The prefix cache's bound: as configured, else a quarter of the KV budget (at most
    256 MiB): a few long conversations' worth; more buys little and stays resident for good."""
    return configured if configured is not None else min(kv_budget_bytes // 4, 256 << 20)


class PrefixCache:
    def __init__(self, max_bytes: int, *, min_tokens: int = 16,
                 journal: Journal | None = None) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.journal = journal  # drops, recorded for pipeline followers that mirror entries
        self._next_id = 0
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.bytes = 0
        self.stats = PrefixStats()

    def lookup(self, prompt: list[int]) -> tuple[int, PrefixEntry | None]:
        """The longest cached prefix of `prompt` usable for it (at least one token is left to
        compute, since the last prompt position's logits are needed)."""
        best_len, best = 0, None
        for entry in self.entries.values():
            n = min(common_prefix_length(entry.tokens, prompt), len(prompt) - 1)
            if n > best_len:
                best_len, best = n, entry
        if best is None or best_len < self.min_tokens:
            self.stats.misses += 1
            return 0, None
        self.entries.move_to_end(best.tokens)
        self.stats.hits += 1
        self.stats.hit_tokens += best_len
        return best_len, best

    def store(self, tokens: list[int], keys: list[mx.array], values: list[mx.array]
              ) -> int | None:
        """Keep a sequence's KV (independent copies, see copy_rows); returns the entry's id, or
        None when it is not kept."""
        if len(tokens) < self.min_tokens or self.max_bytes <= 0:
            return None
        key = tuple(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return None
        entry = PrefixEntry(self._next_id, key, keys, values)
        if entry.nbytes > self.max_bytes:
            return None
        self._next_id += 1
        # An entry that is a prefix of the new one is redundant: the new one covers it.
        for old in [t for t in self.entries if len(t) <= len(key) and key[:len(t)] == t]:
            self._drop(old)
        self.entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and self.entries:
            self._drop(next(iter(self.entries)))
            self.stats.evictions += 1
        return entry.id

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes
        if self.journal is not None:
            self.journal.append(PrefixDrop(entry.id))

    def clear(self) -> None:
        for key in list(self.entries):
            self._drop(key)


def copy_rows(arrays: list[mx.array]) -> list[mx.array]:
    """Materialise slices as buffers of their own. A slice can share its source's buffer, and
    while it does, MLX cannot update the slot cache in place (every decode step would copy it)."""
    copies = [mx.contiguous(a) * 1 for a in arrays]
    mx.eval(copies)
    return copies
