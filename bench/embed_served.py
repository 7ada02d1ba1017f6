"""Vectors exactly as an agent serves them, for the cache benchmarks.

Runs the agent's own in-process embedder (``agent.embedding.tuned.build``: the same
runtime choice, ONNX export and start-up check, tuning and adapter as ``Node.Embed``)
over many texts, with an optional ``.npz`` cache in ``controlplane.calibrate``'s format
(key = hash of the texts, plus the embedder id for a tuned embedder), so an untuned cache
written by ``calibrate --embed-cache`` serves here too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import minilm, tuned

CHUNK = 256


def vectors(texts: Sequence[str], tuning: str, cache: str | None = None) -> tuple[np.ndarray, str]:
    """(one row per text, the embedder id) for ``embedder.tuning: <tuning>``."""
    embedder = tuned.build(EmbedderSettings(kind="minilm", tuning=tuning, max_texts=CHUNK))
    key = hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
    if tuning != "none":
        key += f"+{embedder.embedder_id}"
    if cache and os.path.exists(cache):
        with np.load(cache) as data:
            if str(data["key"]) == key:
                return np.asarray(data["vectors"], dtype=np.float32), embedder.embedder_id
    out = asyncio.run(_embed(embedder, list(texts)))
    if cache:
        pathlib.Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, key=np.asarray(key), vectors=out)
    return out, embedder.embedder_id


async def _embed(embedder: tuned.TunedEmbedder | minilm.MiniLmEmbedder,
                 texts: list[str]) -> np.ndarray:
    await embedder.start()
    if not embedder.ready:
        raise SystemExit("the embedder did not start (embedder.tuning): see the log above")
    t0 = time.monotonic()
    try:
        parts = []
        for start in range(0, len(texts), CHUNK):
            parts.append(await embedder.embed(texts[start:start + CHUNK]))
            if start % (CHUNK * 40) == 0:
                print(f"embedded {start + CHUNK}/{len(texts)} texts with {embedder.embedder_id} "
                      f"({time.monotonic() - t0:.0f}s)", file=sys.stderr)
        return np.concatenate(parts).astype(np.float32)
    finally:
        await embedder.close()
