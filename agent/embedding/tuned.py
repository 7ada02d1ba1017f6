"""The tuned embedder: all-MiniLM-L6-v2 with a fine-tuning applied (``embedder.tuning``).

``none`` (the default) is the plain model; a path is a file ``synapsectl cache
tune-embedder`` wrote (``make embedder`` writes ``build/embedder/embedder_tuned.npz``);
``shipped`` is ``synapse_common/embedder_tuned.npz``, for a release that ships a tuning
(none does yet: no form measured so far beats the plain model, README). The tuning
(:mod:`synapse_common.embedder_tuning`) changes the model in two late places and nothing
else:

- its transformer parameters (``layers``) are put into the model right after loading,
  before either runtime sees it: the torch path runs them, and the ONNX path exports and
  checks the tuned model against torch like any other. The ONNX file is kept in a
  directory of its own per tuning (``<onnx_cache_dir>/tuned-<digest>``), so an export
  of other weights is never reused;
- its ``adapter``, if any, is one step after pooling: ``vectors @ adapter.T``,
  renormalised.

The embedder id is the tuning's (``<base>+tuned-<digest>``: it changes with the weights,
so the control plane never compares old entries with new vectors). A tuning fitted on
other weights than the bundled ones, or a file that cannot be read, leaves the embedder
unavailable with the reason (like a model that fails to load), never silently untuned.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import pathlib
from typing import Any

import numpy as np

from agent.config import EmbedderSettings
from agent.embedding import minilm, protocol
from agent.embedding import model as model_mod
from synapse_common import embedder_tuning

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    tuning: embedder_tuning.Tuning
    model: Any


class TunedEmbedder(protocol.LoadsOnce):
    """:class:`minilm.MiniLmEmbedder` on the tuned model, vectors adapted after pooling."""

    def __init__(self, cfg: EmbedderSettings, path: pathlib.Path, model: Any = None) -> None:
        self._cfg = cfg
        self._path = path
        self._model = model     # the untuned SentenceTransformer, when given (tests)
        self._inner: minilm.MiniLmEmbedder | None = None
        self._tuning: embedder_tuning.Tuning | None = None
        # Known before the weights load: read from the file (small) at construction.
        self.embedder_id = _peek_id(path)

    @property
    def runtime(self) -> str:
        return self._inner.runtime if self._inner is not None else ""

    @property
    def ready(self) -> bool:
        return self._inner is not None and self._inner.ready

    @property
    def queued(self) -> int:
        return self._inner.queued if self._inner is not None else 0

    async def _load_once(self) -> None:
        try:
            loaded = await asyncio.to_thread(self._load)
        except (embedder_tuning.TuningError, OSError, RuntimeError) as exc:
            self._error = f"embedder.tuning {self._path}: {exc}"
            log.error("%s", self._error)
            return
        self._tuning = loaded.tuning
        self.embedder_id = loaded.tuning.embedder_id
        own_dir = os.path.join(self._cfg.onnx_cache_dir, f"tuned-{loaded.tuning.digest}")
        cfg = self._cfg.model_copy(update={"onnx_cache_dir": own_dir})
        self._inner = minilm.MiniLmEmbedder(cfg, model=loaded.model)
        await self._inner.start()       # on torch at once; switches to ONNX once checked
        log.info("embedder %s: tuning %s applied", self.embedder_id, self._path)

    def _load(self) -> _Loaded:
        tuning = embedder_tuning.load(self._path)
        embedder_tuning.check_base(tuning, model_mod.embedder_id())
        model = copy.deepcopy(self._model) if self._model is not None else model_mod.load_minilm()
        embedder_tuning.apply_layers(model, tuning)
        return _Loaded(tuning, model)

    async def embed(self, texts: list[str]) -> np.ndarray:
        if self._inner is None or self._tuning is None:
            raise self.unavailable()
        return self._tuning.adapt(await self._inner.embed(texts))

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def build(cfg: EmbedderSettings, model: Any = None) -> minilm.MiniLmEmbedder | TunedEmbedder:
    """The in-process embedder ``embedder.tuning`` names (``model``: an already loaded
    untuned all-MiniLM-L6-v2 to start from, as tests share one)."""
    path = embedder_tuning.resolve(cfg.tuning)
    if path is None:
        return minilm.MiniLmEmbedder(cfg, model=model)
    return TunedEmbedder(cfg, path, model)


def _peek_id(path: pathlib.Path) -> str:
    try:
        return embedder_tuning.load(path).embedder_id
    except embedder_tuning.TuningError:
        return ""      # start() reports it; until then the embedder is not ready
