"""The response cache's writer: stores off the hot path, in batches.

:meth:`Writer.put` queues an entry and returns; a full queue drops the write (the caller
counts it as ``cache_errors{layer="writer"}``). One task takes up to ``WRITE_BATCH``
entries at a time: L1 for each (the whole response, ``cache_entry``), then one
``Node.Embed`` call for the entries never embedded (``no-cache`` requests and lookups that
skipped the embedding) and one L2 insert for the batch, all within ``budget_s``. A burst
therefore costs a few large calls, not thousands of small ones racing each other. Only
entries whose L1 write succeeded get an L2 row: a semantic reference must point at a
response. The embedding computed at lookup is reused, so a miss is embedded once.
An entry whose lookup an invalidation has passed since (``cache_fence``) is not written,
and is removed again when the invalidation came while its write was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from controlplane import metrics as metrics_mod
from controlplane.core import cache_budget, cache_entry, cache_fence, cache_parts, cache_rules
from controlplane.core.l2 import rows as l2_rows
from synapse_common import aiotasks
from synapse_common.clock import Clock

WRITE_BATCH = 64        # entries per writer round: one Node.Embed call, one L2 insert


@dataclasses.dataclass(frozen=True)
class State:
    """What lookup hands to store (``CacheDecision.token``)."""

    tenant: str
    model: str
    keys: cache_rules.CacheKeys
    vector: cache_parts.Vector | None = None
    embedder_id: str = ""
    epoch: int = 0      # the cache fence's at lookup (cache_fence)
    # The request's endpoint kind, which a stream's learnt form is filed under as a hit
    # reads it (response_cache.form_key); the answer's own ``object`` is not asked: an
    # engine's stream chunks may carry none.
    endpoint: str = "chat"


@dataclasses.dataclass(frozen=True)
class Parts:
    l1: cache_parts.L1Store
    l2: cache_parts.SemanticIndex | None     # None: exact layer only
    embedder: cache_parts.Embedder | None


class Writer:
    def __init__(self, parts: Parts, *, budget: cache_budget.Budget,
                 metrics: metrics_mod.Metrics, ttl_s: float, budget_s: float, queue_max: int,
                 clock: Clock, learned: Callable[[str], None],
                 fence: cache_fence.Fence | None = None) -> None:
        self._parts = parts
        self._fence = fence or cache_fence.Fence()
        self._budget = budget
        self._metrics = metrics
        self._ttl = ttl_s
        self._budget_s = budget_s
        self._clock = clock
        self._learned = learned         # tells the cache the embedder id Node.Embed reported
        self._queue: asyncio.Queue[tuple[State, Any]] = asyncio.Queue(queue_max)
        self._task: asyncio.Task[None] | None = None

    def put(self, state: State, response: Any) -> None:
        """Queue a write; ``asyncio.QueueFull`` when the writer is behind. A write an
        invalidation has voided since its lookup is dropped."""
        if self._voided(state):
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._queue.put_nowait((state, response))

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as exc:    # never let the writer die
                self._budget.count("writer", "store", exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[tuple[State, Any]]) -> None:
        """L1 for every entry, then one embed call and one L2 insert for the batch; then
        what an invalidation voided meanwhile is deleted again."""
        batch = [(s, r) for s, r in batch if not self._voided(s)]
        try:
            await self._write_batch(batch)
        finally:
            await self._undo_voided([s for s, _ in batch])

    def _voided(self, state: State) -> bool:
        return self._fence.voids(state.epoch, state.tenant, state.model)

    async def _undo_voided(self, states: list[State]) -> None:
        for s in states:
            if self._voided(s):
                with contextlib.suppress(Exception):    # best effort, as an eviction
                    async with asyncio.timeout(self._budget_s):
                        await self._parts.l1.delete(s.tenant, s.model, s.keys.exact_key)

    async def _write_batch(self, batch: list[tuple[State, Any]]) -> None:
        deadline = self._clock() + self._budget_s
        written = await asyncio.gather(*(self._write_exact(s, r, deadline) for s, r in batch))
        states = [s for (s, _), ok in zip(batch, written, strict=True)
                  if ok and s.keys.semantic_text is not None]
        l2 = self._parts.l2
        if l2 is None or not states:
            return
        with contextlib.suppress(cache_budget.Failed):
            states = await self._embed_missing(states, deadline)
            found = [l2_rows.Row(scope=cache_rules.l2_scope(s.keys.scope_hash, s.embedder_id),
                                 tenant=s.tenant, model=s.model, vector=s.vector,
                                 ref=s.keys.exact_key, text=s.keys.semantic_text or "")
                     for s in states if s.vector is not None]
            await self._budget.within(l2.insert(found), deadline - self._clock(), "semantic",
                                      "store")
            self._metrics.cache_stores.labels(layer="semantic").inc(len(found))

    async def _write_exact(self, state: State, response: Any, deadline: float) -> bool:
        value = cache_entry.encode(state.keys.scope_hash, response)
        try:
            stored = await self._budget.within(
                self._parts.l1.set(state.tenant, state.model, state.keys.exact_key, value,
                                   self._ttl), deadline - self._clock(), "exact", "store")
        except cache_budget.Failed:
            return False
        if stored:      # False: too large for L1, so no L2 row may point at it
            self._metrics.cache_stores.labels(layer="exact").inc()
        return bool(stored)

    async def _embed_missing(self, states: list[State], deadline: float) -> list[State]:
        """Vectors for entries that were never embedded, one call per tenant: the agent
        keeps what it embeds in that tenant's part of its cache, as for a lookup."""
        by_tenant: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            if s.vector is None:
                by_tenant.setdefault(s.tenant, []).append(i)
        if not by_tenant:
            return states
        embedder = self._parts.embedder
        assert embedder is not None
        out = list(states)
        for tenant, todo in by_tenant.items():
            texts = [states[i].keys.semantic_text or "" for i in todo]
            budget = deadline - self._clock()
            result = await self._budget.within(
                embedder.embed(texts, timeout_s=budget, tenant=tenant), budget, "embedder",
                "store")
            vectors = np.asarray(result.vectors, dtype=np.float32)
            self._learned(result.embedder_id)
            for row, i in enumerate(todo):
                out[i] = dataclasses.replace(states[i], vector=vectors[row],
                                             embedder_id=result.embedder_id)
        return out

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until queued writes are done (tests, benchmarks and shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()

    async def close(self) -> None:
        await self.drain(timeout_s=5.0)
        await aiotasks.stop(self._task)
