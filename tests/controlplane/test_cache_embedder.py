"""The Node.Embed client against a real agent Node server (MiniLM) on port 0."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.adapters import embedder
from tests.controlplane import test_cache_support as support

node_address = support.node_address       # fixture: a real Node.Embed server


async def test_vectors_are_unpacked_normalised_and_labelled(node_address):
    client = embedder.NodeEmbedder(lambda: [node_address], support.MODEL, timeout_s=10,
                                   token=support.AGENT_TOKEN)
    result = await client.embed(["How do I reset my password?", "The cat sat on the mat."])
    assert result.vectors.shape == (2, 384) and result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    expected = support.minilm_model().encode(["How do I reset my password?"])[0]
    np.testing.assert_allclose(result.vectors[0], expected / np.linalg.norm(expected), atol=1e-5)
    assert result.embedder_id.startswith("minilm") and result.address == node_address
    await client.close()


async def test_a_dead_agent_is_skipped_for_a_live_one(node_address):
    client = embedder.NodeEmbedder(lambda: ["127.0.0.1:1", node_address], support.MODEL,
                                   timeout_s=10, token=support.AGENT_TOKEN)
    for _ in range(3):      # whichever comes first in the rotation, the call succeeds
        assert (await client.embed(["hello"])).address == node_address
    await client.close()


async def test_no_agent_or_only_dead_ones_raise_embed_unavailable():
    client = embedder.NodeEmbedder(lambda: [], support.MODEL)
    with pytest.raises(embedder.EmbedUnavailable, match="no ready agent"):
        await client.embed(["hello"])
    dead = embedder.NodeEmbedder(lambda: ["127.0.0.1:1"], support.MODEL, timeout_s=0.5)
    with pytest.raises(embedder.EmbedUnavailable, match=r"Node\.Embed failed"):
        await dead.embed(["hello"])
    await dead.close()


async def test_unknown_model_is_an_error_not_a_wrong_vector(node_address):
    client = embedder.NodeEmbedder(lambda: [node_address], "some-other-model", timeout_s=10,
                                   token=support.AGENT_TOKEN)
    with pytest.raises(embedder.EmbedUnavailable, match="not served"):
        await client.embed(["hello"])
    await client.close()


def test_pack_unpack_round_trip_and_size_check():
    v = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    out = embedder.unpack(embedder.pack(v), 3, 2)
    np.testing.assert_allclose(out, v / np.linalg.norm(v, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="bytes"):
        embedder.unpack(b"\x00" * 10, 3, 2)


async def test_an_agent_that_leaves_is_no_longer_asked(node_address):
    addresses = [node_address]
    client = embedder.NodeEmbedder(lambda: addresses, support.MODEL, timeout_s=10,
                                   token=support.AGENT_TOKEN)
    await client.embed(["hello"])
    addresses.clear()
    with pytest.raises(embedder.EmbedUnavailable, match="no ready agent"):
        await client.embed(["hello"])
    assert client._client.addresses() == set()  # its channel was closed
    await client.close()
