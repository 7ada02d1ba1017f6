"""L1 exact layer: the in-process LRU and real Redis behave alike (TTL, bounds, invalidation)."""

from __future__ import annotations

import pytest
import redis.exceptions

from controlplane.adapters import l1, l1_journal
from tests import harness
from tests.clock import ManualClock
from tests.controlplane.l2.fakes import ManualTime


@pytest.fixture(params=["memory", "journaled", "redis"])
async def store(request, tmp_path):
    if request.param in ("memory", "journaled"):
        journal = (l1_journal.SqliteJournal(str(tmp_path / "l1.sqlite"))
                   if request.param == "journaled" else None)
        s = l1.MemoryL1(max_entries=100, max_bytes=10**6, journal=journal)
        yield s
    else:
        redis_server = request.getfixturevalue("redis_server")
        s = l1.RedisL1(redis_server.url, timeout_s=1.0)
        yield s
    await s.close()


async def test_get_set_and_keys_are_per_tenant_and_model(store):
    assert await store.get("acme", "m1", "k") is None
    assert await store.set("acme", "m1", "k", b"answer", ttl_s=60)
    assert await store.get("acme", "m1", "k") == b"answer"
    assert await store.get("globex", "m1", "k") is None
    assert await store.get("acme", "m2", "k") is None


async def test_invalidate_by_tenant_model_or_everything(store):
    for tenant in ("acme", "globex"):
        for model in ("m1", "m2"):
            await store.set(tenant, model, "k", b"v", ttl_s=60)
    assert await store.invalidate("acme", None) == 2
    assert await store.get("acme", "m1", "k") is None
    assert await store.invalidate(None, "m2") == 1
    assert await store.get("globex", "m1", "k") == b"v"
    assert await store.invalidate(None, None) == 1
    assert await store.get("globex", "m1", "k") is None


async def test_oversized_values_are_refused():
    small = l1.MemoryL1(max_entries=10, max_bytes=4096)
    assert not await small.set("t", "m", "k", b"x" * 5000, ttl_s=60)
    assert await small.get("t", "m", "k") is None


async def test_memory_ttl_is_absolute_a_hit_does_not_extend_it():
    clock = ManualClock(1000.0)
    s = l1.MemoryL1(max_entries=10, max_bytes=10**6, clock=clock)
    await s.set("t", "m", "k", b"v", ttl_s=10)
    clock.now += 9
    assert await s.get("t", "m", "k") == b"v"
    clock.now += 2          # 11 s after the write, 2 s after the last hit
    assert await s.get("t", "m", "k") is None
    assert len(s) == 0


async def test_memory_lru_bounds_entries_and_bytes():
    s = l1.MemoryL1(max_entries=3, max_bytes=10**6)
    for k in "abc":
        await s.set("t", "m", k, b"v", ttl_s=60)
    await s.get("t", "m", "a")                  # a is now the most recent
    await s.set("t", "m", "d", b"v", ttl_s=60)
    assert await s.get("t", "m", "b") is None
    assert [await s.get("t", "m", k) for k in "acd"] == [b"v"] * 3

    by_bytes = l1.MemoryL1(max_entries=100, max_bytes=2048)
    for k in "abc":
        await by_bytes.set("t", "m", k, b"x" * 1000, ttl_s=60)
    assert by_bytes.bytes_used <= 2048 and await by_bytes.get("t", "m", "a") is None


async def test_redis_ttl_is_set_at_write(redis_server):
    s = l1.RedisL1(redis_server.url, timeout_s=1.0)
    await s.set("t", "m", "k", b"v", ttl_s=30)
    ttl_ms = await s._client.pttl(l1.storage_key("t", "m", "k"))
    assert 0 < ttl_ms <= 30_000
    await s.get("t", "m", "k")
    assert await s._client.pttl(l1.storage_key("t", "m", "k")) <= ttl_ms
    await s.close()


async def test_redis_down_raises_quickly_instead_of_hanging(redis_server):
    # a second for the set while Redis runs (a loaded machine may take more than a moment);
    # once it is killed, the get fails at once rather than waiting for an answer
    s = l1.RedisL1(redis_server.url, timeout_s=1.0)
    await s.set("t", "m", "k", b"v", ttl_s=30)
    redis_server.kill()
    # The response cache turns this into a counted miss.
    with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        await s.get("t", "m", "k")
    await s.close()


def journaled(path, time: ManualTime, **bounds) -> l1.MemoryL1:
    """An in-process L1 kept in ``path``; ``time`` is its wall and monotonic clock and
    drives the journal's write-behind."""
    limits = {"max_entries": 100, "max_bytes": 10**6, **bounds}
    return l1.MemoryL1(**limits, clock=time, wall=time,
                       journal=l1_journal.SqliteJournal(str(path), 1.0, time.sleep))


async def restarted(path, time: ManualTime, **bounds) -> l1.MemoryL1:
    """A new process's L1 on the same journal, once it has read it back."""
    store = journaled(path, time, **bounds)
    await store.get("-", "-", "-")          # the first call starts reading the journal
    await time.settle()
    assert store._restore is not None
    await store._restore
    return store


async def test_a_journaled_l1_keeps_its_entries_across_a_restart(tmp_path):
    path, time = tmp_path / "data" / "l1.sqlite", ManualTime()
    first = journaled(path, time)
    await first.set("acme", "m", "kept", b"answer", ttl_s=600)
    await first.set("acme", "m", "short", b"gone soon", ttl_s=60)
    await first.set("globex", "m", "dropped", b"invalidated", ttl_s=600)
    await first.invalidate("globex", None)
    await first.close()                     # a clean stop writes everything behind
    time.now += 120
    again = await restarted(path, time)
    assert await again.get("acme", "m", "kept") == b"answer"
    assert await again.get("acme", "m", "short") is None, "expired while stopped"
    assert await again.get("globex", "m", "dropped") is None, "invalidated before the stop"
    time.now += 481                         # the TTL stays absolute across the restart
    assert await again.get("acme", "m", "kept") is None
    await again.close()


async def test_the_journal_is_written_behind_and_read_under_newer_writes(tmp_path):
    path, time = tmp_path / "l1.sqlite", ManualTime()
    journal = l1_journal.SqliteJournal(str(path), 1.0, time.sleep)
    first = l1.MemoryL1(2, 10**6, clock=time, wall=time, journal=journal)
    for key in ("a", "b", "c"):             # "a" is evicted: its copy goes too
        await first.set("t", "m", key, key.encode(), ttl_s=600)
    await time.advance(0.9)
    assert not journal.idle
    await time.advance(0.1)                 # the write-behind interval: to disk now
    await harness.until(lambda: journal.idle, 10, "the write-behind")
    crashed = await restarted(path, time)   # as after a crash: "first" never closed
    assert await crashed.get("t", "m", "c") == b"c"
    assert await crashed.get("t", "m", "a") is None
    await crashed.close()
    second = journaled(path, time)
    await second.set("t", "m", "b", b"newer", ttl_s=600)    # before the journal is read
    await time.settle()
    await second._restore
    assert await second.get("t", "m", "b") == b"newer"
    assert await second.get("t", "m", "c") == b"c"
    assert await second.get("t", "m", "a") is None
    await second.close()


async def test_one_tenants_writes_never_evict_anothers_entries():
    s = l1.MemoryL1(max_entries=10, max_bytes=10**6, tenants=2)
    await s.set("victim", "m", "k", b"kept", ttl_s=60)
    for i in range(100):
        await s.set("noisy", "m", f"k{i}", b"v", ttl_s=60)
    assert await s.get("victim", "m", "k") == b"kept"
    assert await s.get("noisy", "m", "k94") is None          # its own share: 5 entries
    assert await s.get("noisy", "m", "k95") == b"v"
    assert len(s) == 6 <= 10

    by_bytes = l1.MemoryL1(max_entries=100, max_bytes=4096, tenants=2)
    await by_bytes.set("victim", "m", "k", b"x" * 1500, ttl_s=60)
    for i in range(20):
        await by_bytes.set("noisy", "m", f"k{i}", b"y" * 1000, ttl_s=60)
    assert await by_bytes.get("victim", "m", "k") == b"x" * 1500
    assert by_bytes.bytes_used == 3500 <= 4096               # the noisy one's 2048: two
    assert not await by_bytes.set("victim", "m", "big", b"z" * 3000, ttl_s=60)  # > a share


async def test_a_restart_reads_the_journal_back_within_each_tenants_share(tmp_path):
    path, time = tmp_path / "l1.sqlite", ManualTime()
    first = journaled(path, time, max_entries=8)             # one tenant: all eight
    for i in range(8):
        await first.set("noisy", "m", f"k{i}", b"v", ttl_s=600)
    await first.close()
    again = await restarted(path, time, max_entries=8, tenants=2)
    assert len(again) == 4                                   # its newest four
    assert await again.get("noisy", "m", "k3") is None
    assert await again.get("noisy", "m", "k4") == b"v"
    await again.set("victim", "m", "k", b"kept", ttl_s=600)
    await again.set("noisy", "m", "k8", b"v", ttl_s=600)
    assert await again.get("victim", "m", "k") == b"kept"
    await again.close()
