"""What :class:`agent.embedding.service.EmbeddingService` needs of an embedder, and the
start-once base the in-process embedders share."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from agent.embedding import errors


class Embedder(Protocol):
    embedder_id: str  # model + revision: vectors of two ids are never comparable

    @property
    def ready(self) -> bool: ...

    @property
    def queued(self) -> int:
        """Texts waiting for the model (its micro-batch queue)."""
        ...

    async def probe(self) -> bool: ...

    async def start(self) -> None: ...

    async def embed(self, texts: list[str]) -> np.ndarray: ...

    async def close(self) -> None: ...


class LoadsOnce:
    """An in-process embedder that loads its model once: ``start`` runs ``_load_once`` the
    first time only, ``probe`` is ``ready``, and until it loaded every call gets
    :meth:`unavailable` (the load's error, once it failed)."""

    _started = False
    _error = ""

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    async def probe(self) -> bool:
        return self.ready

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._load_once()

    async def _load_once(self) -> None:
        raise NotImplementedError

    def unavailable(self) -> errors.EmbedderUnavailable:
        return errors.EmbedderUnavailable(self._error or "the embedding model is still loading")
