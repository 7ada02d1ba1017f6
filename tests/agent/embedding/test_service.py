"""The embedding service: per-call limits, and a cache that one tenant cannot read
another's entries from. The embedder is a small deterministic stand-in behind the
protocol (the real ones are tested in test_minilm, test_onnx_path and test_tei)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import batcher, errors, service


class CountingEmbedder:
    embedder_id = "stand-in@1"
    ready = True
    queued = 0

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def probe(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    async def close(self) -> None:
        return None


def _service(**cfg: object) -> tuple[service.EmbeddingService, CountingEmbedder]:
    embedder = CountingEmbedder()
    settings = EmbedderSettings(kind="tei", tei_url="http://unused", model="m", **cfg)
    return service.EmbeddingService(settings, embedder, lru.EmbeddingLru(100, 10**6)), embedder


async def test_one_tenants_entries_are_never_another_tenants_hits():
    svc, embedder = _service()
    first = await svc.embed("m", ["Is Acme about to be acquired?"], False, "acme")
    probe = await svc.embed("m", ["Is Acme about to be acquired?"], False, "rival")
    again = await svc.embed("m", ["Is Acme about to be acquired?"], False, "acme")
    assert (first.cached, probe.cached, again.cached) == ([False], [False], [True])
    assert embedder.seen == ["Is Acme about to be acquired?"] * 2  # computed per tenant
    assert probe.vectors == first.vectors  # same text, same vector: only the cache differs


async def test_a_call_whose_tenant_is_not_trusted_neither_reads_nor_fills_the_cache():
    svc, embedder = _service()
    await svc.embed("m", ["hello"], False, "")
    untrusted = await svc.embed("m", ["hello"], False, None)
    assert untrusted.cached == [False] and len(svc.cache) == 1 and len(embedder.seen) == 2


@pytest.mark.parametrize(("texts", "words"), [
    (["a"] * 5, "5 texts; at most 4"),
    (["x" * 11], "11 characters; at most 10"),
    (["x" * 10, "y" * 10, "z"], "21 characters in all; at most 20"),
])
async def test_calls_over_a_size_limit_are_too_large_before_anything_runs(texts, words):
    svc, embedder = _service(max_texts=4, max_text_chars=10, max_call_chars=20)
    with pytest.raises(errors.TooLarge, match=words):
        await svc.embed("m", texts, False, "t")
    assert embedder.seen == [] and svc.cache.stats().misses == 0


class QueuedEmbedder(batcher.Batched):
    """A stand-in behind the real micro-batch queue: each batch waits for a permit."""

    embedder_id = "stand-in@1"
    ready = True

    def __init__(self, max_batch: int) -> None:
        self.batcher = batcher.MicroBatcher(self._run, max_batch, 0.0, max_queued=10_000)
        self.batches: list[list[str]] = []
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.arrived = asyncio.Event()

    async def _run(self, texts: list[str]) -> np.ndarray:
        self.batches.append(texts)
        self.arrived.set()
        await self.permits.get()
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    async def next_batch(self) -> list[str]:
        self.arrived.clear()
        await self.arrived.wait()
        return self.batches[-1]

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await self.batcher.submit(texts)


async def test_a_tenants_large_calls_do_not_hold_up_another_tenants_lookup():
    embedder = QueuedEmbedder(max_batch=64)
    settings = EmbedderSettings(kind="tei", tei_url="http://unused", model="m")
    svc = service.EmbeddingService(settings, embedder, lru.EmbeddingLru(10_000, 10**8))
    first = asyncio.ensure_future(embedder.next_batch())
    heavy = [asyncio.create_task(svc.embed("m", [f"a{c} {i}" for i in range(2048)], False,
                                           "acme")) for c in range(3)]
    try:
        await first
        lookup = asyncio.create_task(svc.embed("m", ["is it cached?"], False, "rival"))
        shared = asyncio.ensure_future(embedder.next_batch())
        embedder.permits.put_nowait(None)
        second_batch = await shared
        assert "is it cached?" in second_batch  # the very next batch, beside acme's texts
        embedder.permits.put_nowait(None)
        answer = await lookup
        assert answer.cached == [False] and not any(t.done() for t in heavy)
    finally:
        for task in heavy:
            task.cancel()
        await asyncio.gather(*heavy, return_exceptions=True)
        await embedder.batcher.close()
