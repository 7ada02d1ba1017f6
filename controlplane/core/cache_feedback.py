"""Learning from mistakes: client feedback on cache hits, acted on and kept.

:class:`FeedbackCache` is the response cache as the serving path sees it (it implements
:class:`controlplane.core.cache_port.ResponseCache` around the tiered cache) plus
:meth:`FeedbackCache.feedback`, which ``POST /v1/cache/feedback`` calls.

Design decisions:

- **Remember what served.** Every hit's source (``cache_port.HitSource``: the entry's
  key, its text, the query, the L2 partition) is kept per tenant and request id in a
  bounded :class:`~controlplane.core.served_log.ServedLog`; feedback names the request,
  never the entry, so a client cannot aim at entries it was not served.
- **A wrong hit is evicted at once from both layers**: the L1 entry (no replica can serve
  it again, exactly or through any L2 row pointing at it) and the entry's L2 rows (store,
  recent-write buffer and mirror), both attempted even if one fails; a layer that could
  not be reached is reported (503 naming the layer, never the error's text: it can name
  the store's path or host, so it goes to the log). Without a semantic layer there are
  no L2 rows, and no store is opened to look for them.
- **Kept for recalibration**: a verdict on a *semantic* hit is a labelled pair (query,
  entry text, 1 right / 0 wrong) with the verifier's score, the verifier's digest and
  the embedder id, appended through a :class:`PairSink` for that tenant and model
  (``synapsectl cache calibrate --from-feedback`` refits the operating point from them;
  ``tune-embedder`` can train on them). A verdict on an exact hit says the answer itself
  was bad, not the match: the entry is evicted, no pair is recorded.
- **Live precision** per model: right / (right + wrong) over semantic-hit verdicts, with
  a 95 % Wilson interval, exported as ``synapse_cache_live_precision{model,bound}``. It
  is the precision of the hits users judged, in this replica since its start: an
  estimate, biased toward whatever users choose to report. Tenants are adversaries and
  hits cost them nothing, so one tenant can judge thousands of its own: the interval is
  widened to cover every leave-one-tenant-out interval too (:func:`live_interval`), so
  no single tenant's verdicts raise its lower end (hiding wrong hits others saw) or
  lower its upper end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from controlplane import errors
from controlplane import metrics as metrics_mod
from controlplane.core import cache_budget, cache_port, served_log
from synapse_common.clock import Clock

EVICT_TIMEOUT_S = 10.0
LOG_INTERVAL_S = 60.0       # a layer's failures are logged once per interval
SIBLING_GRACE_S = 0.5       # how long an id unknown here may still be on its way
SIBLING_POLL_S = 0.02
Z95 = 1.959964


class DeletableL1(Protocol):
    async def delete(self, tenant: str, model: str, key: str) -> bool: ...


class DeletableL2(Protocol):
    async def delete_entry(self, ref: str, scope: str | None = None) -> int: ...


@dataclasses.dataclass(frozen=True)
class Pair:
    """One judged semantic hit, as ``calibrate.read_pairs`` reads pairs (+ context)."""

    tenant: str
    model: str
    text_a: str               # the query
    text_b: str               # the entry that answered it
    label: int                # 1 right, 0 wrong
    score: float | None       # the verifier's probability at serving time
    similarity: float | None
    verifier: str             # digest of the verifier file that scored it
    embedder_id: str
    request_id: str
    at: float                 # wall-clock seconds

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PairSink(Protocol):
    async def record(self, pair: Pair) -> None: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    request_id: str
    layer: str
    wrong: bool
    evicted: bool
    recorded: bool


def wilson(right: int, total: int, z: float = Z95) -> tuple[float, float, float]:
    """(estimate, lower, upper) of a proportion: the Wilson score interval."""
    if total <= 0:
        return (math.nan, 0.0, 1.0)
    p = right / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (p, max(0.0, centre - half), min(1.0, centre + half))


def live_interval(by_tenant: Mapping[str, tuple[int, int]]) -> tuple[float, float, float, int]:
    """(estimate, lower, upper, verdicts) of a model's live precision from each tenant's
    (right, wrong) verdicts: the pooled estimate, and the widest of the pooled Wilson
    interval and every leave-one-tenant-out one (a view without any verdict spans 0 to
    1). With one tenant it is that tenant's interval."""
    right = sum(r for r, _ in by_tenant.values())
    total = right + sum(w for _, w in by_tenant.values())
    estimate, lower, upper = wilson(right, total)
    if len(by_tenant) > 1:
        for r, w in by_tenant.values():
            _, low, high = wilson(right - r, total - r - w)
            lower, upper = min(lower, low), max(upper, high)
    return estimate, lower, upper, total


@dataclasses.dataclass(frozen=True)
class Parts:
    """What feedback acts on besides the wrapped cache."""

    l1: DeletableL1 | None
    l2: DeletableL2 | None
    sink: PairSink | None


class FeedbackCache:
    def __init__(self, inner: cache_port.ResponseCache, parts: Parts,
                 metrics: metrics_mod.Metrics, served: served_log.ServedLog,
                 wall: Clock) -> None:
        self.inner = inner
        self.parts = parts
        self.metrics = metrics
        self.served = served
        self._wall = wall
        self._errors = cache_budget.ErrorLog(LOG_INTERVAL_S, wall)
        self._tallies: dict[str, dict[str, tuple[int, int]]] = {}   # model -> tenant -> (right, wrong)
        # Told (tenant, model) of each entry a wrong verdict evicted: copies of answers
        # kept outside the cache (the coalescer's landed answers) must not serve it either.
        self.eviction_listeners: list[Callable[[str | None, str | None], None]] = []

    # -- the response cache port ----------------------------------------------------------
    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        decision = await self.inner.lookup(request)
        if decision.hit is not None:
            self.remember(request, decision.hit)
        return decision

    def remember(self, request: cache_port.CacheRequest, hit: cache_port.CacheHit) -> None:
        """Keep which entry answered ``request`` (a hit of this cache's, or a coalesced
        follower's: the leader's entry), so feedback on its id can act on that entry."""
        if hit.source is not None and request.request_id:
            self.served.remember(request.request_id, served_log.Served(
                request.tenant, request.model, hit.layer, hit.source.query, hit.source.text,
                hit.source.ref, hit.source.l2_scope, hit.score, hit.similarity,
                hit.source.verifier, hit.source.embedder_id))

    def store(self, decision: cache_port.CacheDecision, response: Mapping[str, Any]) -> None:
        self.inner.store(decision, response)

    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        return await self.inner.invalidate(tenant=tenant, model=model, everything=everything)

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            if self.parts.sink is not None:
                await self.parts.sink.close()

    # -- feedback -------------------------------------------------------------------------
    async def feedback(self, tenant: str, request_id: str, wrong: bool) -> Outcome:
        """Act on a verdict about the cached answer to ``request_id`` (of ``tenant``).

        Raises ``errors.NotFound`` for an id this replica did not answer from the cache
        recently (or already judged), ``errors.Unavailable`` naming the layer an eviction
        (or the pair's recording) could not reach: the verdict is then not taken, and the
        id is remembered again so that the same feedback sent again can act (a pair that
        was recorded is not recorded twice)."""
        served = self.served.take(tenant, request_id)
        if served is None and self.served.listener is not None:
            served = await self._from_a_sibling(tenant, request_id)
        if served is None:
            raise errors.NotFound(
                f"no cache hit with request id {request_id!r} is known for this tenant (it "
                "was not answered from the cache, is too old, or was judged already)",
                param="request_id", code="unknown_request_id")
        # Both steps run whatever the other did; a failure is reported after both.
        evicting = self._evict(served) if wrong else _nothing()
        pair = served.layer == "semantic" and served.pair
        recording = self._record(served, request_id, wrong) if pair else _nothing()
        if wrong:
            for listener in self.eviction_listeners:
                listener(served.tenant, served.model)
        evict_failure, record_failure = await asyncio.gather(evicting, recording)
        if evict_failure or record_failure:
            again = served if record_failure or not pair else dataclasses.replace(
                served, pair=False)                     # recorded already: not twice
            self.served.remember(request_id, again)
            raise errors.Unavailable(
                "; ".join(f for f in (evict_failure, record_failure) if f)
                + "; the verdict was not taken: send it again", code="cache_unavailable")
        self.metrics.cache_feedback.labels(served.model, served.layer,
                                           "wrong" if wrong else "right", served.tenant).inc()
        if served.layer == "semantic":
            self._count(served.model, served.tenant, wrong)
        return Outcome(request_id, served.layer, wrong, wrong,
                       pair and self.parts.sink is not None)

    def live_precision(self, model: str) -> tuple[float, float, float, int]:
        """(estimate, lower, upper, verdicts) over the semantic hits of ``model``
        (:func:`live_interval`)."""
        return live_interval(self._tallies.get(model, {}))

    def _count(self, model: str, tenant: str, wrong: bool) -> None:
        tallies = self._tallies.setdefault(model, {})
        right, wrongs = tallies.get(tenant, (0, 0))
        tallies[tenant] = (right, wrongs + 1) if wrong else (right + 1, wrongs)
        estimate, lower, upper, _ = self.live_precision(model)
        gauge = self.metrics.cache_live_precision
        for bound, value in (("estimate", estimate), ("lower", lower), ("upper", upper)):
            gauge.labels(model, bound).set(value)

    async def _from_a_sibling(self, tenant: str, request_id: str) -> served_log.Served | None:
        """In a pod of workers, a hit a sibling served a moment ago may not have reached
        this process yet (the mesh carries it): look again for up to
        :data:`SIBLING_GRACE_S`. Every unknown id waits the whole grace, whoever's it is."""
        for _ in range(int(SIBLING_GRACE_S / SIBLING_POLL_S)):
            await asyncio.sleep(SIBLING_POLL_S)
            served = self.served.take(tenant, request_id)
            if served is not None:
                return served
        return None

    async def _record(self, served: served_log.Served, request_id: str,
                      wrong: bool) -> str:
        """Append the judged pair; "" when done, else what failed."""
        if self.parts.sink is None:
            return ""
        pair = Pair(served.tenant, served.model, served.query, served.text, 0 if wrong else 1,
                    served.score, served.similarity, served.verifier,
                    served.embedder_id, request_id, self._wall())
        try:
            await self.parts.sink.record(pair)
        except Exception as exc:
            self.metrics.cache_errors.labels(layer="feedback").inc()
            self._errors.report("feedback", "a verdict's recording", exc)
            return "the feedback pair could not be recorded"
        return ""

    async def _evict(self, served: served_log.Served) -> str:
        """Delete the entry from L1 and L2 at once; "" when done, else the failed layers."""
        calls: list[tuple[str, Any]] = []
        if self.parts.l1 is not None:
            calls.append(("exact", self.parts.l1.delete(served.tenant, served.model,
                                                        served.ref)))
        if self.parts.l2 is not None:
            calls.append(("semantic", self.parts.l2.delete_entry(served.ref,
                                                                 served.l2_scope or None)))
        results = await asyncio.gather(*(asyncio.wait_for(call, EVICT_TIMEOUT_S)
                                         for _, call in calls), return_exceptions=True)
        failed = []
        for (layer, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                self.metrics.cache_errors.labels(layer=layer).inc()
                self._errors.report(layer, "a wrong verdict's eviction", result)
                failed.append(f"{layer} layer {_why(result)}")
        return f"the entry could not be evicted everywhere ({'; '.join(failed)})" if failed else ""


def _why(exc: BaseException) -> str:
    """What a tenant is told of a layer's failure: never the error's own text, which
    can name the store's path or host (the operator reads it in the log)."""
    return "timed out" if isinstance(exc, TimeoutError) else "unavailable"


async def _nothing() -> str:
    return ""
