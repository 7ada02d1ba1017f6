"""The collection's dimension against vectors a broken or hostile embedder answered: no
collection is made for an implausible dimension (it would be persisted, and every later
write and search of every tenant would fail), a batch loses only its odd rows, and a
collection of the wrong dimension is reported naming the collection and both dimensions.
In memory and against Milvus Lite in tmp_path."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from controlplane import cache_wiring
from controlplane.core.l2 import index as l2_index
from controlplane.core.l2 import rows, schema
from tests.controlplane.l2.fakes import FakeStore, ManualTime, unit


def test_a_dimension_error_is_a_value_error():
    assert issubclass(schema.DimensionError, ValueError)     # counted as any L2 failure


def row(scope: str, seed: int, vector: np.ndarray) -> rows.Row:
    return rows.Row(scope=scope, tenant="acme", model="m", vector=vector,
                    ref=f"ref-{scope}-{seed}", text=f"text {seed}")


def build(store: FakeStore, **options) -> l2_index.L2Index:
    return l2_index.L2Index(store, l2_index.Options(collection="responses", **options),
                            ManualTime().time)


@pytest.mark.parametrize("dim", [1, 8, 10_000])
async def test_no_collection_is_made_for_an_implausible_first_vector(dim):
    store = FakeStore()
    l2 = build(store, mirror_max_rows=0)
    with pytest.raises(ValueError, match=f"dimension {dim}"):
        await l2.insert([row("evil", 0, unit(0, dim))])
    assert store.dim is None and store.calls["create"] == 0
    await l2.insert([row("s", 1, unit(1, 384))])        # the next honest write makes it
    assert store.dim == 384
    assert [c.ref for c in await l2.search("s", unit(1, 384), 3, 0.0)] == ["ref-s-1"]
    await l2.close()


async def test_a_batch_loses_only_its_rows_of_another_dimension():
    store = FakeStore()
    l2 = build(store, mirror_max_rows=0)
    with pytest.raises(ValueError, match="dimension 1 does not match"):
        await l2.insert([row("evil", 0, unit(0, 1)), row("s", 1, unit(1, 384)),
                         row("s", 2, unit(2, 384))])
    assert store.dim == 384
    assert sorted(r.ref for r in store.records) == ["ref-s-1", "ref-s-2"]
    await l2.close()


async def test_with_the_embedders_dimension_known_nothing_else_makes_the_collection():
    store = FakeStore()
    l2 = build(store, mirror_max_rows=0, dim=384)
    with pytest.raises(ValueError, match=r"dimension 128 .*the embedder's have 384"):
        await l2.insert([row("evil", 0, unit(0, 128))])   # plausible, but not the embedder's
    assert store.dim is None
    await l2.insert([row("s", 1, unit(1, 384))])
    assert store.dim == 384
    await l2.close()


async def test_a_collection_of_the_wrong_dimension_is_reported_once_naming_both(caplog):
    store = FakeStore()
    store.dim = 1                                       # left by an older release
    l2 = build(store, mirror_max_rows=0, dim=384)
    with caplog.at_level(logging.ERROR, logger="synapse.cache"):
        for _ in range(3):
            with pytest.raises(ValueError) as raised:
                await l2.search("s", unit(1, 384), 3, 0.0)
    message = str(raised.value)
    assert "'responses'" in message and "384" in message and "(1)" in message
    assert "cache.collection" in message
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'responses'" in errors[0].getMessage()
    await l2.close()


async def test_a_hostile_first_vector_leaves_milvus_lite_usable_after_a_restart(
        milvus_lite_path):
    first = cache_wiring.milvus_l2(milvus_lite_path, "responses", ttl_s=3600)
    with pytest.raises(ValueError):
        await first.insert([row("evil", 0, np.array([1.0], np.float32))])
    await first.close()
    again = cache_wiring.milvus_l2(milvus_lite_path, "responses", ttl_s=3600)
    await again.insert([row("s", 1, unit(1, 384))])
    assert [c.ref for c in await again.search("s", unit(1, 384), 5, 0.0)] == ["ref-s-1"]
    await again.close()
