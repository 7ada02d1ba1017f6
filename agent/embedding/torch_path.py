"""The model's vectors in torch: what ``SentenceTransformer.encode`` computes, without its
per-call machinery.

It runs ``model.preprocess`` (the tokenizer) and ``model(features)`` (its configured
modules: Transformer → Pooling → Normalize) under ``torch.inference_mode()``, in the same
length-sorted chunks of ``batch_size`` as ``encode``, so the vectors equal ``encode``'s.
``encode``'s own per-call work (device resolution, ``eval()`` walking every parameter
and module, input validation) is skipped. The model is put in eval mode once: it loads
in training mode, and dropout would change the vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.embedding import model as model_mod


def encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """``model.encode(texts, batch_size=…)``'s vectors (blocking; torch releases the GIL)."""
    import torch

    if model.training:  # it loads in training mode: dropout would change the vectors
        model.eval()
    tokenize = model_mod.tokenizer_of(model)
    with torch.inference_mode():
        return model_mod.in_length_order(
            texts, batch_size,
            lambda chunk: model(tokenize(chunk))["sentence_embedding"].numpy())
