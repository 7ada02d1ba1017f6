"""The KV block pool: capacity, prefix-cache registration, LRU eviction of free blocks."""

from __future__ import annotations

import pytest

from simulator import kv


def test_allocate_and_release_blank_blocks_track_usage() -> None:
    pool = kv.BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free == 1 and pool.usage == pytest.approx(0.75)
    pool.release(blocks)
    assert pool.num_free == 4 and pool.usage == 0


def test_over_allocation_is_refused() -> None:
    pool = kv.BlockPool(2)
    with pytest.raises(ValueError, match="cannot allocate 3 blocks"):
        pool.allocate(3)


def test_released_registered_blocks_stay_cached_and_free() -> None:
    pool = kv.BlockPool(4)
    blocks = pool.allocate(2)
    for i, h in enumerate((11, 12)):
        assert pool.register(h)
        blocks[i] = h
    pool.release(blocks)
    assert pool.num_free == 4 and pool.usage == 0  # cached blocks count as free
    assert pool.cached_prefix([11, 12, 13]) == 2
    assert pool.cached_prefix([12]) == 1 and pool.cached_prefix([99, 11]) == 0


def test_touch_takes_cached_blocks_back_out_of_the_free_pool() -> None:
    pool = kv.BlockPool(3)
    blocks = pool.allocate(1)
    pool.register(7)
    pool.release([7])
    assert pool.free_after_touch([7]) == 2
    held = pool.touch([7])
    assert held == [7] and pool.num_free == 2
    del blocks


def test_eviction_is_lru_and_tail_first() -> None:
    pool = kv.BlockPool(3)
    pool.allocate(3)
    for h in (1, 2, 3):
        pool.register(h)
    pool.release([1, 2, 3])  # tail first: 3 is least recently used, then 2, then 1
    pool.allocate(1)
    assert pool.cached_prefix([1, 2]) == 2 and pool.cached_prefix([3]) == 0
    pool.allocate(1)
    assert pool.cached_prefix([1]) == 1 and pool.cached_prefix([2]) == 0


def test_duplicate_registration_keeps_an_unregistered_copy() -> None:
    pool = kv.BlockPool(2)
    pool.allocate(2)
    assert pool.register(5)
    assert not pool.register(5)
    pool.release([5, None])
    assert pool.num_free == 2 and pool.num_cached == 1
