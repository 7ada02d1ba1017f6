"""The response cache: exact L1, semantic L2 and the verifier behind ``cache_port``.

:class:`TieredCache` implements :class:`controlplane.core.cache_port.ResponseCache`.

Lookup: the rules of ``cache_rules`` decide bypass; the exact key is looked up in L1;
on an L1 miss the semantic text is embedded through an agent (``Node.Embed``), L2 is
searched *within the scope* and the verifier picks the best candidate above the
operating point of the request's model; the candidate's response is read from L1 by its
reference (the candidate's exact key).

Design decisions:

- **Fail open, in budget.** L1 runs under ``l1_budget_s``; embed + L2 search + verify +
  fetch run under one ``semantic_budget_s``. A time-out or error becomes a ``miss``,
  increments ``synapse_cache_errors_total{layer}`` (``exact``, ``semantic`` or
  ``embedder``) and is logged at most once per ``log_interval_s`` per layer.
- **Defence in depth on scope.** L2 rows are searched by scope hash, and the response an
  L2 row points to carries its scope hash too: a response whose stored scope differs
  from the request's is never served, whatever a vector index returns.
- **L2 scope includes the embedder's own id** (model + revision, from ``Node.Embed``),
  so vectors of two embedder revisions are never compared.
- **Writes off the hot path, batched.** :meth:`TieredCache.store` puts the entry on a
  bounded queue and returns. One writer task takes up to ``WRITE_BATCH`` entries at a
  time: L1 for each (the response), then one ``Node.Embed`` call for the entries never
  embedded (``no-cache`` requests) and one L2 insert for the batch, all within
  ``store_budget_s``. A burst therefore costs a few large calls, not thousands of small
  ones racing each other; a queue overflow drops the write (counted as
  ``cache_errors{layer="writer"}``). Only complete responses (``finish_reason``
  stop/length on every choice) are written; the embedding computed at lookup is reused,
  so a miss is embedded once. :meth:`close` drains the queue (bounded).
- **Expiry** is absolute: L1 TTL at write; L2 searches skip rows older than the TTL.
- **Empty scopes skip the embedding.** Each conversation and parameter set is its own
  scope, so most lookups would embed only to search an empty scope. A cheap scalar probe
  (``has_entries``; positives remembered briefly) answers first; on "empty" the lookup
  is a miss at once and the writer embeds the text later, in its batch.
- L2 is opened in the background at the first cacheable request (see ``_lookup``).
- Semantic references point into L1: an L1 entry evicted by its size bound turns the
  semantic candidate into a miss (counted as such), never into a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from controlplane import errors
from controlplane import metrics as metrics_mod
from controlplane.adapters import milvus
from controlplane.core import cache_port, cache_rules, verifier

log = logging.getLogger("synapse.cache")

Vector = npt.NDArray[np.float32]
INVALIDATE_TIMEOUT_S = 30.0
WRITE_BATCH = 64        # entries per writer round: one Node.Embed call, one L2 insert


class L1Store(Protocol):
    kind: str

    async def get(self, tenant: str, model: str, key: str) -> bytes | None: ...

    async def set(self, tenant: str, model: str, key: str, value: bytes,
                  ttl_s: float) -> bool: ...

    async def invalidate(self, tenant: str | None, model: str | None) -> int: ...

    async def close(self) -> None: ...


class Candidate(Protocol):
    @property
    def ref(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def vector(self) -> Any: ...
    @property
    def similarity(self) -> float: ...


class SemanticIndex(Protocol):
    async def search(self, scope: str, vector: Vector, top_k: int,
                     min_created_at: float) -> Sequence[Candidate]: ...

    async def insert(self, rows: Sequence[milvus.Row]) -> None: ...

    async def invalidate(self, tenant: str | None, model: str | None) -> int: ...

    async def has_entries(self, scope: str, min_created_at: float) -> bool: ...

    def warm_up(self) -> None: ...

    async def close(self) -> None: ...


class Embeddings(Protocol):
    @property
    def vectors(self) -> Any: ...
    @property
    def embedder_id(self) -> str: ...


class Embedder(Protocol):
    async def embed(self, texts: Sequence[str], timeout_s: float | None = None
                    ) -> Embeddings: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Options:
    ttl_s: float = 3600.0
    temperature_ceiling: float = 0.7
    default_temperature: float = 1.0
    l1_budget_s: float = 0.020
    semantic_budget_s: float = 0.100
    store_budget_s: float = 5.0           # per write batch, off the hot path
    store_queue_max: int = 10_000         # writes waiting; beyond it they are dropped
    top_k: int = 5
    embed_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    semantic_enabled: bool = True
    target_precision: float = 0.90
    model_target_precision: Mapping[str, float] = dataclasses.field(default_factory=dict)
    log_interval_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class _State:
    """What lookup hands to store (``CacheDecision.token``)."""

    tenant: str
    model: str
    keys: cache_rules.CacheKeys
    vector: Vector | None = None
    embedder_id: str = ""


class _Failed(Exception):
    """A cache layer failed or ran out of time; already counted and logged."""


class _ErrorLog:
    """Log the first failure of a layer per interval; count the ones held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, layer: str, what: str, exc: BaseException) -> None:
        now = self._clock()
        last = self._last.get(layer)
        if last is not None and now - last < self._interval:
            self._held[layer] = self._held.get(layer, 0) + 1
            return
        held = self._held.pop(layer, 0)
        self._last[layer] = now
        detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        more = f" ({held} more since the last report)" if held else ""
        log.warning("cache %s failed during %s, serving without it: %s%s",
                    layer, what, detail, more)


class TieredCache:
    def __init__(self, *, options: Options, l1: L1Store, metrics: metrics_mod.Metrics,
                 l2: SemanticIndex | None = None, embedder: Embedder | None = None,
                 verifier_model: verifier.Verifier | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.l1 = l1
        self.l2 = l2
        self.embedder = embedder
        self.verifier = verifier_model
        self.metrics = metrics
        self._wall = wall_clock
        self._mono = monotonic
        self._errors = _ErrorLog(options.log_interval_s, monotonic)
        self._queue: asyncio.Queue[tuple[_State, dict[str, Any]]] = asyncio.Queue(
            options.store_queue_max)
        self._writer: asyncio.Task[None] | None = None
        self._thresholds: dict[str, float] = {}
        self._warmed = False
        self._embedder_id: str | None = None     # the last one Node.Embed reported

    @property
    def semantic(self) -> bool:
        return (self.options.semantic_enabled and self.l2 is not None
                and self.embedder is not None and self.verifier is not None)

    # -- lookup --------------------------------------------------------------------------
    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        try:
            return await self._lookup(request)
        except Exception as exc:    # the port promises never to raise
            self._count_error("exact", "lookup", exc)
            return cache_port.CacheDecision(status="miss", reason="cache error")

    async def _lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        opts = self.options
        rule = cache_rules.policy(request, opts.temperature_ceiling, opts.default_temperature)
        keys = cache_rules.derive(request, opts.embed_model)
        state = _State(request.tenant, request.model, keys)
        if not self._warmed and self.semantic and (rule.lookup or rule.store):
            # Opening L2 (Milvus Lite starts a server) happens in the background at the
            # first cacheable request, not at start-up: processes that never cache never
            # pay for it, and no request waits for it beyond its budget.
            self._warmed = True
            assert self.l2 is not None
            self.l2.warm_up()
        if not rule.lookup:
            self.metrics.cache_bypass.labels(reason=rule.reason).inc()
            return cache_port.CacheDecision(status="bypass", may_store=rule.store,
                                            reason=rule.reason, token=state)
        hit = await self._lookup_exact(state)
        if hit is not None:
            return cache_port.CacheDecision(status="hit-exact", hit=hit, reason="exact")
        if self.semantic and keys.semantic_text is not None:
            found, state = await self._lookup_semantic(state)
            if found is not None:
                return cache_port.CacheDecision(status="hit-semantic", hit=found,
                                                reason="semantic")
        self.metrics.cache_misses.inc()
        return cache_port.CacheDecision(status="miss", may_store=rule.store,
                                        reason=rule.reason or "miss", token=state)

    async def _lookup_exact(self, state: _State) -> cache_port.CacheHit | None:
        start = self._mono()
        try:
            raw = await self._within(
                self.l1.get(state.tenant, state.model, state.keys.exact_key),
                self.options.l1_budget_s, "exact", "lookup")
        except _Failed:
            return None
        finally:
            self.metrics.cache_lookup_duration.labels(layer="exact").observe(
                self._mono() - start)
        response = self._decode(raw, state.keys.scope_hash)
        if response is None:
            return None
        self.metrics.cache_hits.labels(layer="exact").inc()
        return cache_port.CacheHit(layer="exact", response=response)

    async def _lookup_semantic(self, state: _State
                               ) -> tuple[cache_port.CacheHit | None, _State]:
        start = self._mono()
        deadline = start + self.options.semantic_budget_s
        try:
            if not await self._scope_may_have_entries(state, deadline):
                return None, state      # the writer embeds it, off the hot path
            state = await self._embed_state(state, deadline)
            hit = await self._within(self._search_verify(state, deadline),
                                     deadline - self._mono(), "semantic", "lookup")
        except _Failed:
            return None, state
        finally:
            self.metrics.cache_lookup_duration.labels(layer="semantic").observe(
                self._mono() - start)
        if hit is not None:
            self.metrics.cache_hits.labels(layer="semantic").inc()
        return hit, state

    async def _scope_may_have_entries(self, state: _State, deadline: float) -> bool:
        """False when L2 surely holds nothing for this scope, so embedding can wait.

        Every multi-turn conversation and parameter set is a scope of its own, so most
        scopes are empty; a scalar probe costs a fraction of an embedding. Needs the
        embedder id (part of the L2 scope), known after the first embedding.
        """
        if self._embedder_id is None:
            return True
        assert self.l2 is not None
        probe = self.l2.has_entries(l2_scope(state.keys.scope_hash, self._embedder_id),
                                    self._wall() - self.options.ttl_s)
        return bool(await self._within(probe, deadline - self._mono(), "semantic", "lookup"))

    async def _embed_state(self, state: _State, deadline: float) -> _State:
        assert self.embedder is not None and state.keys.semantic_text is not None
        budget = deadline - self._mono()
        start = self._mono()
        result = await self._within(
            self.embedder.embed([state.keys.semantic_text], timeout_s=budget),
            budget, "embedder", "embedding")
        self.metrics.embedding_duration.observe(self._mono() - start)
        vector = np.asarray(result.vectors, dtype=np.float32)[0]
        self._embedder_id = result.embedder_id
        return dataclasses.replace(state, vector=vector, embedder_id=result.embedder_id)

    async def _search_verify(self, state: _State, deadline: float
                             ) -> cache_port.CacheHit | None:
        assert self.l2 is not None and self.verifier is not None and state.vector is not None
        text = state.keys.semantic_text or ""
        candidates = list(await self.l2.search(
            l2_scope(state.keys.scope_hash, state.embedder_id), state.vector,
            self.options.top_k, self._wall() - self.options.ttl_s))
        threshold = self._threshold(state.model)
        while candidates:
            verdict = self.verifier.judge(text, state.vector, [c.text for c in candidates],
                                          [np.asarray(c.vector) for c in candidates],
                                          threshold=threshold)
            if verdict is None or not verdict.accepted:
                return None
            chosen = candidates.pop(verdict.index)
            raw = await self.l1.get(state.tenant, state.model, chosen.ref)
            response = self._decode(raw, state.keys.scope_hash)
            if response is not None:
                return cache_port.CacheHit(layer="semantic", response=response,
                                           similarity=round(verdict.similarity, 4),
                                           score=round(verdict.score, 4))
        return None

    def _threshold(self, model: str) -> float:
        cached = self._thresholds.get(model)
        if cached is None:
            assert self.verifier is not None
            target = self.options.model_target_precision.get(model,
                                                             self.options.target_precision)
            cached = self.verifier.threshold_for(target)
            self._thresholds[model] = cached
        return cached

    # -- store ---------------------------------------------------------------------------
    def store(self, decision: cache_port.CacheDecision, response: Mapping[str, Any]) -> None:
        try:
            state = decision.token
            if (not decision.may_store or not isinstance(state, _State)
                    or not cache_rules.is_storable(response)):
                return
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write_loop())
            self._queue.put_nowait((state, dict(response)))
        except asyncio.QueueFull as exc:
            # A burst beyond the writer's pace: drop the write, never slow the response.
            self._count_error("writer", "store (queue full)", exc)
        except Exception as exc:    # the port promises never to raise
            self._count_error("writer", "store", exc)

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < WRITE_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as exc:    # never let the writer die
                self._count_error("writer", "store", exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[tuple[_State, dict[str, Any]]]) -> None:
        """L1 for every entry, then one embed call and one L2 insert for the batch."""
        deadline = self._mono() + self.options.store_budget_s
        written = await asyncio.gather(*(self._write_exact(s, r, deadline) for s, r in batch))
        states = [s for (s, _), ok in zip(batch, written, strict=True)
                  if ok and s.keys.semantic_text is not None]
        if not self.semantic or not states:
            return
        assert self.l2 is not None
        with contextlib.suppress(_Failed):
            states = await self._embed_missing(states, deadline)
            rows = [milvus.Row(scope=l2_scope(s.keys.scope_hash, s.embedder_id),
                               tenant=s.tenant, model=s.model, vector=s.vector,
                               ref=s.keys.exact_key, text=s.keys.semantic_text or "")
                    for s in states if s.vector is not None]
            await self._within(self.l2.insert(rows), deadline - self._mono(), "semantic",
                               "store")
            self.metrics.cache_stores.labels(layer="semantic").inc(len(rows))

    async def _write_exact(self, state: _State, response: dict[str, Any],
                           deadline: float) -> bool:
        value = json.dumps({"scope": state.keys.scope_hash, "response": response},
                           separators=(",", ":"), ensure_ascii=False).encode()
        try:
            stored = await self._within(
                self.l1.set(state.tenant, state.model, state.keys.exact_key, value,
                            self.options.ttl_s), deadline - self._mono(), "exact", "store")
        except _Failed:
            return False
        if stored:      # False: too large for L1, so no L2 row may point at it
            self.metrics.cache_stores.labels(layer="exact").inc()
        return bool(stored)

    async def _embed_missing(self, states: list[_State], deadline: float) -> list[_State]:
        """Vectors for entries that were never embedded (no-cache requests), in one call."""
        todo = [i for i, s in enumerate(states) if s.vector is None]
        if not todo:
            return states
        assert self.embedder is not None
        texts = [states[i].keys.semantic_text or "" for i in todo]
        budget = deadline - self._mono()
        result = await self._within(self.embedder.embed(texts, timeout_s=budget), budget,
                                    "embedder", "store")
        vectors = np.asarray(result.vectors, dtype=np.float32)
        self._embedder_id = result.embedder_id
        out = list(states)
        for row, i in enumerate(todo):
            out[i] = dataclasses.replace(states[i], vector=vectors[row],
                                         embedder_id=result.embedder_id)
        return out

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until queued writes are done (tests, benchmarks and shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()

    # -- admin / lifecycle ---------------------------------------------------------------
    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        """Remove entries of both layers (admin call): raises ``errors.Unavailable``, naming
        the layer, when one could not be reached."""
        if not everything and tenant is None and model is None:
            raise ValueError("invalidate needs a tenant, a model or everything=True")
        counts: list[int] = []
        failed: list[str] = []
        layers: list[tuple[str, L1Store | SemanticIndex | None]] = [
            ("exact", self.l1), ("semantic", self.l2)]
        for name, layer in layers:
            try:
                async with asyncio.timeout(INVALIDATE_TIMEOUT_S):
                    counts.append(await layer.invalidate(tenant, model) if layer else 0)
            except Exception as exc:
                # Both layers are attempted; the admin is told which one did not finish.
                counts.append(0)
                failed.append(f"{name} layer: {type(exc).__name__}: {exc}")
                self._count_error(name, "invalidate", exc)
        if failed:
            raise errors.Unavailable(
                f"cache invalidation incomplete ({'; '.join(failed)}); removed {counts[0]} "
                f"exact and {counts[1]} semantic entries", code="cache_unavailable")
        return counts[0], counts[1]

    async def close(self) -> None:
        await self.drain(timeout_s=5.0)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for part in (self.embedder, self.l2, self.l1):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.close()

    # -- helpers -------------------------------------------------------------------------
    async def _within(self, coro: Coroutine[Any, Any, Any], budget_s: float, layer: str,
                      what: str) -> Any:
        try:
            if budget_s <= 0:
                coro.close()
                raise TimeoutError
            async with asyncio.timeout(budget_s):
                return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._count_error(layer, what, exc)
            raise _Failed from exc

    def _count_error(self, layer: str, what: str, exc: BaseException) -> None:
        self.metrics.cache_errors.labels(layer=layer).inc()
        self._errors.report(layer, what, exc)

    def _decode(self, raw: bytes | None, scope_hash: str) -> Mapping[str, Any] | None:
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError as exc:
            self._count_error("exact", "decode", exc)
            return None
        if not isinstance(entry, dict) or entry.get("scope") != scope_hash:
            return None
        response = entry.get("response")
        return response if isinstance(response, dict) else None


def l2_scope(scope_hash: str, embedder_id: str) -> str:
    """The L2 partition of a scope: the scope hash bound to the embedder that made it."""
    return hashlib.sha256(f"{scope_hash}\x00{embedder_id}".encode()).hexdigest()
