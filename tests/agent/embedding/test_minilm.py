"""The in-process all-MiniLM-L6-v2 on torch: the vectors of ``SentenceTransformer.encode``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.config import EmbedderSettings
from agent.embedding import minilm as minilm_mod
from agent.embedding import model


@pytest.fixture(scope="module")
def minilm():
    return model.load_minilm()


async def test_minilm_vectors_equal_sentence_transformers_for_mixed_length_batches(minilm):
    texts = ["hi", "How do I reset my password?", "été, naïve café — unicode text",
             " ".join(["kubernetes schedules pods onto nodes"] * 80),  # truncated at 256
             "The cat sat on the mat. " * 6]
    embedder = minilm_mod.MiniLmEmbedder(EmbedderSettings(kind="minilm", max_batch=2), minilm)
    one_call = await embedder.embed(texts)  # chunks of 2, longest first, put back in order
    calls = await asyncio.gather(*(embedder.embed([t]) for t in texts))  # one padded batch
    await embedder.close()
    expected = minilm.encode(texts, convert_to_numpy=True)
    assert one_call.dtype == np.float32 and one_call.shape == (5, 384)
    np.testing.assert_allclose(one_call, expected, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(calls), expected, atol=1e-6)
    for text, row in zip(texts, one_call, strict=True):
        np.testing.assert_allclose(row, minilm.encode([text])[0], atol=1e-6)
