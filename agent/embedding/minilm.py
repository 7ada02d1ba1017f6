"""all-MiniLM-L6-v2 in process: loaded off the event loop, on torch or onnxruntime,
micro-batched.

* ``embedder.runtime`` (default ``auto``): at start the transformer is exported once to
  an ONNX file cached on disk and run in onnxruntime with torch's thread count
  (:mod:`agent.embedding.onnx_path`); tokenizing, the length-sorted chunks of
  ``max_batch`` and natural batching are the same on both runtimes. Only a model whose
  modules are exactly Transformer → Pooling(mean) → Normalize goes to ONNX; anything else
  stays on torch (:mod:`agent.embedding.torch_path`).
* One embedder id for both runtimes (:func:`agent.embedding.model.embedder_id`): the ONNX
  path is used only after its start-up check against torch passed. Otherwise (export,
  load or check fails) one warning and torch; ``auto`` without onnxruntime: one info line
  and torch; ``runtime: onnx`` without it, or failing: the embedder stays unavailable with
  the reason. Cached vectors of either runtime therefore stay interchangeable.
* The model runs in ``asyncio.to_thread``: torch and onnxruntime release the GIL while
  the event loop keeps serving cache hits, and ``torch.set_num_threads`` /
  ``OMP_NUM_THREADS`` hold in the pool's threads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import batcher, onnx_path, protocol, torch_path
from agent.embedding import model as model_mod

log = logging.getLogger(__name__)


class MiniLmEmbedder(batcher.Batched, protocol.LoadsOnce):
    """``runtime`` is ``"torch"`` or ``"onnx"`` once started."""

    def __init__(self, cfg: EmbedderSettings, model: Any = None) -> None:
        # The SentenceTransformer. Given (tests): ready at once on torch; start() may switch.
        self._model = model
        self._ready = model is not None
        self.embedder_id = model_mod.embedder_id()  # one for both runtimes: see above
        self._cfg = cfg
        self._max_batch = cfg.max_batch
        self._onnx: onnx_path.OnnxMiniLm | None = None
        self.runtime = "torch" if model is not None else ""
        self.batcher = batcher.MicroBatcher.for_settings(self._encode, cfg)

    @property
    def ready(self) -> bool:
        return self._ready

    async def _load_once(self) -> None:
        try:
            if self._model is None:
                self._model = await asyncio.to_thread(model_mod.load_minilm)
            self._onnx = await asyncio.to_thread(self._load_runtime, self._model)
        except Exception as exc:  # reported as UNAVAILABLE on every call, not a crash
            self._error = f"cannot load all-MiniLM-L6-v2: {exc}"
            log.error("%s", self._error)
            self._ready = False
            return
        self.runtime = "torch" if self._onnx is None else "onnx"
        self._ready = True
        log.info("embedder %s loaded (runtime %s)", self.embedder_id, self.runtime)

    def _load_runtime(self, model: Any) -> onnx_path.OnnxMiniLm | None:
        """The checked ONNX runner, or None for torch (blocking); raises if onnx is forced."""
        wanted = self._cfg.runtime
        if wanted == "torch":
            return None
        try:
            return onnx_path.load(model, self._cfg.onnx_cache_dir,
                                  lambda texts, size: torch_path.encode(model, texts, size))
        except onnx_path.OnnxUnavailable as exc:
            if wanted == "onnx":
                raise RuntimeError(f"embedder.runtime is onnx, but {exc}") from None
            quiet = isinstance(exc, onnx_path.NotInstalled)  # an expected set-up
            (log.info if quiet else log.warning)("embedder: running the transformer in "
                                                 "torch: %s", exc)
            return None

    async def _encode(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            return await asyncio.to_thread(self._onnx.encode, texts, self._max_batch)
        return await asyncio.to_thread(torch_path.encode, self._model, texts, self._max_batch)

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not self._ready:
            raise self.unavailable()
        return await self.batcher.submit(texts)

    async def close(self) -> None:
        await self.batcher.close()
