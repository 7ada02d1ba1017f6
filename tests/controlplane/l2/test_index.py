"""The L2 index's parts against an in-memory store, on hand-driven time: each interval
(flush, mirror refresh and reload, remembered answers, retry pauses, expiry) is moved
past by the test, never waited for, and each background job is held where the test
needs to interleave with it."""

from __future__ import annotations

import pytest

from controlplane.core.l2 import index as l2_index
from tests.controlplane.l2.fakes import FakeStore, ManualTime, row, unit


def build(store: FakeStore, time: ManualTime, **options) -> l2_index.L2Index:
    return l2_index.L2Index(store, l2_index.Options(**options), time.time)


@pytest.fixture
def time() -> ManualTime:
    return ManualTime()


async def test_own_writes_are_found_at_once_and_the_flush_waits_for_its_interval(time):
    store = FakeStore()
    l2 = build(store, time, flush_interval_s=2.0, mirror_max_rows=0)
    await l2.insert([row("s", 1)])
    store.records.clear()                   # the store has not made it searchable yet
    assert [c.ref for c in await l2.search("s", unit(1), 3, 0.0)] == ["ref-s-1"]
    await time.advance(1.9)
    assert store.calls["flush"] == 0 and len(l2.recent) == 1
    await time.advance(0.1)
    assert store.calls["flush"] == 1 and len(l2.recent) == 0
    assert await l2.search("s", unit(1), 3, 0.0) == []     # only the store answers now
    await l2.close()


async def test_a_failed_flush_keeps_the_rows_and_the_next_write_tries_again(time):
    store = FakeStore()
    l2 = build(store, time, flush_interval_s=1.0, mirror_max_rows=0)
    store.fail.add("flush")
    await l2.insert([row("s", 1)])
    await time.advance(1.0)
    assert store.calls["flush"] == 1 and len(l2.recent) == 1
    store.fail.clear()
    await l2.insert([row("s", 2)])
    await time.advance(1.0)
    assert store.calls["flush"] == 2 and len(l2.recent) == 0
    await l2.close()


async def test_a_mirrored_scope_is_searched_in_memory_and_follows_the_store(time):
    store = FakeStore()
    l2 = build(store, time, mirror_refresh_s=5.0, mirror_reload_s=300.0)
    await l2.insert([row("s", 1), row("s", 2)])
    await l2.search("s", unit(1), 3, 0.0)             # from the store; the load starts
    await time.settle()
    assert l2.mirrored.scopes.get("s") is not None
    searches = store.calls["search"]
    assert [c.ref for c in await l2.search("s", unit(2), 1, 0.0)] == ["ref-s-2"]
    assert store.calls["search"] == searches, "answered from memory"
    other = build(FakeStore(), time)                   # another replica writes...
    await other.insert([row("s", 3)])
    store.records.extend(other.store.records)          # ...into the same shared store
    assert (await l2.search("s", unit(3), 1, 0.0))[0].ref != "ref-s-3"
    await time.advance(5.0)
    await l2.search("s", unit(3), 1, 0.0)              # the refresh is due: it starts
    await time.settle()
    assert (await l2.search("s", unit(3), 1, 0.0))[0].ref == "ref-s-3"
    store.records = [r for r in store.records if r.ref != "ref-s-1"]   # deleted elsewhere
    await time.advance(295.0)
    await l2.search("s", unit(1), 3, 0.0)              # the full reload is due
    await time.settle()
    assert "ref-s-1" not in [c.ref for c in await l2.search("s", unit(1), 3, 0.0)]
    await l2.close()
    await other.close()


async def test_a_scope_the_store_could_not_load_is_retried_after_the_pause(time):
    store = FakeStore()
    l2 = build(store, time, retry_s=5.0)
    await l2.insert([row("s", 1)])
    store.fail.add("scope_rows")
    await l2.search("s", unit(1), 1, 0.0)
    await time.settle()
    assert store.calls["scope_rows"] == 1 and "s" in l2.mirrored.unmirrorable
    store.fail.clear()
    await l2.search("s", unit(1), 1, 0.0)
    await time.settle()
    assert store.calls["scope_rows"] == 1, "not before the pause"
    await time.advance(5.0)
    await l2.search("s", unit(1), 1, 0.0)
    await time.settle()
    assert store.calls["scope_rows"] == 2 and l2.mirrored.scopes.get("s") is not None
    await l2.close()


async def test_an_invalidation_during_a_mirror_load_puts_no_row_back(time):
    store = FakeStore()
    l2 = build(store, time)
    await l2.insert([row("s", 1)])
    release = store.hold("scope_rows")
    await l2.search("s", unit(1), 1, 0.0)
    await time.settle()
    await l2.invalidate(None, None)
    release.set()
    await time.settle()
    assert l2.mirrored.scopes.get("s") is None
    assert await l2.search("s", unit(1), 1, 0.0) == []
    await l2.close()


async def test_a_shared_store_is_asked_about_a_scope_and_only_a_yes_is_remembered(time):
    store = FakeStore(exclusive=False)
    store.dim = 64                                     # another replica made the collection
    l2 = build(store, time, mirror_max_rows=0)
    assert not await l2.has_entries("s", 0.0)
    await l2.has_entries("s", 0.0)
    assert store.calls["exists"] == 2, "a no is never remembered"
    other = build(FakeStore(), time)
    await other.insert([row("s", 1)])
    store.records.extend(other.store.records)
    assert await l2.has_entries("s", 0.0) and await l2.has_entries("s", 0.0)
    assert store.calls["exists"] == 3, "a yes is remembered"
    await time.advance(30.0)
    assert await l2.has_entries("s", 0.0)
    assert store.calls["exists"] == 4, "for 30 s"
    assert store.calls["newest_per_scope"] == 0, "no scan of a shared store"
    await l2.close()
    await other.close()


async def test_the_sole_writer_scans_once_and_keeps_the_writes_made_meanwhile(time):
    store = FakeStore(exclusive=True)
    await build(store, time).insert([row("old", 1)])
    l2 = build(store, time)
    release = store.hold("newest_per_scope")
    assert await l2.has_entries("old", 0.0)            # asked of the store, scan started
    await l2.insert([row("new", 2)])                   # written while the scan runs
    release.set()
    await time.settle()
    assert l2.presence.newest is not None and set(l2.presence.newest) == {"old", "new"}
    exists = store.calls["exists"]
    assert await l2.has_entries("new", 0.0) and not await l2.has_entries("none", 0.0)
    assert store.calls["exists"] == exists, "answered from memory"
    release = store.hold("newest_per_scope")
    await l2.invalidate("acme", None)                  # forgets; the next probe rescans
    await l2.has_entries("old", 0.0)
    await time.settle()
    await l2.invalidate("acme", None)                  # again, while that scan runs
    release.set()
    await time.settle()
    assert l2.presence.newest is None, "a scan older than the invalidation is dropped"
    await l2.close()


async def test_the_expiry_deletes_rows_past_the_ttl_every_interval(time):
    store = FakeStore(exclusive=True)
    l2 = build(store, time, ttl_s=100.0, expiry_interval_s=30.0, mirror_max_rows=0)
    await l2.insert([row("a", 1)])
    await time.advance(30.0)
    await time.advance(30.0)
    await l2.insert([row("b", 2)])
    await l2.has_entries("a", 0.0)
    await time.settle()
    assert l2.presence.newest is not None and set(l2.presence.newest) == {"a", "b"}
    assert store.calls["delete_older"] == 2 and l2.expiry.deleted == 0
    await time.advance(30.0)                           # "a" is 90 s old: kept
    assert len(store.records) == 2
    await time.advance(30.0)                           # 120 s: deleted
    assert [r.ref for r in store.records] == ["ref-b-2"] and l2.expiry.deleted == 1
    assert set(l2.presence.newest) == {"b"}
    assert not await l2.has_entries("a", 0.0)
    await l2.close()
    assert time.sleeping == 0, "closing stops the expiry"
