"""The embedding service: per-call limits, and a cache that one tenant cannot read
another's entries from. The embedder is a small deterministic stand-in behind the
protocol (the real ones are tested in test_minilm, test_onnx_path and test_tei)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import errors, service


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
