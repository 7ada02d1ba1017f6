"""The L2 index over the Milvus store, against Milvus Lite in tmp_path: owned collection,
scoped search, the mirror, scope presence, loading a released collection, expiry."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

from controlplane import cache_wiring
from controlplane.adapters import milvus, milvus_lite_damage
from controlplane.core.l2 import index as l2_index
from controlplane.core.l2 import mirror as scope_mirror
from controlplane.core.l2 import rows
from tests import harness
from tests.clock import ManualClock
from tests.conftest import REPO
from tests.controlplane.l2.fakes import ManualTime, row, unit


def index(path: str, collection: str, time: ManualTime | None = None,
          **options) -> l2_index.L2Index:
    """An index whose intervals move only when the test moves ``time``."""
    return cache_wiring.milvus_l2(path, collection, time=(time or ManualTime()).time,
                                  **options)


@pytest.fixture
async def l2(milvus_lite_path):
    store = index(milvus_lite_path, "test_cache")
    yield store
    await store.close()


async def put(store, scope, seed, tenant="acme", model="m"):
    await store.insert([row(scope, seed, tenant, model)])


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
    first = index(milvus_lite_path, "owned")
    await put(first, "s", 1)
    await first.flush()
    await first.close()
    again = index(milvus_lite_path, "owned")
    found = await again.search("s", unit(1), 3, 0.0)
    assert [c.ref for c in found] == ["ref-s-1"]
    client = again.store._client      # type: ignore[attr-defined]
    fields = {f["name"] for f in client.describe_collection("owned")["fields"]}
    assert {"scope", "tenant", "model", "vector", "ref", "text", "created_at"} <= fields
    with pytest.raises(ValueError, match="dimension"):
        await again.search("s", np.ones(16, np.float32) / 4, 3, 0.0)
    await again.close()


async def test_rows_older_than_the_cutoff_are_not_returned(milvus_lite_path):
    now = ManualTime(5000.0)
    store = index(milvus_lite_path, "ttl", now)
    await put(store, "s", 1)
    now.now = 6000.0
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
    store = cache_wiring.milvus_l2(str(blocker / "l2.db"), "c")
    store.store._reconnect_s = 60     # type: ignore[attr-defined]
    with pytest.raises(milvus.L2Unavailable):
        await store.insert([rows.Row("s", "t", "m", unit(1), "r", "t")])
    with pytest.raises(milvus.L2Unavailable, match="failed recently"):
        await store.search("s", unit(1), 5, 0.0)     # no reconnect storm
    secret = milvus.MilvusStore("http://user:hunter2@milvus:19530", "c")
    assert "hunter2" not in secret.safe_uri()


async def test_has_entries_is_per_scope_and_forgets_on_invalidate(l2):
    assert not await l2.has_entries("s1", 0.0)       # no collection yet
    await put(l2, "s1", 1)
    assert await l2.has_entries("s1", 0.0)           # from the recent-write buffer
    await l2.flush()
    assert await l2.has_entries("s1", 0.0) and not await l2.has_entries("s2", 0.0)
    assert await l2.invalidate(None, None) == 1
    assert not await l2.has_entries("s1", 0.0)


async def _mirrored(store: l2_index.L2Index, scope: str) -> None:
    """Search until the scope's background load made it a mirrored scope."""
    await store.search(scope, unit(0), 1, 0.0)
    await harness.until(lambda: store.mirrored.scopes.get(scope) is not None
                        and store.mirrored.idle, 10, f"scope {scope} to be mirrored")


async def test_a_searched_scope_is_mirrored_and_answers_as_milvus_does(milvus_lite_path):
    store = index(milvus_lite_path, "mirror")
    for seed in range(40):
        await put(store, "s1", seed)
    await put(store, "s2", 7)
    await store.flush()
    queries = [unit(1000 + i) for i in range(5)] + [unit(3)]
    from_milvus = [await store.search("s1", q, 5, 0.0) for q in queries]
    await _mirrored(store, "s1")
    assert store.mirrored.scopes.get("s2") is None, "only searched scopes are mirrored"
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
    assert store.mirrored.scopes.get("s1") is None
    assert await store.search("s1", unit(99), 5, 0.0) == []
    await store.close()


async def test_writes_of_another_replica_reach_a_mirrored_scope(milvus_lite_path):
    now = ManualTime()
    reader = index(milvus_lite_path, "shared", now, mirror_refresh_s=5.0)
    writer = index(milvus_lite_path, "shared", mirror_max_rows=0)
    await put(writer, "s", 1)
    await writer.flush()
    await _mirrored(reader, "s")
    await put(writer, "s", 2)
    await writer.flush()
    assert (await reader.search("s", unit(2), 1, 0.0))[0].ref == "ref-s-1"   # not yet
    await now.advance(5.0)            # the refresh period is over: the next search starts one
    await reader.search("s", unit(2), 1, 0.0)
    await harness.until(lambda: reader.mirrored.idle, 10, "the refresh")
    found = await reader.search("s", unit(2), 1, 0.0)
    assert found and found[0].ref == "ref-s-2", "the other replica's row reached the mirror"
    await reader.close()
    await writer.close()


async def test_a_scope_over_the_mirror_bound_keeps_searching_milvus(milvus_lite_path):
    store = index(milvus_lite_path, "big", mirror_max_rows=5)
    for seed in range(8):
        await put(store, "s", seed)
    await store.flush()
    found = await store.search("s", unit(6), 3, 0.0)
    assert found[0].ref == "ref-s-6"
    await harness.until(lambda: "s" in store.mirrored.unmirrorable, 10, "the load to give up")
    assert (await store.search("s", unit(6), 3, 0.0))[0].ref == "ref-s-6"
    assert store.mirrored.scopes.get("s") is None and "s" in store.mirrored.unmirrorable
    await store.close()


def test_the_mirror_search_is_an_exact_top_k_and_evicts_least_recent_scopes() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    found = [scope_mirror.MirrorRow(f"r{i}", f"t{i}", vectors[i], float(i))
             for i in range(500)]
    mirror = scope_mirror.ScopeMirror(max_rows=800, refresh_s=5, reload_s=300,
                                      clock=lambda: 0.0)
    assert mirror.put("a", found[:300], 16) and mirror.put("b", found[300:], 16)
    mirror.add("a", found[:10])                        # refs already there: no duplicates
    assert mirror.rows == 500
    query = vectors[42] + 0.1 * vectors[7]
    query /= np.linalg.norm(query)
    entry = mirror.get("a")
    assert entry is not None
    top = entry.search(query, 5, min_created_at=0.0)
    expected = np.argsort(-(vectors[:300] @ query))[:5]
    assert [c.ref for c in top] == [f"r{i}" for i in expected]
    assert [c.ref for c in entry.search(query, 5, min_created_at=250.0)] == [
        f"r{i}" for i in (250 + np.argsort(-(vectors[250:300] @ query))[:5])]
    mirror.get("b")                                    # "a" is now the least recent
    assert mirror.put("c", found[:400], 16) is True    # over the bound: "a" leaves
    assert mirror.get("a") is None and mirror.get("b") is not None and mirror.rows == 600
    assert not mirror.put("huge", [*found, *found[:1]] * 3, 16), "over the bound: not kept"


async def test_the_sole_writer_of_a_lite_file_knows_every_scope_without_asking(
        milvus_lite_path):
    first = index(milvus_lite_path, "scopes")
    await put(first, "a", 1)
    await put(first, "b", 2, tenant="other")
    await first.flush()
    await first.close()
    store = index(milvus_lite_path, "scopes")
    assert await store.has_entries("a", 0.0)            # the probe, while the scan starts
    await harness.until(lambda: store.presence.newest is not None, 10, "the scope scan")
    assert store.presence.newest is not None and set(store.presence.newest) == {"a", "b"}
    assert await store.has_entries("b", 0.0) and not await store.has_entries("c", 0.0)
    newest = store.presence.newest["a"]
    assert not await store.has_entries("a", newest + 1)   # only expired rows: empty
    await put(store, "c", 3)
    assert await store.has_entries("c", 0.0)
    assert await store.invalidate("acme", None) == 2      # scopes "a" and "c"
    assert store.presence.newest is None                   # read again at the next probe
    assert await store.has_entries("b", 0.0)
    await harness.until(lambda: store.presence.newest is not None, 10, "the scope scan")
    assert store.presence.newest is not None and set(store.presence.newest) == {"b"}
    assert not await store.has_entries("a", 0.0) and await store.has_entries("b", 0.0)
    await store.close()
    assert not milvus.MilvusStore("http://milvus:19530", "c").exclusive


# -- finding 4 (issue 14): a collection Milvus holds "released" is loaded again ----------

WRITER = """
import asyncio, sys
from controlplane import cache_wiring
from tests.controlplane.l2.fakes import row

async def main():
    l2 = cache_wiring.milvus_l2(sys.argv[1], "restart")
    await l2.insert([row("s", 1), row("s", 2)])
    await l2.flush()
    await l2.close()

asyncio.run(main())
"""


async def test_a_new_process_on_an_existing_lite_file_searches_its_rows(milvus_lite_path):
    """A Milvus Lite file opened by a new process holds its collection "released": the
    store loads it (before: every search failed with 'call load()', for good)."""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", WRITER, milvus_lite_path], timeout=120,
        capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    store = index(milvus_lite_path, "restart", mirror_max_rows=0)
    assert [c.ref for c in await store.search("s", unit(1), 1, 0.0)] == ["ref-s-1"]
    assert await store.has_entries("s", 0.0)
    await store.close()


async def test_a_collection_released_while_serving_is_loaded_again(milvus_lite_path):
    store = index(milvus_lite_path, "released", mirror_max_rows=0)
    await put(store, "s", 1)
    await store.flush()
    client = store.store._client     # type: ignore[attr-defined]
    client.release_collection("released")   # what a Milvus restart leaves behind
    assert [c.ref for c in await store.search("s", unit(1), 1, 0.0)] == ["ref-s-1"]
    client.release_collection("released")
    assert await store.store.exists("s", 0.0)
    await store.close()


# -- issue 22: rows past the TTL are deleted from Milvus, not only skipped ---------------

async def test_rows_past_the_ttl_are_deleted_from_milvus_by_the_periodic_expiry(
        milvus_lite_path):
    now = ManualTime()
    store = index(milvus_lite_path, "expiry", now, ttl_s=100.0, expiry_interval_s=30.0,
                  mirror_max_rows=0)
    await put(store, "s", 1)
    await now.advance(30.0)                     # the first period: nothing is old enough
    await harness.until(lambda: now.sleeping == 1, 10, "the first expiry round")
    assert store.expiry.deleted == 0
    now.now += 50
    await put(store, "s", 2)
    await store.flush()
    await now.advance(30.0)                     # row 1 is 110 s old, row 2 30 s
    await harness.until(lambda: store.expiry.deleted == 1, 10, "the expiry to delete row 1")
    await harness.until(lambda: now.sleeping == 1, 10, "the expiry to wait again")
    left = await store.store.scope_rows("s", None, 10)
    assert [r.ref for r in left] == ["ref-s-2"]   # gone from Milvus, not only filtered
    now.now += 80
    assert await store.expire() == 1
    assert await store.store.scope_rows("s", None, 10) == []
    await store.close()


async def test_a_milvus_whose_calls_fail_is_left_alone_for_reconnect_s() -> None:
    """Probe finding: with its Lite store corrupt (or the server gone), every cache miss
    spent the whole semantic budget on it, and pymilvus logged tracebacks for each."""
    clock = ManualClock()
    store = milvus.MilvusStore("/nonexistent/l2.db", "c", reconnect_s=5.0, clock=clock)
    tried: list[int] = []

    class Corrupt:
        def search(self, *args: object, **kwargs: object) -> None:
            tried.append(1)
            raise RuntimeError("schema.json is not valid JSON")
    store._client = Corrupt()
    vector = np.ones(4, dtype=np.float32)
    with pytest.raises(RuntimeError, match=r"schema\.json"):
        await store.search("s", vector, 5, 0.0)
    for _ in range(3):
        with pytest.raises(milvus.L2Unavailable, match="failed recently"):
            await store.search("s", vector, 5, 0.0)
    assert len(tried) == 1
    clock.now += 5.1                        # then one call tries again
    with pytest.raises(RuntimeError):
        await store.search("s", vector, 5, 0.0)
    assert len(tried) == 2


async def test_calls_milvus_no_longer_answers_hold_at_most_a_few_threads() -> None:
    """A call its caller gave up on runs on in its thread: a Milvus that stopped answering
    took every thread of the default executor, which other work shares."""
    store = milvus.MilvusStore("/nonexistent/l2.db", "c", call_timeout_s=30.0)
    answer = threading.Event()

    class Silent:
        def search(self, *args: object, **kwargs: object) -> list[list[object]]:
            answer.wait(10)
            return [[]]
    store._client = Silent()
    vector = np.ones(4, dtype=np.float32)
    waiting = [asyncio.create_task(store.search("s", vector, 5, 0.0))
               for _ in range(milvus.MAX_IN_FLIGHT)]
    await asyncio.sleep(0.1)
    with pytest.raises(milvus.L2Unavailable, match="not answering"):
        await store.search("s", vector, 5, 0.0)
    answer.set()
    assert [await t for t in waiting] == [[]] * milvus.MAX_IN_FLIGHT
    assert await store.search("s", vector, 5, 0.0) == []        # free again


async def test_milvus_lites_unimplemented_method_is_not_logged_as_our_error(l2, caplog):
    """Milvus Lite's in-process gRPC server logs an ERROR with a traceback when pymilvus
    asks it for a method it lacks (the client does without): not ours to act on. Other
    records of that logger still pass."""
    import logging

    with caplog.at_level(logging.ERROR, "grpc._server"):
        await put(l2, "s1", 0)
        await l2.flush()
        logging.getLogger("grpc._server").error("Exception calling application: other",
                                                exc_info=ValueError("other"))
    assert "Method not implemented" not in caplog.text
    assert "other" in caplog.text


# -- a damaged Milvus Lite store is moved aside, never deleted; a held one is left alone ---

async def test_a_garbage_lite_store_is_moved_aside_and_the_cache_works_again(
        milvus_lite_path, caplog):
    """Before: every open failed ("Open local milvus failed") and every lookup missed,
    for good."""
    import logging
    import pathlib

    garbage = b"\x00not a Milvus Lite store\xff" * 200
    await asyncio.to_thread(pathlib.Path(milvus_lite_path).write_bytes, garbage)
    store = index(milvus_lite_path, "fresh")
    with caplog.at_level(logging.ERROR, "controlplane.adapters.milvus"):
        await put(store, "s", 1)
        await store.flush()
        assert [c.ref for c in await store.search("s", unit(1), 1, 0.0)] == ["ref-s-1"]
    await store.close()
    moved = [p for p in pathlib.Path(milvus_lite_path).parent.iterdir()
             if p.name.startswith("milvus-lite.db.corrupt-")]
    assert len(moved) == 1 and moved[0].read_bytes() == garbage     # kept, as it was
    ours = [r.getMessage() for r in caplog.records if r.name == "controlplane.adapters.milvus"]
    assert len(ours) == 1 and str(moved[0]) in ours[0] and "damaged" in ours[0]


def test_an_open_that_timed_out_is_not_checked_for_damage(milvus_lite_path) -> None:
    """A slow load on a busy machine ("wait for loading collection timeout") is no damage;
    the direct open that checks for it held the store a second time and stretched the
    outage past a restart test's patience."""
    store = milvus.MilvusStore(milvus_lite_path, "c", reconnect_s=0.0)
    checked: list[bool] = []

    def slow() -> None:
        raise RuntimeError("<MilvusException: (code=1, message=[load_collection] Retry "
                           "timeout: 30.0s, message=wait for loading collection timeout)>")

    store._open_collection = slow                               # type: ignore[method-assign]
    store._set_aside_if_damaged = lambda: checked.append(True) or False  # type: ignore
    with pytest.raises(RuntimeError, match="timeout"):
        store._open_sync()
    assert checked == []


HOLDER = """
import asyncio, sys
from controlplane.adapters import milvus

async def main():
    store = milvus.MilvusStore(sys.argv[1], "held")
    await store.create(8)
    print("holding", flush=True)
    await asyncio.to_thread(sys.stdin.read)     # until the test closes stdin
    await store.close()

asyncio.run(main())
"""


async def test_a_lite_store_another_process_holds_is_not_moved(milvus_lite_path, caplog):
    """Milvus Lite allows one process per store: a second control plane on the same file
    fails to open it, and must not take that for damage and move the first one's store."""
    import logging
    import pathlib

    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, milvus_lite_path, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 120)
        assert line == b"holding\n", line
        store = milvus.MilvusStore(milvus_lite_path, "held", reconnect_s=0.0)
        with caplog.at_level(logging.ERROR, "controlplane.adapters.milvus"):
            for _ in range(2):
                with pytest.raises(milvus.L2Unavailable, match="cannot open"):
                    await store.open()
        await store.close()
        siblings = sorted(p.name for p in pathlib.Path(milvus_lite_path).parent.iterdir())
        assert siblings == ["milvus-lite.db"], siblings
        assert (pathlib.Path(milvus_lite_path) / "collections" / "held").is_dir()
        assert not [r for r in caplog.records if r.name == "controlplane.adapters.milvus"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), 60)
    assert holder.returncode == 0


# -- damage is only what a damaged store raised; old moved copies are pruned --------------

MAKER = """
import asyncio, sys
from controlplane import cache_wiring
from tests.controlplane.l2.fakes import row

async def main():
    l2 = cache_wiring.milvus_l2(sys.argv[1], "kept")
    await l2.insert([row("s", seed) for seed in range(20)])
    await l2.flush()
    await l2.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def healthy_store(tmp_path_factory):
    """A Milvus Lite store with one flushed segment (a Parquet data file, a ``.npy`` index
    file, two manifests, a schema), written by another process, as a restart finds it."""
    path = tmp_path_factory.mktemp("healthy") / "milvus-lite.db"
    done = subprocess.run([sys.executable, "-c", MAKER, str(path)], timeout=120,
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return path


def _copy(healthy_store, milvus_lite_path):
    import pathlib
    import shutil

    shutil.copytree(healthy_store, milvus_lite_path)
    return pathlib.Path(milvus_lite_path)


_DATA = "collections/kept/partitions/*/data/*.parquet"
_INDEX = "collections/kept/partitions/*/indexes/*.idx"

# (files, how they are damaged, what milvus-lite 3.2 raised opening the store directly)
DAMAGE = {
    "data-file-truncated": (_DATA, lambda b: b[:len(b) // 2], "ArrowInvalid"),
    "data-page-header-overwritten": (_DATA, lambda b: b[:4] + b"\xff" * 16 + b[20:],
                                     "OSError"),
    "index-file-emptied": (_INDEX, lambda b: b"", "EOFError"),
    "index-file-truncated": (_INDEX, lambda b: b[:len(b) // 2], "ValueError"),
    "index-file-zeroed": (_INDEX, lambda b: bytes(len(b)), "ValueError"),
    "both-manifests-truncated": ("collections/kept/manifest.json*",
                                 lambda b: b[:len(b) // 2], "ManifestCorruptedError"),
    "schema-emptied": ("collections/kept/schema.json", lambda b: b"", "SchemaValidationError"),
    "schema-not-utf8": ("collections/kept/schema.json", lambda b: b"\xff" + b[1:],
                        "UnicodeDecodeError"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_store_damaged_on_disk_is_moved_aside_and_the_cache_works_again(
        damage, healthy_store, milvus_lite_path, caplog):
    """Each way a real store was damaged on purpose (before: an index file emptied or a
    Parquet page header overwritten raised ``EOFError`` / a bare ``OSError``, neither taken
    for damage, and every lookup missed for good)."""
    import logging

    files, spoil, raised = DAMAGE[damage]

    def spoiled_copy():
        store_dir = _copy(healthy_store, milvus_lite_path)
        spoiled = sorted(store_dir.glob(files))
        assert spoiled, files
        for f in spoiled:
            f.write_bytes(spoil(f.read_bytes()))
        return store_dir

    store_dir = await asyncio.to_thread(spoiled_copy)
    store = index(milvus_lite_path, "kept", mirror_max_rows=0)
    with caplog.at_level(logging.ERROR, "controlplane.adapters.milvus"):
        assert await store.search("s", unit(1), 1, 0.0) == []       # a fresh store
        await put(store, "s", 1)
        await store.flush()
        assert [c.ref for c in await store.search("s", unit(1), 1, 0.0)] == ["ref-s-1"]
    await store.close()
    moved = [p for p in store_dir.parent.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and (moved[0] / "collections" / "kept").is_dir()
    ours = [r.getMessage() for r in caplog.records if r.name == "controlplane.adapters.milvus"]
    assert len(ours) == 1 and f"damaged ({raised}: " in ours[0], ours


def test_a_bad_argument_on_a_healthy_store_does_not_move_it(healthy_store, milvus_lite_path):
    """A ``TypeError`` or ``ValueError`` of a bug or a bad argument is no damage (before:
    both were, and a healthy store, the whole cache, was moved aside)."""
    from milvus_lite import db as lite_db

    store_dir = _copy(healthy_store, milvus_lite_path)
    assert milvus_lite_damage.move_if_damaged(lite_db, str(store_dir), 123) is None    # TypeError
    assert sorted(p.name for p in store_dir.parent.iterdir()) == ["milvus-lite.db"]
    for exc in (ValueError("bad argument"), TypeError("bad argument"), KeyError("x"),
                OSError("no errno, not from the Parquet reader")):
        assert not milvus_lite_damage.damaged(exc, str(store_dir))
    elsewhere = FileExistsError(17, "exists", "/elsewhere")
    assert not milvus_lite_damage.damaged(elsewhere, str(store_dir))
    inside = FileExistsError(17, "exists", str(store_dir))
    assert milvus_lite_damage.damaged(inside, str(store_dir))


async def test_only_the_newest_moved_copies_are_kept(milvus_lite_path, caplog):
    """A store that keeps breaking cannot fill the disk with copies of the cache (before:
    every copy stayed); another store's copies and other names are left alone."""
    import logging
    import pathlib

    folder = pathlib.Path(milvus_lite_path).parent
    old = ["20250101T000000Z", "20250101T000000Z-2", "20250101T000000Z-10",
           "20250102T000000Z"]
    others = ["other.db.corrupt-20240101T000000Z", "milvus-lite.db.corrupt-notes"]

    def seed() -> None:
        for stamp in old:
            (folder / f"milvus-lite.db.corrupt-{stamp}").mkdir()
            (folder / f"milvus-lite.db.corrupt-{stamp}" / "LOCK").write_bytes(b"")
        for name in others:
            (folder / name).write_bytes(b"not ours to delete")
        pathlib.Path(milvus_lite_path).write_bytes(b"\x00not a Milvus Lite store\xff" * 200)

    await asyncio.to_thread(seed)
    store = index(milvus_lite_path, "fresh")
    with caplog.at_level(logging.WARNING, "controlplane.adapters.milvus"):
        await put(store, "s", 1)
    await store.close()
    left = sorted(p.name for p in folder.iterdir() if ".corrupt-" in p.name)
    new = [n for n in left if n.removeprefix("milvus-lite.db.corrupt-") not in [*old, "notes"]
           and n not in others]
    assert len(new) == 1
    kept = ["milvus-lite.db.corrupt-20250101T000000Z-10", "milvus-lite.db.corrupt-20250102T000000Z"]
    assert left == sorted([*kept, *new, *others])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and r.name == "controlplane.adapters.milvus"]
    assert len(warned) == 1 and "deleted 2 old" in warned[0]
    for gone in ("20250101T000000Z", "20250101T000000Z-2"):
        assert str(folder / f"milvus-lite.db.corrupt-{gone}") in warned[0]
