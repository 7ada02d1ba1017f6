"""The embedding LRU: bounded by entries and by bytes, keyed by (model, text hash)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core import lru

VEC = bytes(384 * 4)


def test_bounded_by_entries_in_least_recently_used_order():
    cache = lru.EmbeddingLru(max_entries=2, max_bytes=10**6)
    cache.put("m", "a", VEC)
    cache.put("m", "b", VEC)
    assert cache.get("m", "a") == VEC  # a is now the most recent
    cache.put("m", "c", VEC)
    assert cache.get("m", "b") is None and cache.get("m", "a") == VEC
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.hits, stats.misses) == (2, 1, 2, 1)


def test_bounded_by_bytes():
    one = len(VEC) + len("m") + lru.ENTRY_OVERHEAD
    cache = lru.EmbeddingLru(max_entries=1000, max_bytes=3 * one)
    for i in range(10):
        cache.put("m", f"t{i}", VEC)
    assert len(cache) == 3 and cache.stats().bytes == 3 * one
    cache.put("m", "huge", bytes(10 * one))  # larger than the whole cache: not stored
    assert cache.get("m", "huge") is None and len(cache) == 3


def test_models_do_not_share_entries_and_evict_by_model():
    cache = lru.EmbeddingLru(100, 10**6)
    cache.put("m1", "same text", b"\x01" * 8)
    cache.put("m2", "same text", b"\x02" * 8)
    assert cache.get("m1", "same text") != cache.get("m2", "same text")
    assert cache.evict("m1") == 1 and cache.get("m1", "same text") is None
    assert cache.get("m2", "same text") is not None
    assert cache.evict() == 1 and len(cache) == 0 and cache.stats().bytes == 0


def test_replacing_a_key_keeps_the_byte_count_right():
    cache = lru.EmbeddingLru(100, 10**6)
    cache.put("m", "a", bytes(100))
    cache.put("m", "a", bytes(40))
    assert cache.stats().bytes == 40 + 1 + lru.ENTRY_OVERHEAD and len(cache) == 1


@given(st.lists(st.tuples(st.sampled_from(["m1", "m2"]), st.text(max_size=8),
                          st.integers(min_value=0, max_value=600)), max_size=200),
       st.integers(min_value=1, max_value=20), st.integers(min_value=300, max_value=5000))
def test_bounds_hold_after_any_sequence_of_puts(ops, max_entries, max_bytes):
    cache = lru.EmbeddingLru(max_entries, max_bytes)
    for model, text, size in ops:
        cache.put(model, text, bytes(size))
        stats = cache.stats()
        assert stats.entries <= max_entries and stats.bytes <= max_bytes
    if ops:
        model, text, size = ops[-1]
        if size + len(model) + lru.ENTRY_OVERHEAD <= max_bytes:
            assert cache.get(model, text) == bytes(size)  # the newest entry always survives


def test_scopes_partition_the_cache():
    cache = lru.EmbeddingLru(max_entries=10, max_bytes=10**6)
    cache.put("m", "text", VEC, scope="a")
    assert cache.get("m", "text", scope="a") == VEC
    assert cache.get("m", "text", scope="b") is None and cache.get("m", "text") is None
    # the scope's length is hashed first: no scope/text split collides with another
    assert lru.text_key("m", "b" + "text", scope="a") != lru.text_key("m", "text", scope="ab")
    assert lru.text_key("m", "\x00\x00\x00\x01atext") != lru.text_key("m", "text", scope="a")
