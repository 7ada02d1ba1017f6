"""The embedding service: micro-batching, the cache in front of it, the in-process
all-MiniLM-L6-v2 path and the TEI client.

TEI is a real HTTP server in the test (aiohttp on a free port) answering ``/info`` and
``/embed`` like text-embeddings-inference, with deterministic vectors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiohttp import web

from agent import embedding
from agent.config import EmbedderSettings
from agent.core import lru
from tests import harness


def _vector(text: str, dim: int = 8) -> list[float]:
    rng = np.random.default_rng(abs(hash(text)) % 2**32)
    return [float(x) for x in rng.normal(size=dim)]


async def test_concurrent_calls_are_coalesced_into_batches():
    batches: list[int] = []

    async def run(texts: list[str]) -> np.ndarray:
        batches.append(len(texts))
        await asyncio.sleep(0.01)  # the "model" takes a while: callers pile up
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    batcher = embedding.MicroBatcher(run, max_batch=16, wait_s=0.005)
    results = await asyncio.gather(*(batcher.submit(["x" * i]) for i in range(1, 41)))
    await batcher.close()
    assert [r[0][0] for r in results] == [float(i) for i in range(1, 41)]  # each its own row
    assert sum(batches) == 40 and max(batches) <= 16 and len(batches) <= 5


async def test_a_failed_batch_fails_each_caller_and_the_next_batch_still_runs():
    calls = 0

    async def run(texts: list[str]) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise embedding.EmbedderUnavailable("down")
        return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = embedding.MicroBatcher(run, max_batch=4, wait_s=0.0)
    with pytest.raises(embedding.EmbedderUnavailable):
        await batcher.submit(["a"])
    assert (await batcher.submit(["b"])).shape == (1, 2)
    await batcher.close()


async def test_a_lone_caller_at_an_idle_model_does_not_wait_for_companions():
    batches: list[list[str]] = []

    async def run(texts: list[str]) -> np.ndarray:
        batches.append(texts)
        await asyncio.sleep(0.02)
        return np.zeros((len(texts), 1), dtype=np.float32)

    batcher = embedding.MicroBatcher(run, max_batch=16, wait_s=60)  # a window never used
    for text in ("a", "b", "c"):  # one caller, one call at a time
        await asyncio.wait_for(batcher.submit([text]), timeout=5)
    # "d" finds the model idle and runs alone; "e" and "f" arrive meanwhile and go next
    first = asyncio.create_task(batcher.submit(["d"]))
    await asyncio.sleep(0.005)
    rest = [asyncio.create_task(batcher.submit([t])) for t in ("e", "f")]
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=5)
    await batcher.close()
    assert batches == [["a"], ["b"], ["c"], ["d"], ["e", "f"]]


async def test_after_a_shared_batch_the_window_lets_returning_callers_fill_the_next():
    batches: list[int] = []

    async def run(texts: list[str]) -> np.ndarray:
        batches.append(len(texts))
        await asyncio.sleep(0.02)
        return np.zeros((len(texts), 1), dtype=np.float32)

    async def caller(batcher: embedding.MicroBatcher, i: int) -> None:
        for _ in range(3):  # each caller sends again after its own network round trip
            await batcher.submit([str(i)])
            await asyncio.sleep(0.005 * (i + 1))

    for wait_s in (5.0, 0.0):  # the window ends early once max_batch texts are there
        batches.clear()
        batcher = embedding.MicroBatcher(run, max_batch=8, wait_s=wait_s)
        await asyncio.wait_for(asyncio.gather(*(caller(batcher, i) for i in range(8))), 10)
        await batcher.close()
        if wait_s:
            assert batches == [8, 8, 8]
        else:  # the first caller back finds the model idle and runs alone, and so on
            assert batches[0] == 8 and len(batches) > 3 and max(batches[1:]) < 8


@pytest.fixture(scope="module")
def minilm():
    return embedding.load_minilm()


async def test_minilm_vectors_equal_sentence_transformers_for_mixed_length_batches(minilm):
    texts = ["hi", "How do I reset my password?", "été, naïve café — unicode text",
             " ".join(["kubernetes schedules pods onto nodes"] * 80),  # truncated at 256
             "The cat sat on the mat. " * 6]
    embedder = embedding.MiniLmEmbedder(EmbedderSettings(kind="minilm", max_batch=2), minilm)
    one_call = await embedder.embed(texts)  # chunks of 2, longest first, put back in order
    calls = await asyncio.gather(*(embedder.embed([t]) for t in texts))  # one padded batch
    await embedder.close()
    expected = minilm.encode(texts, convert_to_numpy=True)
    assert one_call.dtype == np.float32 and one_call.shape == (5, 384)
    np.testing.assert_allclose(one_call, expected, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(calls), expected, atol=1e-6)
    for text, row in zip(texts, one_call, strict=True):
        np.testing.assert_allclose(row, minilm.encode([text])[0], atol=1e-6)


class TeiStandIn:
    def __init__(self, model_id: str = "BAAI/bge-small", max_batch: int = 3) -> None:
        self.model_id = model_id
        self.max_batch = max_batch
        self.batches: list[int] = []
        app = web.Application()
        app.router.add_get("/info", self.info)
        app.router.add_post("/embed", self.embed)
        self.runner = web.AppRunner(app)
        self.port = harness.free_port()

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_id": self.model_id, "model_sha": "abc123",
                                  "max_client_batch_size": self.max_batch, "version": "1.5"})

    async def embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        if len(body["inputs"]) > self.max_batch:
            return web.json_response({"error": "batch too large"}, status=413)
        self.batches.append(len(body["inputs"]))
        return web.json_response([_vector(t) for t in body["inputs"]])

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def tei() -> AsyncIterator[TeiStandIn]:
    server = TeiStandIn()
    await server.start()
    yield server
    await server.stop()


def _service(url: str, **cfg: object) -> embedding.EmbeddingService:
    settings = EmbedderSettings(kind="tei", tei_url=url, model="bge", **cfg)
    return embedding.EmbeddingService(settings, embedding.TeiEmbedder(settings),
                                      lru.EmbeddingLru(100, 10**6))


async def test_tei_batches_respect_max_client_batch_size_and_results_are_cached(tei):
    service = _service(f"http://127.0.0.1:{tei.port}")
    await service.embedder.start()
    texts = [f"text {i}" for i in range(7)]
    result = await service.embed("bge", texts, normalize=False)
    assert max(tei.batches) <= 3 and sum(tei.batches) == 7
    assert result.embedder_id == "BAAI/bge-small@abc123" and result.dim == 8
    matrix = np.frombuffer(result.vectors, dtype="<f4").reshape(7, 8)
    np.testing.assert_allclose(matrix[4], _vector("text 4"), rtol=1e-6)

    again = await service.embed("", ["text 4", "text 4"], normalize=True)
    assert again.cached == [True, True] and sum(tei.batches) == 7
    unit = np.frombuffer(again.vectors, dtype="<f4").reshape(2, 8)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), [1.0, 1.0], rtol=1e-5)
    await service.embedder.close()


async def test_tei_down_is_unavailable_and_recovers(tei):
    port = harness.free_port()
    service = _service(f"http://127.0.0.1:{port}", request_timeout_s=2)
    await service.embedder.start()
    with pytest.raises(embedding.EmbedderUnavailable):
        await service.embed("bge", ["hello"], normalize=False)
    await service.embedder.close()

    service = _service(f"http://127.0.0.1:{tei.port}")
    await service.embedder.start()
    await service.embed("bge", ["hello"], normalize=False)
    await tei.stop()
    with pytest.raises(embedding.EmbedderUnavailable):
        await service.embed("bge", ["another"], normalize=False)
    await service.embedder.close()


async def test_a_different_model_behind_tei_evicts_the_old_vectors(tei):
    service = _service(f"http://127.0.0.1:{tei.port}")
    await service.embedder.start()
    await service.embed("bge", ["a", "b"], normalize=False)
    assert len(service.cache) == 2
    await tei.stop()  # TEI restarts with another model on the same port
    with pytest.raises(embedding.EmbedderUnavailable):
        await service.embed("bge", ["c"], normalize=False)
    replacement = TeiStandIn(model_id="other/model")
    replacement.port = tei.port
    await replacement.start()
    result = await service.embed("bge", ["c"], normalize=False)
    await replacement.stop()
    assert result.embedder_id.startswith("other/model@")
    assert len(service.cache) == 1  # a and b came from the old model
    await service.embedder.close()
