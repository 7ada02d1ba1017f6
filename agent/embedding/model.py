"""all-MiniLM-L6-v2 for the in-process embedder: loading, its id, and the two steps
both runtimes share (the model's own tokenizer, and length-ordered chunks).

Loading goes through :mod:`synapse_common.minilm` (offline, CPU), the one loader every
process uses. The embedder id names the weights package version: it is the same for
the torch and the ONNX runtime, which is sound only because the ONNX path is used
solely after its start-up check against torch (see :mod:`agent.embedding.onnx_path`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from synapse_common import minilm

NAME = "minilm-l6-v2"


def embedder_id() -> str:
    return f"{NAME}@{minilm.weights_version()}"


def load_minilm() -> Any:
    """The SentenceTransformer from the bundled weights, on the CPU (blocking)."""
    return minilm.load()


def tokenizer_of(model: Any) -> Callable[[list[str]], Any]:
    """The SentenceTransformer's own tokenizing step (``preprocess``; older releases:
    ``tokenize``), so every runtime pads and truncates exactly as the model does."""
    tokenize: Callable[[list[str]], Any] = (getattr(model, "preprocess", None)
                                            or model.tokenize)
    return tokenize


def in_length_order(texts: list[str], batch_size: int,
                    embed_chunk: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``embed_chunk`` over chunks of ``batch_size``, longest texts first as ``encode``
    does (so each chunk pads little); the vectors come back in the callers' order."""
    order = np.argsort([-len(t) for t in texts])
    chunks = [embed_chunk([texts[i] for i in order[start:start + batch_size]])
              for start in range(0, len(texts), batch_size)]
    by_length = np.concatenate(chunks).astype(np.float32, copy=False)
    vectors = np.empty_like(by_length)
    vectors[order] = by_length
    return vectors
