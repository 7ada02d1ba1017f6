"""The hashed embedder: deterministic, normalised, word overlap means similarity."""

from __future__ import annotations

import numpy as np

from simulator import embedders


async def test_hash_vectors_are_deterministic_unit_vectors() -> None:
    e = embedders.HashEmbedder(64)
    a = await e.embed(["Reset my password", "reset my password please", "Paris weather"], True)
    b = await e.embed(["Reset my password"], True)
    assert a.shape == (3, 64) and np.allclose(a[0], b[0])
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert a[0] @ a[1] > a[0] @ a[2]


async def test_unnormalised_vectors_keep_their_length() -> None:
    raw = await embedders.HashEmbedder(64).embed(["one two three four five"], False)
    assert np.linalg.norm(raw[0]) > 1.0
