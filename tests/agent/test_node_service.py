"""``Node.Embed`` over real gRPC with the real all-MiniLM-L6-v2, plus health and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent import node_service
from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import minilm as minilm_mod
from agent.embedding import model, service
from protos.synapse.v1 import node_pb2, node_pb2_grpc
from tests import grpc_wire, node_auth

TEXTS = ["How do I reset my password?", "The cat sat on the mat.",
         "Kubernetes schedules pods onto nodes.", "été, naïve café — unicode text"]


@pytest.fixture(scope="module")
def minilm():
    return model.load_minilm()


@pytest.fixture
async def node(minilm) -> AsyncIterator[tuple[node_pb2_grpc.NodeStub, node_service.NodeServer]]:
    cfg = EmbedderSettings(kind="minilm", max_texts=8, max_text_chars=1000)
    embedder = minilm_mod.MiniLmEmbedder(cfg, model=minilm)
    embeddings = service.EmbeddingService(cfg, embedder, lru.EmbeddingLru(1000, 10**7))
    server = node_service.NodeServer(embeddings, "127.0.0.1", 0,
                                     lambda code, seconds: server.observed.append(code),
                                     token=node_auth.TOKEN)
    server.observed = []
    await server.start(embedder_ready=True)
    channel = node_auth.aio_channel(f"127.0.0.1:{server.port}")
    yield node_pb2_grpc.NodeStub(channel), server
    await channel.close()
    await server.stop(0)
    await embedder.close()


def _matrix(resp: node_pb2.EmbedResponse) -> np.ndarray:
    return np.frombuffer(resp.vectors, dtype="<f4").reshape(-1, resp.dim)


async def test_embed_matches_sentence_transformers_and_repeats_are_cached(node, minilm):
    stub, _ = node
    first = await stub.Embed(node_pb2.EmbedRequest(texts=TEXTS), timeout=60)
    expected = minilm.encode(TEXTS, convert_to_numpy=True)
    assert first.dim == 384 and first.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert first.embedder_id.startswith("minilm-l6-v2@")
    np.testing.assert_allclose(_matrix(first), expected, atol=1e-5)
    assert list(first.cached) == [False] * len(TEXTS)

    again = await stub.Embed(node_pb2.EmbedRequest(texts=[TEXTS[1], "a new text"]), timeout=60)
    assert list(again.cached) == [True, False]
    np.testing.assert_array_equal(_matrix(again)[0], _matrix(first)[1])
    np.testing.assert_allclose(_matrix(again)[1], minilm.encode(["a new text"])[0], atol=1e-5)


async def test_embed_errors_have_proper_status_codes(node):
    stub, _ = node
    cases = [
        (node_pb2.EmbedRequest(texts=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (node_pb2.EmbedRequest(texts=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "texts[1]"),
        (node_pb2.EmbedRequest(texts=["x" * 1001]), grpc.StatusCode.INVALID_ARGUMENT, "1000"),
        (node_pb2.EmbedRequest(texts=["a"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
        (node_pb2.EmbedRequest(model="bge-m3", texts=["a"]), grpc.StatusCode.NOT_FOUND,
         "bge-m3"),
    ]
    for request, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(request, timeout=10)
        assert info.value.code() == code and words in info.value.details()
    _, server = node
    assert server.observed == [c.name for _, c, _ in cases]  # counted by status code


async def test_embed_without_a_loaded_model_is_unavailable():
    cfg = EmbedderSettings(kind="minilm")
    embedder = minilm_mod.MiniLmEmbedder(cfg)  # start() never ran: nothing loaded
    embeddings = service.EmbeddingService(cfg, embedder, lru.EmbeddingLru(10, 10**6))
    server = node_service.NodeServer(embeddings, "127.0.0.1", 0, token=node_auth.TOKEN)
    await server.start(embedder_ready=False)
    async with node_auth.aio_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node_pb2_grpc.NodeStub(channel).Embed(node_pb2.EmbedRequest(texts=["a"]),
                                                        timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(
            service=node_service.NODE_SERVICE), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.stop(0)


async def test_health_and_reflection(node):
    _, server = node
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "synapse.v1.Node"):
            check = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"synapse.v1.Node", "grpc.health.v1.Health"} <= names


async def test_a_port_another_grpc_server_holds_is_a_bind_error():
    # Without SO_REUSEPORT (grpc's default) two agents never share a Node port silently.
    other = grpc.aio.server()
    port = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    try:
        with pytest.raises(OSError, match=f"cannot bind the Node gRPC server to "
                                          f"127.0.0.1:{port}"):
            node_service.NodeServer(None, "127.0.0.1", port, token=node_auth.TOKEN)
    finally:
        await other.stop(0)


async def test_a_message_larger_than_any_admitted_call_is_refused_unread(node):
    """Anyone reaching the port could make the agent buffer 64 MB messages before their
    token was checked (probe finding): the largest admitted call is a few MB."""
    stub, _ = node
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(node_pb2.EmbedRequest(
            texts=["x" * 1024 * 1024] * 9), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_call_without_the_token_is_refused_on_its_headers():
    """A refusal that waited for the request message let whoever reaches the port make
    the agent hold up to 8 MiB per call, sent slowly or never finished (probe finding):
    a call that sends only its headers is answered UNAUTHENTICATED, not left waiting."""
    seen: list[str] = []
    server = node_service.NodeServer(None, "127.0.0.1", 0, lambda code, s: seen.append(code),
                                     token=node_auth.TOKEN,
                                     observe_scores=lambda code, s: seen.append("s" + code))
    await server.start(embedder_ready=False)
    try:
        address = f"127.0.0.1:{server.port}"
        for method in ("Embed", "ScorePairs"):
            code = await grpc_wire.headers_only(address, f"/synapse.v1.Node/{method}")
            assert code == grpc.StatusCode.UNAUTHENTICATED, method
        wrong = (("authorization", "Bearer not-the-token"),)
        code = await grpc_wire.headers_only(address, "/synapse.v1.Node/Embed", wrong)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert seen == ["UNAUTHENTICATED", "sUNAUTHENTICATED", "UNAUTHENTICATED"]
        # with the token, the call is let in and waits for its message as before
        code = await grpc_wire.headers_only(address, "/synapse.v1.Node/Embed",
                                            node_auth.metadata(), timeout_s=0.5)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(0)


async def test_the_node_port_caps_streams_per_connection():
    server = node_service.NodeServer(None, "127.0.0.1", 0, token=node_auth.TOKEN)
    await server.start(embedder_ready=False)
    try:
        settings = await asyncio.to_thread(grpc_wire.server_settings, "127.0.0.1", server.port)
        assert settings[grpc_wire.MAX_CONCURRENT_STREAMS] == node_service.MAX_CONCURRENT_STREAMS
    finally:
        await server.stop(0)
