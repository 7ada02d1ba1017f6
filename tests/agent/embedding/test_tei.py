"""The TEI client and the service's cache in front of it.

TEI is a real HTTP server in the test (aiohttp on a free port) answering ``/info`` and
``/embed`` like text-embeddings-inference, with deterministic vectors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiohttp import web

from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import errors, service
from agent.embedding import tei as tei_mod
from tests import harness


def _vector(text: str, dim: int = 8) -> list[float]:
    rng = np.random.default_rng(abs(hash(text)) % 2**32)
    return [float(x) for x in rng.normal(size=dim)]


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


def _service(url: str, **cfg: object) -> service.EmbeddingService:
    settings = EmbedderSettings(kind="tei", tei_url=url, model="bge", **cfg)
    return service.EmbeddingService(settings, tei_mod.TeiEmbedder(settings),
                                      lru.EmbeddingLru(100, 10**6))


async def test_tei_batches_respect_max_client_batch_size_and_results_are_cached(tei):
    svc = _service(f"http://127.0.0.1:{tei.port}")
    await svc.embedder.start()
    texts = [f"text {i}" for i in range(7)]
    result = await svc.embed("bge", texts, normalize=False)
    assert max(tei.batches) <= 3 and sum(tei.batches) == 7
    assert result.embedder_id == "BAAI/bge-small@abc123" and result.dim == 8
    matrix = np.frombuffer(result.vectors, dtype="<f4").reshape(7, 8)
    np.testing.assert_allclose(matrix[4], _vector("text 4"), rtol=1e-6)

    again = await svc.embed("", ["text 4", "text 4"], normalize=True)
    assert again.cached == [True, True] and sum(tei.batches) == 7
    unit = np.frombuffer(again.vectors, dtype="<f4").reshape(2, 8)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), [1.0, 1.0], rtol=1e-5)
    await svc.embedder.close()


async def test_tei_down_is_unavailable_and_recovers(tei):
    port = harness.free_port()
    svc = _service(f"http://127.0.0.1:{port}", request_timeout_s=2)
    await svc.embedder.start()
    with pytest.raises(errors.EmbedderUnavailable):
        await svc.embed("bge", ["hello"], normalize=False)
    await svc.embedder.close()

    svc = _service(f"http://127.0.0.1:{tei.port}")
    await svc.embedder.start()
    await svc.embed("bge", ["hello"], normalize=False)
    await tei.stop()
    with pytest.raises(errors.EmbedderUnavailable):
        await svc.embed("bge", ["another"], normalize=False)
    await svc.embedder.close()


async def test_a_different_model_behind_tei_evicts_the_old_vectors(tei):
    svc = _service(f"http://127.0.0.1:{tei.port}")
    await svc.embedder.start()
    await svc.embed("bge", ["a", "b"], normalize=False)
    assert len(svc.cache) == 2
    await tei.stop()  # TEI restarts with another model on the same port
    with pytest.raises(errors.EmbedderUnavailable):
        await svc.embed("bge", ["c"], normalize=False)
    replacement = TeiStandIn(model_id="other/model")
    replacement.port = tei.port
    await replacement.start()
    result = await svc.embed("bge", ["c"], normalize=False)
    await replacement.stop()
    assert result.embedder_id.startswith("other/model@")
    assert len(svc.cache) == 1  # a and b came from the old model
    await svc.embedder.close()
