"""The prefix cache's bookkeeping: longest usable prefix, LRU by bytes, redundant entries."""

from __future__ import annotations

import mlx.core as mx

from agent.runtime.prefix import PrefixCache, common_prefix_length


def kv(n: int) -> tuple[list[mx.array], list[mx.array]]:
    return [mx.zeros((1, 2, n, 4))], [mx.zeros((1, 2, n, 4))]


def test_common_prefix_length_crosses_block_boundaries() -> None:
    a = list(range(1000))
    b = [*list(range(700)), -1, *list(range(701, 1000))]
    assert common_prefix_length(a, b) == 700
    assert common_prefix_length(a, a[:10]) == 10


def test_partial_match_reuses_only_the_shared_part_and_leaves_one_token() -> None:
    cache = PrefixCache(1 << 20, min_tokens=4)
    cache.store(list(range(50)), *kv(50))
    assert cache.lookup([*range(30), 99, 98])[0] == 30
    # A prompt equal to the entry still leaves its last token to compute.
    assert cache.lookup(list(range(50)))[0] == 49
    assert cache.lookup([7, 7, 7, 7, 7])[0] == 0
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_entry_that_a_newer_one_extends_is_dropped() -> None:
    cache = PrefixCache(1 << 20, min_tokens=4)
    cache.store(list(range(20)), *kv(20))
    cache.store(list(range(40)), *kv(40))
    assert list(cache.entries) == [tuple(range(40))]
    assert cache.bytes == 2 * 2 * 40 * 4 * 4


def test_least_recently_used_goes_first() -> None:
    one = 2 * 2 * 10 * 4 * 4
    cache = PrefixCache(2 * one, min_tokens=4)
    cache.store([1] * 10, *kv(10))
    cache.store([2] * 10, *kv(10))
    cache.lookup([1] * 10 + [5])  # touch the first
    cache.store([3] * 10, *kv(10))
    assert set(cache.entries) == {(1,) * 10, (3,) * 10}
    assert cache.stats.evictions == 1
