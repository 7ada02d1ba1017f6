"""What :class:`agent.embedding.service.EmbeddingService` needs of an embedder."""

from __future__ import annotations

from typing import Protocol

import numpy as np


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
