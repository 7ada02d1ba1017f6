"""L2 Milvus adapter against Milvus Lite in tmp_path: owned collection, scoped search."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from controlplane.adapters import milvus, scope_mirror


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


async def _mirrored(store: milvus.MilvusL2, scope: str) -> None:
    """Search until the scope's background load made it a mirrored scope."""
    for _ in range(200):
        await store.search(scope, unit(0), 1, 0.0)
        if store._mirror.get(scope) is not None and not store._mirror_tasks:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"scope {scope} was never mirrored")


async def test_a_searched_scope_is_mirrored_and_answers_as_milvus_does(milvus_lite_path):
    store = milvus.MilvusL2(milvus_lite_path, "mirror", flush_interval_s=0.05)
    for seed in range(40):
        await put(store, "s1", seed)
    await put(store, "s2", 7)
    await store.flush()
    queries = [unit(1000 + i) for i in range(5)] + [unit(3)]
    from_milvus = [await store.search("s1", q, 5, 0.0) for q in queries]
    await _mirrored(store, "s1")
    assert store._mirror.get("s2") is None, "only searched scopes are mirrored"
    from_mirror = [await store.search("s1", q, 5, 0.0) for q in queries]
    for a, b in zip(from_milvus, from_mirror, strict=True):
        assert [c.ref for c in a] == [c.ref for c in b]
        np.testing.assert_allclose([c.similarity for c in a], [c.similarity for c in b],
                                   atol=1e-5)
        assert [c.text for c in a] == [c.text for c in b]
    await put(store, "s1", 99)                        # an own write is found at once
    assert (await store.search("s1", unit(99), 1, 0.0))[0].ref == "ref-s1-99"
    newest = (await store.search("s1", unit(99), 1, 0.0))[0].created_at
    assert await store.search("s1", unit(99), 5, min_created_at=newest + 1) == []
    assert await store.has_entries("s1", 0.0)
    assert await store.invalidate(None, None) == 42
    assert store._mirror.get("s1") is None
    assert await store.search("s1", unit(99), 5, 0.0) == []
    await store.close()


async def test_writes_of_another_replica_reach_a_mirrored_scope(milvus_lite_path):
    reader = milvus.MilvusL2(milvus_lite_path, "shared", mirror_refresh_s=0.1)
    writer = milvus.MilvusL2(milvus_lite_path, "shared", mirror_max_rows=0)
    await put(writer, "s", 1)
    await writer.flush()
    await _mirrored(reader, "s")
    await put(writer, "s", 2)
    await writer.flush()
    for _ in range(100):
        found = await reader.search("s", unit(2), 1, 0.0)
        if found and found[0].ref == "ref-s-2":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the other replica's row never reached the mirror")
    await reader.close()
    await writer.close()


async def test_a_scope_over_the_mirror_bound_keeps_searching_milvus(milvus_lite_path):
    store = milvus.MilvusL2(milvus_lite_path, "big", mirror_max_rows=5)
    for seed in range(8):
        await put(store, "s", seed)
    await store.flush()
    for _ in range(40):
        found = await store.search("s", unit(6), 3, 0.0)
        assert found[0].ref == "ref-s-6"
        if "s" in store._unmirrorable:
            break
        await asyncio.sleep(0.05)
    assert store._mirror.get("s") is None and "s" in store._unmirrorable
    await store.close()


def test_the_mirror_search_is_an_exact_top_k_and_evicts_least_recent_scopes() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [scope_mirror.MirrorRow(f"r{i}", f"t{i}", vectors[i], float(i)) for i in range(500)]
    mirror = scope_mirror.ScopeMirror(max_rows=800, refresh_s=5, reload_s=300,
                                      clock=lambda: 0.0)
    assert mirror.put("a", rows[:300], 16) and mirror.put("b", rows[300:], 16)
    mirror.add("a", rows[:10])                         # refs already there: no duplicates
    assert mirror.rows == 500
    query = vectors[42] + 0.1 * vectors[7]
    query /= np.linalg.norm(query)
    entry = mirror.get("a")
    assert entry is not None
    found = entry.search(query, 5, min_created_at=0.0)
    expected = np.argsort(-(vectors[:300] @ query))[:5]
    assert [c.ref for c in found] == [f"r{i}" for i in expected]
    assert [c.ref for c in entry.search(query, 5, min_created_at=250.0)] == [
        f"r{i}" for i in (250 + np.argsort(-(vectors[250:300] @ query))[:5])]
    mirror.get("b")                                    # "a" is now the least recent
    assert mirror.put("c", rows[:400], 16) is True     # over the bound: "a" leaves
    assert mirror.get("a") is None and mirror.get("b") is not None and mirror.rows == 600
    assert not mirror.put("huge", [*rows, *rows[:1]] * 3, 16), "over the bound: not kept"


async def test_the_sole_writer_of_a_lite_file_knows_every_scope_without_asking(
        milvus_lite_path):
    first = milvus.MilvusL2(milvus_lite_path, "scopes")
    await put(first, "a", 1)
    await put(first, "b", 2, tenant="other")
    await first.flush()
    await first.close()
    store = milvus.MilvusL2(milvus_lite_path, "scopes")
    assert await store.has_entries("a", 0.0)            # the probe, while the scan starts
    for _ in range(100):
        if store._scope_newest is not None:
            break
        await asyncio.sleep(0.05)
    assert store._scope_newest is not None and set(store._scope_newest) == {"a", "b"}
    assert await store.has_entries("b", 0.0) and not await store.has_entries("c", 0.0)
    newest = store._scope_newest["a"]
    assert not await store.has_entries("a", newest + 1)   # only expired rows: empty
    await put(store, "c", 3)
    assert await store.has_entries("c", 0.0)
    assert await store.invalidate("acme", None) == 2      # scopes "a" and "c"
    assert store._scope_newest is None                     # read again at the next probe
    assert await store.has_entries("b", 0.0)
    for _ in range(100):
        if store._scope_newest is not None:
            break
        await asyncio.sleep(0.05)
    assert store._scope_newest is not None and set(store._scope_newest) == {"b"}
    assert not await store.has_entries("a", 0.0) and await store.has_entries("b", 0.0)
    await store.close()
    assert not milvus.MilvusL2("http://milvus:19530", "c")._sole_writer
