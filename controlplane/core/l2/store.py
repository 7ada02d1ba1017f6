"""The port of the L2 index: the vector-store operations it needs, nothing more.

``controlplane.adapters.milvus.MilvusStore`` implements it with pymilvus (the only module
that imports pymilvus); tests also use an in-memory fake. Every method may raise: the
index and the response cache turn failures into misses. Rows carry ``scope`` (searches
never leave one), ``tenant`` and ``model`` (invalidation), ``vector``, ``ref`` (the L1 key
of the response), ``text`` and ``created_at`` (wall-clock seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from controlplane.core.l2 import rows


def is_file(uri: str) -> bool:
    """Whether a Milvus URI names a Milvus Lite file (one process's alone), not a server."""
    return "://" not in uri


class Hit(rows.Stored, Protocol):
    """A search result: a stored row and its inner product with the query."""

    @property
    def similarity(self) -> float: ...


class Store(Protocol):
    @property
    def exclusive(self) -> bool:
        """True when this process is the store's only writer (a Milvus Lite file), so it
        sees every write itself."""
        ...

    async def open(self) -> int | None:
        """Connect; the dimension of the existing collection (loaded for search), or None
        when there is none yet."""
        ...

    async def create(self, dim: int) -> None:
        """Create the collection for vectors of ``dim`` (no-op if it exists)."""
        ...

    async def insert(self, records: Sequence[rows.Record]) -> None: ...

    async def search(self, scope: str, vector: np.ndarray, top_k: int,
                     min_created_at: float) -> Sequence[Hit]:
        """The nearest rows of one scope created at or after ``min_created_at``."""
        ...

    async def exists(self, scope: str, min_created_at: float) -> bool: ...

    async def scope_rows(self, scope: str, since: float | None,
                         limit: int) -> Sequence[rows.Stored]:
        """Rows of one scope (created at or after ``since`` when given), at most ``limit``."""
        ...

    async def newest_per_scope(self) -> dict[str, float]:
        """Every scope and the creation time of its newest row (a full scan)."""
        ...

    async def delete(self, tenant: str | None, model: str | None) -> int:
        """Delete the rows of a tenant and/or model (both None: all); the count deleted."""
        ...

    async def delete_ref(self, ref: str) -> int:
        """Delete the rows of one entry (``ref``, its L1 key); the count deleted."""
        ...

    async def delete_older(self, before: float) -> int:
        """Delete rows created before ``before``; the count deleted."""
        ...

    async def flush(self) -> None: ...

    def warm_up(self) -> None:
        """Start opening the store in the background (failures surface later)."""
        ...

    async def close(self) -> None: ...
