"""Tables partitioned by tenant: one tenant's writes evict only its own entries, within its
equal share of the table's total."""

from __future__ import annotations

from controlplane.core import tenant_lru


def test_each_tenant_gets_an_equal_share_of_the_total_and_at_least_one() -> None:
    assert tenant_lru.share(100, 4) == 25
    assert tenant_lru.share(100, 0) == 100          # no tenants configured: one share
    assert tenant_lru.share(3, 10) == 1


def test_a_flood_from_one_tenant_never_evicts_anothers_entry() -> None:
    table: tenant_lru.TenantLRU[str] = tenant_lru.TenantLRU(10, tenants=2)
    table.put("b", "kept", "b's")
    evicted = [table.put("a", f"k{i}", "a's") for i in range(100)]
    assert table.get("b", "kept") == "b's"
    assert all(e == [] for e in evicted[:5])        # a's share: 5 entries
    assert evicted[5] == [("k0", "a's")]            # then a's own oldest goes first
    assert [table.peek("a", f"k{i}") for i in (94, 95, 99)] == [None, "a's", "a's"]
    assert len(table) == 6 and len(table) <= 10


def test_a_tenants_bytes_are_bounded_by_its_share_and_counted_in_all() -> None:
    table: tenant_lru.TenantLRU[bytes] = tenant_lru.TenantLRU(100, 2, 2048, len)
    table.put("b", "kept", b"x" * 1000)
    for i in range(10):
        table.put("a", f"k{i}", b"y" * 400)
    assert table.peek("b", "kept") is not None
    assert [k for _, k, _ in table.items("a")] == ["k8", "k9"]    # 1024 bytes: two fit
    assert table.bytes_used == 1800 <= 2048


def test_a_read_makes_an_entry_the_tenants_most_recent_and_a_peek_does_not() -> None:
    table: tenant_lru.TenantLRU[int] = tenant_lru.TenantLRU(2)
    table.put("a", "x", 1)
    table.put("a", "y", 2)
    table.peek("a", "x")
    table.put("a", "z", 3)
    assert table.peek("a", "x") is None
    table.get("a", "y")
    table.put("a", "w", 4)
    assert table.peek("a", "y") == 2 and table.peek("a", "z") is None


def test_older_entries_go_under_newer_ones_and_within_the_share() -> None:
    table: tenant_lru.TenantLRU[str] = tenant_lru.TenantLRU(6, tenants=2)
    table.put("a", "new", "newer")
    evicted = table.put_older("a", [("o1", "1"), ("o2", "2"), ("new", "stale"), ("o3", "3")])
    assert evicted == [("o1", "1")]
    assert [(k, v) for _, k, v in table.items("a")] == [("o2", "2"), ("o3", "3"),
                                                        ("new", "newer")]


def test_removing_a_tenants_last_entry_leaves_nothing_behind() -> None:
    table: tenant_lru.TenantLRU[bytes] = tenant_lru.TenantLRU(4, 2, 100, len)
    table.put("a", "k", b"abc")
    assert table.pop("a", "k") == b"abc" and table.pop("a", "k") is None
    assert len(table) == 0 and table.bytes_used == 0 and list(table.items()) == []
