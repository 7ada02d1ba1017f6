"""L2 Milvus adapter against Milvus Lite in tmp_path: owned collection, scoped search."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.adapters import milvus


def unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
async def l2(milvus_lite_path):
    store = milvus.MilvusL2(milvus_lite_path, "test_cache", flush_interval_s=0.05)
    yield store
    await store.close()


async def put(store, scope, seed, tenant="acme", model="m"):
    await store.insert([milvus.Row(scope=scope, tenant=tenant, model=model, vector=unit(seed),
                                   ref=f"ref-{scope}-{seed}", text=f"text {seed}")])


async def test_search_stays_in_its_scope_before_and_after_flush(l2):
    assert await l2.search("s1", unit(1), 5, 0.0) == []      # nothing stored yet
    for seed in range(3):
        await put(l2, "s1", seed)
    await put(l2, "s2", 0)                                   # same vector, other scope
    for flushed in (False, True):
        if flushed:
            await l2.flush()
        found = await l2.search("s1", unit(0), 5, 0.0)
        assert found[0].ref == "ref-s1-0"
        assert {c.ref for c in found} == {"ref-s1-0", "ref-s1-1", "ref-s1-2"}
        assert found[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert found[0].text == "text 0"
        np.testing.assert_allclose(found[0].vector, unit(0), atol=1e-6)


async def test_the_collection_is_created_once_with_its_schema_and_reopened(milvus_lite_path):
    first = milvus.MilvusL2(milvus_lite_path, "owned")
    await put(first, "s", 1)
    await first.flush()
    await first.close()
    again = milvus.MilvusL2(milvus_lite_path, "owned")
    found = await again.search("s", unit(1), 3, 0.0)
    assert [c.ref for c in found] == ["ref-s-1"]
    fields = {f["name"] for f in again._client.describe_collection("owned")["fields"]}
    assert {"scope", "tenant", "model", "vector", "ref", "text", "created_at"} <= fields
    with pytest.raises(ValueError, match="dimension"):
        await again.search("s", np.ones(16, np.float32) / 4, 3, 0.0)
    await again.close()


async def test_rows_older_than_the_cutoff_are_not_returned(milvus_lite_path):
    now = [5000.0]
    store = milvus.MilvusL2(milvus_lite_path, "ttl", clock=lambda: now[0])
    await put(store, "s", 1)
    now[0] = 6000.0
    await put(store, "s", 2)
    await store.flush()
    found = await store.search("s", unit(1), 5, min_created_at=5500.0)
    assert [c.ref for c in found] == ["ref-s-2"]
    await store.close()


async def test_invalidate_by_tenant_model_and_all(l2):
    await put(l2, "a", 1, tenant='we"ird\\tenant')
    await put(l2, "b", 2, tenant="globex", model="m1")
    await put(l2, "c", 3, tenant="globex", model="m2")
    assert await l2.invalidate('we"ird\\tenant', None) == 1
    assert await l2.search("a", unit(1), 5, 0.0) == []
    assert await l2.invalidate(None, "m1") == 1
    assert [c.ref for c in await l2.search("c", unit(3), 5, 0.0)] == ["ref-c-3"]
    assert await l2.invalidate(None, None) == 1
    assert await l2.search("c", unit(3), 5, 0.0) == []


async def test_unusable_location_fails_fast_and_names_no_secret(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = milvus.MilvusL2(str(blocker / "l2.db"), "c", reconnect_s=60)
    with pytest.raises(milvus.L2Unavailable):
        await store.insert([milvus.Row("s", "t", "m", unit(1), "r", "t")])
    with pytest.raises(milvus.L2Unavailable, match="failed recently"):
        await store.search("s", unit(1), 5, 0.0)     # no reconnect storm
    secret = milvus.MilvusL2("http://user:hunter2@milvus:19530", "c")
    assert "hunter2" not in secret._safe_uri()


async def test_has_entries_is_per_scope_and_forgets_on_invalidate(l2):
    assert not await l2.has_entries("s1", 0.0)       # no collection yet
    await put(l2, "s1", 1)
    assert await l2.has_entries("s1", 0.0)           # from the recent-write buffer
    await l2.flush()
    assert await l2.has_entries("s1", 0.0) and not await l2.has_entries("s2", 0.0)
    assert await l2.invalidate(None, None) == 1
    assert not await l2.has_entries("s1", 0.0)
