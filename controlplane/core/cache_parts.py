"""The parts a tiered response cache is built from, as the core sees them (protocols).

Concrete parts live in ``controlplane.adapters`` (``l1.MemoryL1`` / ``l1.RedisL1``,
``embedder.NodeEmbedder``) and in the core (``l2.index.L2Index`` over the Milvus store);
they are wired together in ``controlplane.main``. The core never imports an adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from controlplane.core.l2 import rows as l2_rows

Vector = npt.NDArray[np.float32]


class L1Store(Protocol):
    kind: str

    async def get(self, tenant: str, model: str, key: str) -> bytes | None: ...

    async def set(self, tenant: str, model: str, key: str, value: bytes,
                  ttl_s: float) -> bool: ...

    async def invalidate(self, tenant: str | None, model: str | None) -> int: ...

    async def delete(self, tenant: str, model: str, key: str) -> bool: ...

    async def close(self) -> None: ...


class SemanticIndex(Protocol):
    async def search(self, scope: str, vector: Vector, top_k: int,
                     min_created_at: float) -> Sequence[l2_rows.Candidate]: ...

    async def insert(self, rows: Sequence[l2_rows.Row]) -> None: ...

    async def invalidate(self, tenant: str | None, model: str | None) -> int: ...

    def forget(self, tenant: str | None, model: str | None) -> None:
        """This process's copies only (a sibling deleted the rows in the shared store)."""
        ...

    async def has_entries(self, scope: str, min_created_at: float) -> bool: ...

    def warm_up(self) -> None: ...

    async def close(self) -> None: ...


class Embeddings(Protocol):
    @property
    def vectors(self) -> Any: ...
    @property
    def embedder_id(self) -> str: ...


class Embedder(Protocol):
    async def embed(self, texts: Sequence[str], timeout_s: float | None = None,
                    tenant: str = "") -> Embeddings: ...

    async def close(self) -> None: ...
