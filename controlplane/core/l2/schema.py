"""The collection's vector dimension: read from the store, fixed by the first write.

The collection is created lazily with the dimension of the first vector written; an
existing collection with another dimension is an error naming the way out (another
collection for another embedder), not a silent mismatch. Until a collection exists,
every call asks the store again (another replica may have created it meanwhile).

Design decisions:

- **A collection is created only for a plausible dimension**: ``expected`` when the
  wiring knows the embedder's (then nothing else), otherwise one within
  ``MIN_INDEX_DIM``..``MAX_INDEX_DIM``. The dimension is persisted with the collection,
  so a first write of a wrong one (a broken or hostile node's answer) would otherwise
  fail every later write and search, for every tenant, until an operator dropped the
  collection.
- **A dimension mismatch is a** :class:`DimensionError` naming the collection, both
  dimensions and the way out; with ``expected`` known, a collection of another dimension
  (made for another embedder, or left by an older release) is also logged as an error
  once when it is opened, rather than only as each lookup's failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np

from controlplane.core.l2 import store as store_mod

# The dimensions a collection is made for when the embedder's is not known: those of the
# sentence embedders a cache indexes (node_embed.MAX_EMBED_DIM says why its bound differs).
MIN_INDEX_DIM = 64
MAX_INDEX_DIM = 4096

log = logging.getLogger("synapse.cache")


class DimensionError(ValueError):
    """Vectors and the collection disagree on their dimension, or no collection may be made
    for the vectors' dimension (see the module docstring)."""


class Schema:
    def __init__(self, store: store_mod.Store, collection: str,
                 expected: int | None = None) -> None:
        self._store = store
        self._collection = collection
        self._expected = expected
        self.dim: int | None = None
        self._lock = asyncio.Lock()

    @property
    def expected(self) -> int | None:
        """The embedder's dimension when the cache is pinned to one (else learnt)."""
        return self._expected

    async def opened(self) -> int | None:
        """The dimension, or None when nothing was ever stored."""
        if self.dim is None:
            self.dim = await self._store.open()
            if self.dim is not None and self._expected not in (None, self.dim):
                log.error("%s", self._mismatch(self._expected))
        return self.dim

    async def for_write(self, dims: Sequence[int]) -> int:
        """The dimension, creating the collection when there is none for the first of
        ``dims`` (a batch's) one may be made for; :class:`DimensionError` when none."""
        if self.dim is None:
            async with self._lock:
                if await self.opened() is None:
                    dim = self.creatable(dims)
                    await self._store.create(dim)
                    self.dim = dim
        assert self.dim is not None
        return self.dim

    def creatable(self, dims: Sequence[int]) -> int:
        """The first of ``dims`` a collection may be made for (see the module docstring)."""
        for dim in dims:
            if dim == self._expected or (self._expected is None
                                         and MIN_INDEX_DIM <= dim <= MAX_INDEX_DIM):
                return dim
        wanted = (f"the embedder's have {self._expected}" if self._expected is not None
                  else f"outside {MIN_INDEX_DIM}..{MAX_INDEX_DIM}")
        raise DimensionError(f"collection {self._collection!r} is not created for vectors "
                             f"of dimension {dims[0] if dims else 0} ({wanted})")

    def matches(self, vector: np.ndarray) -> bool:
        return self.dim is None or vector.shape[-1] == self.dim

    def check(self, vector: np.ndarray) -> None:
        if not self.matches(vector):
            raise DimensionError(self._mismatch(int(vector.shape[-1])))

    def _mismatch(self, dim: int) -> str:
        return (f"vector dimension {dim} does not match collection {self._collection!r} "
                f"({self.dim}): the collection was made for another embedder (or from a bad "
                "answer); use another collection for another embedder (cache.collection) "
                "or drop this one")
