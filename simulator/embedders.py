"""Vectors for TEI mode: hashed (default, simulated) or the real all-MiniLM-L6-v2.

``HashEmbedder`` is feature hashing over the shared tokenizer's ids of the lower-cased
text: each unigram and bigram adds ±1 to one of ``dim`` coordinates, then the vector is
L2-normalised. Deterministic across processes, instant, and texts that share words
land near each other (so semantic-cache tests see plausible similarities) — but it is a
bag of words, not a language model, which ``/info`` says (``"embedder": "hash"``).

``MiniLmEmbedder`` loads sentence-transformers all-MiniLM-L6-v2 through the one shared
loader (:mod:`synapse_common.minilm`: the bundled weights, offline, on the CPU) and runs it
in a worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from synapse_common import minilm, tokens


class Embedder(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    async def embed(self, texts: Sequence[str], normalize: bool) -> np.ndarray: ...


class HashEmbedder:
    name = "hash"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def _one(self, text: str, out: np.ndarray) -> None:
        ids = tokens.tokenize(text.lower())
        bigrams = [(a * 1_000_003 + b) & 0x7FFFFFFF for a, b in itertools.pairwise(ids)]
        features = ids + bigrams
        for f in features:
            out[f % self.dim] += 1.0 if (f >> 20) & 1 else -1.0

    async def embed(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            self._one(text, vectors[i])
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.where(norms == 0, 1.0, norms)
        return vectors


class MiniLmEmbedder:
    name = "minilm"
    dim = 384

    def __init__(self, model: Any) -> None:
        self._model = model
        self._lock = asyncio.Lock()  # one batch at a time: torch already uses every core

    @classmethod
    async def load(cls) -> MiniLmEmbedder:
        return cls(await asyncio.to_thread(minilm.load))

    async def embed(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        async with self._lock:
            result = await asyncio.to_thread(self._model.encode, list(texts),
                                             normalize_embeddings=normalize,
                                             convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(result, dtype=np.float32)

