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


KvOp = Resize | Gather | PrefixSave | PrefixLoad | PrefixDrop
Journal = list[KvOp]
