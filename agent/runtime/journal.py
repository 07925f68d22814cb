"""The KV layout journal: what a head's cache did, replayed by followers so theirs mirror it.

A multi-process instance keeps one KV layout across its ranks: the head decides (rows grow,
compaction, prefix-cache saves and loads) and records each change here; the ops travel with the
next step's message (`links.StepMessage.kv_ops`, a tagged union on the wire) and a follower
applies them before computing (`follower.Follower.apply`).
"""

from __future__ import annotations

import msgspec


class Resize(msgspec.Struct, frozen=True, tag="resize"):
    """Grow to exactly `rows` x `capacity` positions."""

    rows: int
    capacity: int


class Gather(msgspec.Struct, frozen=True, tag="gather"):
    """Keep rows `index` (in that order) and the first `capacity` positions."""

    index: list[int]
    capacity: int


class PrefixSave(msgspec.Struct, frozen=True, tag="prefix_save"):
    """Copy the first `length` positions of `row` into prefix-cache entry `entry`."""

    entry: int
    row: int
    length: int


class PrefixLoad(msgspec.Struct, frozen=True, tag="prefix_load"):
    """Write the first `length` positions of prefix-cache entry `entry` into `row`."""

    entry: int
    row: int
    length: int


class PrefixDrop(msgspec.Struct, frozen=True, tag="prefix_drop"):
    """Forget prefix-cache entry `entry`."""

    entry: int


# The mlx-lm engine's caches are mlx-lm's own batch caches: its ranks mirror the rows instead.


class RowAcquire(msgspec.Struct, frozen=True, tag="acquire"):
    """Row `row` starts a sequence (a fresh mlx-lm prompt cache)."""

    row: int


class RowRelease(msgspec.Struct, frozen=True, tag="release"):
    """Row `row`'s sequence ended (its caches leave the batch)."""

    row: int


class DecodeRows(msgspec.Struct, frozen=True, tag="rows"):
    """This decode step computes exactly `rows` (an mlx-lm cache write always advances it)."""

    rows: list[int]


class StageCost(msgspec.Struct, frozen=True, tag="cost"):
    """A pipeline stage's KV budget and cache cost, for the head's admission at start-up."""

    budget_bytes: int
    bytes_per_token: int
    bytes_per_sequence: int


KvOp = (Resize | Gather | PrefixSave | PrefixLoad | PrefixDrop | RowAcquire | RowRelease
        | DecodeRows | StageCost)
Journal = list[KvOp]
