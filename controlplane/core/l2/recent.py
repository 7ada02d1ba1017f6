"""Rows written since the last completed flush, and the debounced flush itself.

Why: Milvus Lite searches the rows of an unflushed (growing) segment slowly, so writes are
followed by a background ``flush`` at most once per ``interval_s``, which keeps the growing
segment small. Until that flush completes, the rows are also kept here and searched with
numpy beside the store, so this replica reads its own writes at once even where the store
is eventually consistent (searches there use ``Bounded`` consistency, not ``Strong``).

A failed flush leaves the rows searchable (growing segment + this buffer); the next write
schedules another attempt. The buffer is bounded (``max_rows``): beyond it the oldest rows
leave it — they are in the store anyway, only slower to find.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from controlplane.core.l2 import mirror, rows, timing
from synapse_common import aiotasks

MAX_ROWS = 5000


class RecentWrites:
    def __init__(self, flush: Callable[[], Awaitable[None]], interval_s: float,
                 time: timing.Time, max_rows: int = MAX_ROWS) -> None:
        self._flush = flush
        self._interval = interval_s
        self._time = time
        self._max = max_rows
        self._rows: list[rows.Record] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def flushing(self) -> bool:
        """A flush is scheduled or running."""
        return self._task is not None and not self._task.done()

    def add(self, records: Sequence[rows.Record]) -> None:
        """Rows the store accepted; schedules the debounced flush."""
        self._rows.extend(records)
        if len(self._rows) > self._max:
            del self._rows[: len(self._rows) - self._max]
        if not self._closed and not self.flushing:
            self._task = asyncio.get_running_loop().create_task(self._debounced())

    def of_scope(self, scope: str) -> list[rows.Record]:
        return [r for r in self._rows if r.scope == scope]

    def search(self, scope: str, vector: np.ndarray, top_k: int,
               min_created_at: float) -> list[rows.Candidate]:
        return mirror.exact_top_k(self.of_scope(scope), vector, top_k, min_created_at)

    def has(self, scope: str, min_created_at: float) -> bool:
        return any(r.scope == scope and r.created_at >= min_created_at for r in self._rows)

    def drop(self, tenant: str | None, model: str | None) -> None:
        """Forget the rows of an invalidated tenant and/or model."""
        self._rows = [r for r in self._rows
                      if not ((tenant is None or r.tenant == tenant)
                              and (model is None or r.model == model))]

    def drop_ref(self, ref: str) -> None:
        """Forget the rows of one entry (evicted after a hit judged wrong)."""
        self._rows = [r for r in self._rows if r.ref != ref]

    async def flush(self) -> None:
        """Flush now; the rows written before it leave the buffer once it completed."""
        written = list(self._rows)
        await self._flush()
        # Rows written while the flush ran stay until the next one.
        done = {id(r) for r in written}
        self._rows = [r for r in self._rows if id(r) not in done]

    async def _debounced(self) -> None:
        await self._time.sleep(self._interval)
        with contextlib.suppress(Exception):    # see the module docstring
            await self.flush()

    async def close(self) -> None:
        self._closed = True
        await aiotasks.stop(self._task, quiet=True)
