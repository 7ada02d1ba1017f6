"""The response cache: exact L1, semantic L2 and the verifier behind ``cache_port``.

:class:`TieredCache` implements :class:`controlplane.core.cache_port.ResponseCache`.

Lookup: the rules of ``cache_rules`` decide bypass; the exact key is looked up in L1;
on an L1 miss the semantic text is embedded through an agent (``Node.Embed``), L2 is
searched *within the scope* and the verifier picks the best candidate above the
operating point of the request's model; the candidate's response is read from L1 by its
reference (the candidate's exact key). An entry found either way is served only if it can
answer the request with every field due (``cache_entry``).

Design decisions:

- **Fail open, in budget** (``cache_budget``). L1 runs under ``l1_budget_s``; embed + L2
  search + verify + fetch run under one ``semantic_budget_s``. A time-out or error becomes
  a ``miss``, increments ``synapse_cache_errors_total{layer}`` (``exact``, ``semantic`` or
  ``embedder``) and is logged at most once per ``log_interval_s`` per layer.
- **Defence in depth on scope.** L2 rows are searched by scope hash, and the response an
  L2 row points to carries its scope hash too: a response whose stored scope differs
  from the request's is never served, whatever a vector index returns.
- **L2 scope includes the embedder's own id** (model + revision, from ``Node.Embed``),
  so vectors of two embedder revisions are never compared (``cache_rules.l2_scope``).
- **Writes off the hot path, batched** (``cache_writer``). Only complete responses
  (``finish_reason`` stop/length on every choice) are written.
- **Expiry** is absolute: L1 TTL at write; L2 searches skip rows older than the TTL, and
  the L2 index deletes them periodically.
- **Empty scopes skip the embedding.** Each conversation and parameter set is its own
  scope, so most lookups would embed only to search an empty scope. A cheap scalar probe
  (``has_entries``) answers first; on "empty" the lookup is a miss at once and the writer
  embeds the text later, in its batch.
  The probe needs the embedder id (part of the L2 scope) before the embedding tells it:
  every id a ``Node.Embed`` answer named within twice the entries' lifetime (an entry lives
  ``ttl_s`` from its write, which follows the answer that named its id within one write
  batch), and the scope may have entries when one of them has. Any node's answer may
  name a made-up id; had the last answer's id been the one probed, a single hostile
  answer would turn every tenant's later lookups into misses without an embedding until
  an honest answer came. Beyond :data:`PROBED_IDS` ids the probe is not used (every
  lookup embeds, as without it) until twice the entries' lifetime has passed since the
  last id it could not keep.
- L2 is opened in the background at the first cacheable request (see ``_lookup``).
- Semantic references point into L1: an L1 entry evicted by its size bound turns the
  semantic candidate into a miss (counted as such), never into a wrong answer.
- **Verifier stack** (a verifier file with ``stack``, :class:`verifier.Stack`): the
  candidates whose verifier probability reaches the stack's floor (at most ``top_k``,
  best first) go to the pair scorer (``Node.ScorePairs`` through the embedder adapter,
  or any :class:`PairScorer` given) within what is left of the semantic budget less
  ``l1_budget_s`` (kept for reading the chosen entry); when it answers as the scorer the
  stack was fitted for, the stacked probability decides against the stack's operating
  point for the model's target, and the hit reports it and the full ``digest``. Otherwise
  (no scorer, another scorer, time-out, error, or no candidate above the floor: no call)
  the verifier alone decides at its own point, as without a stack, and the hit carries
  ``base_digest`` (its score is the verifier's alone, so feedback keeps the two apart).
  Never an error to the client; ``synapse_cache_pair_scorer_total{outcome}`` counts what
  happened, per call, and failures are logged once per ``log_interval_s``. Without a
  stack the lookup is exactly what it was (one attribute check).
- **Scored in two steps**: the candidate with the best verifier probability is scored
  alone and served if the stack accepts it (and its entry serves); only otherwise are the
  rest scored, in one more call, and the best of them the stack accepts is served. A
  scorer's cost grows with the pairs it reads (it is compute-bound on the agent's CPU), so
  a hit usually costs one pair instead of ``top_k``. Which pairs the stack accepts, and so
  whether a lookup hits, is unchanged; when several are accepted the one served is the
  verifier's favourite rather than the stack's, which is as safe (the stack's precision is
  per accepted pair). When the second call fails, the verifier alone judges the
  candidates the stack has not (the first is never served against the stack's "no").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from controlplane import errors
from controlplane import metrics as metrics_mod
from controlplane.core import (
    cache_budget,
    cache_entry,
    cache_fence,
    cache_parts,
    cache_port,
    cache_rules,
    cache_writer,
    verifier,
)
from synapse_common import clock as clocks
from synapse_common import pair_scorer as pair_scorer_file
from synapse_common import tracing

INVALIDATE_TIMEOUT_S = 30.0
FORMS_MAX = 4096        # (tenant, model, endpoint) keys whose stream form is kept
State = cache_writer.State


def form_key(tenant: str, model: str, endpoint: str) -> str:
    """Where the stream form a model sent one tenant on one endpoint kind (``chat`` or
    ``completions``, the request's: ``State.endpoint``) is kept: per tenant, so no
    tenant's stream shapes another's replays (a form holds no request data either:
    ``stream_fold.skeleton``), and
    per endpoint kind, so a completions stream never shapes a chat replay (its ``object``,
    ``text``, ``prompt_token_ids``), nor the reverse. The other APIs answered from this
    cache (Messages, Responses) replay in their own event forms and learn none."""
    return f"{tenant}\x00{model}\x00{endpoint}"


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
    embedder_id: str = ""       # pinned (cache.embedder_id): other embedders are not judged


PROBED_IDS = 4      # embedder ids the empty-scope probe asks about at most


class EmbedderMismatch(Exception):
    """Node.Embed answered with another embedder than the verifier was fitted for."""


class PairScorer(Protocol):
    """The agents' pair scorer (``embedder.NodeEmbedder.score_pairs``): a logit per
    candidate and the scorer's id, ``([], "")`` when no agent has one."""

    async def score_pairs(self, query: str, candidates: Sequence[str],
                          timeout_s: float | None = None, tenant: str = ""
                          ) -> tuple[Sequence[float], str]: ...


MAX_PAIRS = pair_scorer_file.MAX_PAIRS     # candidates per pair-scorer call


class TieredCache:
    def __init__(self, *, options: Options, l1: cache_parts.L1Store,
                 metrics: metrics_mod.Metrics, l2: cache_parts.SemanticIndex | None = None,
                 embedder: cache_parts.Embedder | None = None,
                 verifier_model: verifier.Verifier | verifier.Judges | None = None,
                 wall_clock: clocks.Clock = clocks.wall,
                 monotonic: clocks.Clock = clocks.monotonic,
                 pair_scorer: PairScorer | None = None) -> None:
        self.options = options
        self.l1 = l1
        self.l2 = l2
        self.embedder = embedder
        self.judges = None if verifier_model is None else verifier.Judges.of(verifier_model)
        # The embedder adapter scores pairs too (same agents); a given scorer wins.
        self.pair_scorer = pair_scorer or (embedder if hasattr(embedder, "score_pairs")
                                           else None)
        self._scorer_log = cache_budget.ErrorLog(options.log_interval_s, monotonic)
        self.metrics = metrics
        self._wall = wall_clock
        self._mono = monotonic
        self._budget = cache_budget.Budget(metrics, options.log_interval_s, monotonic)
        self.fence = cache_fence.Fence()    # stores that invalidations void
        self._writer = cache_writer.Writer(
            cache_writer.Parts(l1, l2 if self.semantic else None, embedder),
            budget=self._budget, metrics=metrics, ttl_s=options.ttl_s,
            budget_s=options.store_budget_s, queue_max=options.store_queue_max,
            clock=monotonic, learned=self._learned, fence=self.fence)
        # (verifier digest, model, the stack's point) → threshold
        self._thresholds: dict[tuple[str, str, bool], float] = {}
        self._forms: dict[str, Mapping[str, Any]] = {}   # form_key -> a stream form
        # Told each form learnt from a stored stream (shared_routing: the pod's workers).
        self.form_listener: Callable[[str, Mapping[str, Any]], None] | None = None
        # Told (tenant, model) of each invalidation, this process's or a sibling's: what
        # holds copies of answers outside the cache (the coalescer's landed answers).
        self.invalidation_listeners: list[Callable[[str | None, str | None], None]] = []
        # Told (tenant, model) of each invalidation made here (shared_routing: the pod).
        self.invalidation_publisher: Callable[[str | None, str | None], None] | None = None
        self._warmed = False
        # Embedder ids Node.Embed answers named -> when last (wall clock), and until when
        # the probe is not used (an id beyond PROBED_IDS was named).
        self._embedder_ids: dict[str, float] = {}
        self._unprobed_until = 0.0

    @property
    def semantic(self) -> bool:
        return (self.options.semantic_enabled and self.l2 is not None
                and self.embedder is not None and self.judges is not None)

    def _learned(self, embedder_id: str) -> None:
        """Note an embedder id a Node.Embed answer named (for the empty-scope probe)."""
        now = self._wall()
        kept = 2 * self.options.ttl_s
        self._embedder_ids = {i: at for i, at in self._embedder_ids.items()
                              if now - at <= kept}
        if embedder_id in self._embedder_ids or len(self._embedder_ids) < PROBED_IDS:
            self._embedder_ids[embedder_id] = now
        else:
            self._unprobed_until = now + kept

    def _probed_ids(self) -> list[str]:
        """The embedder ids whose L2 scopes may hold entries; empty: the probe cannot
        tell (no id seen yet, or more than it keeps). Pinned or not alike: with
        ``cache.embedder_id`` pinned, a lookup still embeds where the agents' own
        embedder wrote entries, so that the mismatch is counted and logged."""
        now = self._wall()
        if now < self._unprobed_until:
            return []
        kept = 2 * self.options.ttl_s
        return [i for i, at in self._embedder_ids.items() if now - at <= kept]

    # -- lookup --------------------------------------------------------------------------
    async def lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        try:
            return await self._lookup(request)
        except Exception as exc:    # the port promises never to raise
            self._budget.count("exact", "lookup", exc)
            return cache_port.CacheDecision(status="miss", reason="cache error")

    async def _lookup(self, request: cache_port.CacheRequest) -> cache_port.CacheDecision:
        opts = self.options
        started = self._mono()
        rule = cache_rules.policy(request, opts.temperature_ceiling, opts.default_temperature)
        keys = cache_rules.derive(request, opts.embed_model)
        work_s = self._mono() - started
        state = State(request.tenant, request.model, keys, epoch=self.fence.epoch,
                      endpoint=request.endpoint)
        if not self._warmed and self.semantic and (rule.lookup or rule.store):
            # L2 is opened in the background at start-up (cache_wiring.build_l2); at the
            # first cacheable request this asks once more, which does nothing unless that
            # open failed (then it is tried again; no request waits beyond its budget).
            self._warmed = True
            assert self.l2 is not None
            self.l2.warm_up()
        if not rule.lookup:
            self.metrics.cache_bypass.labels(reason=rule.reason).inc()
            return cache_port.CacheDecision(status="bypass", may_store=rule.store,
                                            reason=rule.reason, token=state, work_s=work_s)
        hit = await self._lookup_exact(state, request)
        if hit is not None:
            return cache_port.CacheDecision(status="hit-exact", hit=hit, reason="exact",
                                            exact_key=keys.exact_key, work_s=work_s)
        if self.semantic and keys.semantic_text is not None:
            found, state = await self._lookup_semantic(state, request)
            if found is not None:
                return cache_port.CacheDecision(status="hit-semantic", hit=found,
                                                reason="semantic", exact_key=keys.exact_key,
                                                work_s=work_s)
        self.metrics.cache_misses.inc()
        return cache_port.CacheDecision(status="miss", may_store=rule.store,
                                        reason=rule.reason or "miss", token=state,
                                        exact_key=keys.exact_key, work_s=work_s)

    async def _lookup_exact(self, state: State, request: cache_port.CacheRequest
                            ) -> cache_port.CacheHit | None:
        start = self._mono()
        try:
            with tracing.span("cache.l1"):
                raw = await self._budget.within(
                    self.l1.get(state.tenant, state.model, state.keys.exact_key),
                    self.options.l1_budget_s, "exact", "lookup")
        except cache_budget.Failed:
            return None
        finally:
            self.metrics.cache_lookup_duration.labels(layer="exact").observe(
                self._mono() - start)
        entry = self._decode(raw, state.keys.scope_hash, request.body)
        if entry is None:
            return None
        self.metrics.cache_hits.labels(layer="exact").inc()
        text = state.keys.semantic_text or ""
        return self._hit("exact", entry, request,
                         source=cache_port.HitSource(state.keys.exact_key, text, text))

    async def _lookup_semantic(self, state: State, request: cache_port.CacheRequest
                               ) -> tuple[cache_port.CacheHit | None, State]:
        start = self._mono()
        deadline = start + self.options.semantic_budget_s
        try:
            with tracing.span("cache.l2.probe"):
                present = await self._scope_may_have_entries(state, deadline)
            if not present:
                return None, state      # the writer embeds it, off the hot path
            with tracing.span("cache.embed"):
                state = await self._embed_state(state, deadline)
            with tracing.span("cache.l2"):  # search and verify
                hit = await self._budget.within(self._search_verify(state, request, deadline),
                                                deadline - self._mono(), "semantic", "lookup")
        except cache_budget.Failed:
            return None, state
        finally:
            self.metrics.cache_lookup_duration.labels(layer="semantic").observe(
                self._mono() - start)
        if hit is not None:
            self.metrics.cache_hits.labels(layer="semantic").inc()
        return hit, state

    async def _scope_may_have_entries(self, state: State, deadline: float) -> bool:
        """False when L2 surely holds nothing for this scope, so embedding can wait.

        Every multi-turn conversation and parameter set is a scope of its own, so most
        scopes are empty; a scalar probe costs a fraction of an embedding. Needs the
        embedder id (part of the L2 scope): see :meth:`_probed_ids`.
        """
        ids = self._probed_ids()
        if not ids:
            return True
        return bool(await self._budget.within(self._any_entries(state, ids),
                                              deadline - self._mono(), "semantic", "lookup"))

    async def _any_entries(self, state: State, ids: list[str]) -> bool:
        assert self.l2 is not None
        since = self._wall() - self.options.ttl_s
        found = await asyncio.gather(*(
            self.l2.has_entries(cache_rules.l2_scope(state.keys.scope_hash, i), since)
            for i in ids))
        return any(found)

    async def _embed_state(self, state: State, deadline: float) -> State:
        assert self.embedder is not None and state.keys.semantic_text is not None
        budget = deadline - self._mono()
        start = self._mono()
        result = await self._budget.within(
            self.embedder.embed([state.keys.semantic_text], timeout_s=budget,
                                tenant=state.tenant),  # the agent's cache is per tenant
            budget, "embedder", "embedding")
        self.metrics.embedding_duration.observe(self._mono() - start)
        expected = self.options.embedder_id
        if expected and result.embedder_id != expected:
            exc = EmbedderMismatch(f"the agents serve embedder {result.embedder_id}, the "
                                   f"verifier is fitted for {expected} (cache.embedder_id)")
            self._budget.count("embedder", "embedding", exc)
            raise cache_budget.Failed from exc
        vector = np.asarray(result.vectors, dtype=np.float32)[0]
        self._learned(result.embedder_id)
        return dataclasses.replace(state, vector=vector, embedder_id=result.embedder_id)

    async def _search_verify(self, state: State, request: cache_port.CacheRequest,
                             deadline: float) -> cache_port.CacheHit | None:
        assert self.l2 is not None and self.judges is not None and state.vector is not None
        text = state.keys.semantic_text or ""
        scope = cache_rules.l2_scope(state.keys.scope_hash, state.embedder_id)
        candidates = list(await self.l2.search(scope, state.vector, self.options.top_k,
                                               self._wall() - self.options.ttl_s))
        judge = self.judges.for_embedder(state.embedder_id)
        if judge.stack is not None and candidates:
            return await self._search_stacked(state, request, judge, candidates, deadline)
        threshold = self._threshold(judge, state.model)
        while candidates:
            verdict = judge.judge(text, state.vector, [c.text for c in candidates],
                                          [np.asarray(c.vector) for c in candidates],
                                          threshold=threshold)
            if verdict is None or not verdict.accepted:
                return None
            chosen = candidates.pop(verdict.index)
            raw = await self.l1.get(state.tenant, state.model, chosen.ref)
            entry = self._decode(raw, state.keys.scope_hash, request.body)
            if entry is not None:
                return self._hit("semantic", entry, request, round(verdict.similarity, 4),
                                 round(verdict.score, 4),
                                 cache_port.HitSource(chosen.ref, chosen.text, text, scope,
                                                      judge.digest, state.embedder_id))
        return None

    async def _search_stacked(self, state: State, request: cache_port.CacheRequest,
                              judge: verifier.Verifier, candidates: list[Any],
                              deadline: float) -> cache_port.CacheHit | None:
        """The verifier's probabilities, stacked with the pair scorer's logits when it
        answers as the stack's scorer: the best candidate first, the others only if it
        is not served (see the module docstring)."""
        assert judge.stack is not None and state.vector is not None
        text = state.keys.semantic_text or ""
        texts = [c.text for c in candidates]
        seen = judge.assess(text, state.vector, texts, [np.asarray(c.vector) for c in candidates])
        p = seen.probabilities
        order = [int(i) for i in np.argsort(-p, kind="stable") if p[i] >= judge.stack.floor]
        order = order[:min(self.options.top_k, MAX_PAIRS)]
        alone = self._threshold(judge, state.model), judge.base_digest
        if not order:
            self.metrics.cache_pair_scorer.labels(outcome="skipped").inc()
            return await self._serve_best(state, request, candidates, seen.similarities, p,
                                          *alone)
        unjudged = np.array(p, dtype=np.float64)    # the verifier's, where the stack has not
        for batch in (order[:1], order[1:]):
            if not batch:
                break
            with tracing.span("cache.pair_scorer"):
                logits = await self._pair_logits(state, text, [texts[i] for i in batch],
                                                 judge.stack.pair_scorer, deadline)
            if logits is None:      # the verifier alone judges what the stack has not
                return await self._serve_best(state, request, candidates, seen.similarities,
                                              unjudged, *alone)
            scores = np.full(len(candidates), -np.inf)
            scores[batch] = judge.stacked(p[batch], logits)
            hit = await self._serve_best(state, request, candidates, seen.similarities, scores,
                                         self._threshold(judge, state.model, stacked=True),
                                         judge.digest)
            if hit is not None:
                return hit
            unjudged[batch] = -np.inf
        return None

    async def _serve_best(self, state: State, request: cache_port.CacheRequest,
                          candidates: list[Any], similarities: Any, scores: Any, cut: float,
                          digest: str) -> cache_port.CacheHit | None:
        """The best candidate at or above ``cut`` whose entry is still in L1 and serves."""
        text = state.keys.semantic_text or ""
        scope = cache_rules.l2_scope(state.keys.scope_hash, state.embedder_id)
        for i in np.argsort(-scores, kind="stable"):
            if not scores[i] >= cut:
                return None
            chosen = candidates[i]
            raw = await self.l1.get(state.tenant, state.model, chosen.ref)
            entry = self._decode(raw, state.keys.scope_hash, request.body)
            if entry is not None:
                return self._hit("semantic", entry, request, round(float(similarities[i]), 4),
                                 round(float(scores[i]), 4),
                                 cache_port.HitSource(chosen.ref, chosen.text, text, scope,
                                                      digest, state.embedder_id))
        return None

    async def _pair_logits(self, state: State, query: str, texts: list[str], scorer_id: str,
                           deadline: float) -> Sequence[float] | None:
        """The scorer's logits for (query, text) pairs; None (counted) when the verifier
        alone must decide."""
        outcome, logits = await self._ask_scorer(state, query, texts, scorer_id, deadline)
        self.metrics.cache_pair_scorer.labels(outcome=outcome).inc()
        return logits if outcome == "scored" else None

    async def _ask_scorer(self, state: State, query: str, texts: list[str], scorer_id: str,
                          deadline: float) -> tuple[str, Sequence[float] | None]:
        if self.pair_scorer is None:
            return "unavailable", None
        budget = deadline - self._mono() - self.options.l1_budget_s
        if budget <= 0:
            return "timeout", None
        try:
            async with asyncio.timeout(budget):
                logits, answered = await self.pair_scorer.score_pairs(
                    query, texts, timeout_s=budget, tenant=state.tenant)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._scorer_log.report("pair_scorer", "pair scoring", exc)
            return ("timeout" if isinstance(exc, TimeoutError) else "error"), None
        if not answered:
            return "unavailable", None
        if answered != scorer_id:
            self._scorer_log.report("pair_scorer", "pair scoring", ValueError(
                f"the agents' scorer is {answered}, the verifier's stack was fitted for "
                f"{scorer_id}: judging with the verifier alone"))
            return "mismatch", None
        if len(logits) != len(texts) or not np.all(np.isfinite(logits)):
            self._scorer_log.report("pair_scorer", "pair scoring", ValueError(
                f"{len(logits)} logits for {len(texts)} pairs, or not all finite"))
            return "error", None
        return "scored", logits

    def _threshold(self, judge: verifier.Verifier, model: str, stacked: bool = False
                   ) -> float:
        """The operating point for ``model``'s target precision: the verifier's own, or
        its stack's (``stacked``); worked out once per verifier and model."""
        key = (judge.digest, model, stacked)
        cached = self._thresholds.get(key)
        if cached is None:
            target = self.options.model_target_precision.get(model,
                                                             self.options.target_precision)
            cached = (judge.stack_threshold_for(target, model) if stacked
                      else judge.threshold_for(target, model))
            self._thresholds[key] = cached
        return cached

    def learn_form(self, key: str, form: Mapping[str, Any]) -> bool:
        """Remember ``form`` as the way a model streams to a tenant (``key``:
        :func:`form_key`), for replaying that tenant's answers stored from plain requests
        (at most ``FORMS_MAX`` keys); True when it is news."""
        if self._forms.get(key) == form or (key not in self._forms
                                            and len(self._forms) >= FORMS_MAX):
            return False
        self._forms[key] = form
        return True

    # -- store ---------------------------------------------------------------------------
    def store(self, decision: cache_port.CacheDecision, response: Mapping[str, Any]) -> None:
        try:
            state = decision.token
            if (not decision.may_store or not isinstance(state, State)
                    or not cache_rules.is_storable(response)):
                return
            form = getattr(response, "form", None)      # stored from a stream
            key = form_key(state.tenant, state.model, state.endpoint)
            if form and self.learn_form(key, form) and self.form_listener is not None:
                self.form_listener(key, form)
            self._writer.put(state, response)
        except asyncio.QueueFull as exc:
            # A burst beyond the writer's pace: drop the write, never slow the response.
            self._budget.count("writer", "store (queue full)", exc)
        except Exception as exc:    # the port promises never to raise
            self._budget.count("writer", "store", exc)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until queued writes are done (tests, benchmarks and shutdown)."""
        await self._writer.drain(timeout_s)

    # -- admin / lifecycle ---------------------------------------------------------------
    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        """Remove entries of both layers (admin call): raises ``errors.Unavailable``, naming
        the layer, when one could not be reached."""
        if not everything and tenant is None and model is None:
            raise ValueError("invalidate needs a tenant, a model or everything=True")
        self.forget(tenant, model)              # first: stores in flight are voided
        if self.invalidation_publisher is not None:
            self.invalidation_publisher(tenant, model)
        counts: list[int] = []
        failed: list[str] = []
        layers: list[tuple[str, cache_parts.L1Store | cache_parts.SemanticIndex | None]] = [
            ("exact", self.l1), ("semantic", self.l2)]
        for name, layer in layers:
            try:
                async with asyncio.timeout(INVALIDATE_TIMEOUT_S):
                    counts.append(await layer.invalidate(tenant, model) if layer else 0)
            except Exception as exc:
                # Both layers are attempted; the admin is told which one did not finish.
                counts.append(0)
                failed.append(f"{name} layer: {type(exc).__name__}: {exc}")
                self._budget.count(name, "invalidate", exc)
        if failed:
            raise errors.Unavailable(
                f"cache invalidation incomplete ({'; '.join(failed)}); removed {counts[0]} "
                f"exact and {counts[1]} semantic entries", code="cache_unavailable")
        return counts[0], counts[1]

    def forget(self, tenant: str | None, model: str | None) -> None:
        """What an invalidation undoes in this process, the shared stores left alone (a
        sibling worker's invalidation deleted there): stores of earlier lookups are voided
        (``cache_fence``), L2's local copies dropped, the listeners told."""
        self.fence.invalidated(tenant, model)
        if self.l2 is not None:
            self.l2.forget(tenant, model)
        for listener in self.invalidation_listeners:
            listener(tenant, model)

    async def close(self) -> None:
        await self._writer.close()
        for part in (self.embedder, self.l2, self.l1):
            if part is not None:
                with contextlib.suppress(Exception):    # closing: nothing left to do
                    await part.close()

    # -- helpers -------------------------------------------------------------------------
    def _decode(self, raw: bytes | None, scope_hash: str,
                body: Mapping[str, Any]) -> cache_entry.Entry | None:
        if raw is None:
            return None
        try:
            entry = cache_entry.decode(raw, scope_hash)
        except ValueError as exc:
            self._budget.count("exact", "decode", exc)
            return None
        return entry if entry is not None and cache_entry.serves(entry, body) else None

    def _hit(self, layer: cache_port.HitLayer, entry: cache_entry.Entry,
             request: cache_port.CacheRequest, similarity: float | None = None,
             score: float | None = None, source: cache_port.HitSource | None = None
             ) -> cache_port.CacheHit:
        """A hit; streamed in its own form, else in the form this model streams in."""
        return cache_port.CacheHit(layer=layer, response=entry.response,
                                   similarity=similarity, score=score,
                                   form=entry.form or self._forms.get(
                                       form_key(request.tenant, request.model,
                                                request.endpoint)),
                                   source=source)
