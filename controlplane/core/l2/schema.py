"""The collection's vector dimension: read from the store, fixed by the first write.

The collection is created lazily with the dimension of the first vector written; an
existing collection with another dimension is an error naming the way out (another
collection for another embedder), not a silent mismatch. Until a collection exists,
every call asks the store again (another replica may have created it meanwhile).
"""

from __future__ import annotations

import asyncio

import numpy as np

from controlplane.core.l2 import store as store_mod


class Schema:
    def __init__(self, store: store_mod.Store, collection: str) -> None:
        self._store = store
        self._collection = collection
        self.dim: int | None = None
        self._lock = asyncio.Lock()

    async def opened(self) -> int | None:
        """The dimension, or None when nothing was ever stored."""
        if self.dim is None:
            self.dim = await self._store.open()
        return self.dim

    async def for_write(self, dim: int) -> int:
        """The dimension, creating the collection for ``dim`` when there is none."""
        if self.dim is None:
            async with self._lock:
                if await self.opened() is None:
                    await self._store.create(dim)
                    self.dim = dim
        assert self.dim is not None
        return self.dim

    def check(self, vector: np.ndarray) -> None:
        if self.dim is not None and vector.shape[-1] != self.dim:
            raise ValueError(f"vector dimension {vector.shape[-1]} does not match collection "
                             f"{self._collection!r} ({self.dim}); use another collection "
                             "for another embedder")
