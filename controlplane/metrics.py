"""Every metric the control plane exports, defined here and nowhere else.

``Metrics(registry)`` registers them on a registry of the caller's choosing (tests and
the manifest checks build their own). Dashboards and alert rules use these names only; a
test collects them from a fresh registry and fails on any other name.

:func:`fast` gives the serving path a labelled child's update without
prometheus_client's checks at every call (is the metric labelled? a linear walk of the
buckets): the child is labelled once, and a histogram finds its bucket by bisection.
The values are the child's own, so what ``/metrics`` shows is unchanged.
"""

from __future__ import annotations

import bisect
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.requests = Counter(
            "synapse_requests_total", "Requests answered, by model, HTTP status, tenant and "
            "route (the API path: /v1/chat/completions, /v1/messages, /tokenize ...).",
            ["model", "status", "tenant", "route"], registry=r)
        self.request_duration = Histogram(
            "synapse_request_duration_seconds", "Time from request to last byte.",
            ["model", "cache", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_byte = Histogram(
            "synapse_time_to_first_byte_seconds", "Time from request to first response byte.",
            ["model", "cache", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_retries = Counter(
            "synapse_upstream_retries_total", "Attempts moved to the next backend before the "
            "first byte.", ["model", "reason"], registry=r)
        self.route_decisions = Counter(
            "synapse_route_decisions_total", "Backends chosen, by backend and reason.",
            ["backend", "reason"], registry=r)
        self.fallbacks = Counter(
            "synapse_fallbacks_total", "Requests served by a fallback model.",
            ["model", "fallback"], registry=r)
        self.backends = Gauge(
            "synapse_backends", "Known backends by state.", ["state"], registry=r)
        self.readiness = Gauge(
            "synapse_ready", "This replica's readiness conditions (1 = met): config_loaded, "
            "registry_synced, routable_backend (reported; /ready needs only the first two).",
            ["condition"], registry=r)
        self.backend_inflight = Gauge(
            "synapse_backend_inflight_requests", "Requests in flight per backend (ledger).",
            ["backend"], registry=r)
        self.nodes = Gauge("synapse_nodes", "Known nodes by status.", ["status"], registry=r)
        self.node_report_age = Gauge(
            "synapse_node_report_age_seconds", "Seconds since the node's last report.",
            ["node"], registry=r)
        self.rate_limited = Counter(
            "synapse_rate_limited_total", "Requests refused with 429.", ["tenant", "limit"],
            registry=r)
        self.loop_share_wait = Counter(
            "synapse_loop_share_wait_seconds_total", "Seconds requests waited for their "
            "tenant's turn on a serving process's event loop (core.loop_share).", ["tenant"],
            registry=r)
        self.cache_hits = Counter(
            "synapse_cache_hits_total", "Responses served from the cache.", ["layer"],
            registry=r)
        self.cache_misses = Counter(
            "synapse_cache_misses_total", "Cacheable requests that missed both layers.",
            registry=r)
        self.cache_bypass = Counter(
            "synapse_cache_bypass_total", "Requests not looked up, by reason.", ["reason"],
            registry=r)
        self.cache_errors = Counter(
            "synapse_cache_errors_total", "Cache calls that failed or ran out of time "
            "(served from a backend instead).", ["layer"], registry=r)
        self.cache_stores = Counter(
            "synapse_cache_stores_total", "Entries written.", ["layer"], registry=r)
        self.embedding_duration = Histogram(
            "synapse_embedding_duration_seconds", "Node.Embed round trip for a cache lookup.",
            buckets=FAST_BUCKETS, registry=r)
        self.cache_pair_scorer = Counter(
            "synapse_cache_pair_scorer_total", "Semantic lookups judged by a verifier with a "
            "stack, by what the pair scorer (Node.ScorePairs) did: scored (the stack decided), "
            "skipped (no candidate reached the stack's floor: no call), unavailable (no agent "
            "has a scorer), mismatch (another scorer than the stack was fitted for), timeout "
            "or error (the verifier alone decided in these last four).", ["outcome"],
            registry=r)
        self.cache_lookup_duration = Histogram(
            "synapse_cache_lookup_duration_seconds", "Cache lookup time by layer.",
            ["layer"], buckets=FAST_BUCKETS, registry=r)
        self.cache_feedback = Counter(
            "synapse_cache_feedback_total", "Client verdicts on cache hits (POST "
            "/v1/cache/feedback), by model, layer, verdict (right, wrong) and tenant.",
            ["model", "layer", "verdict", "tenant"], registry=r)
        self.cache_live_precision = Gauge(
            "synapse_cache_live_precision", "Share of judged semantic hits that were right, "
            "per model, since this replica started (bound: estimate, or the lower / upper end "
            "of its 95% Wilson interval, widened to every leave-one-tenant-out interval).",
            ["model", "bound"], registry=r)
        self.redis_errors = Counter(
            "synapse_redis_errors_total", "Redis calls of the serving path that failed or ran "
            "out of time (rate limits fell back to this replica's own).", ["op"], registry=r)
        self.fleet_reconcile_failures = Counter(
            "synapse_fleet_reconcile_failures_total", "Failed steps of the fleet reconcile "
            "loop: load (operator intent unreadable, the last known is kept), push (an agent "
            "did not apply its desired engines), reconcile (anything else).", ["stage"],
            registry=r)
        self.agent_streams = Gauge(
            "synapse_agent_streams", "Agent report streams connected to this replica.",
            registry=r)
        self.workers = Gauge(
            "synapse_workers", "This pod's serving processes at the last scrape of its "
            "/metrics (set with http.workers above 1), by state: answered (the primary and "
            "each worker whose metrics are in the sums), missing (no usable answer in time: "
            "its counters stand at its last answer, its gauges are absent).", ["state"],
            registry=r)

        # -- the router's own accuracy and learned costs (controlplane/api/route_accuracy.py)
        self.route_ttft_error = Histogram(
            "synapse_route_prediction_error_ttft_seconds", "Observed minus predicted time to "
            "first token of streamed answers, absolute.", ["backend"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r)
        self.route_ttft_bias = Gauge(
            "synapse_route_prediction_error_ttft_bias_seconds", "Mean of observed minus "
            "predicted TTFT over recent answers (positive: the router is optimistic).",
            ["backend"], registry=r)
        self.route_cached_error = Histogram(
            "synapse_route_prediction_error_cached_tokens", "Predicted minus engine-reported "
            "cached prompt tokens, absolute.", ["backend"],
            buckets=(0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r)
        self.route_cached_tokens = Counter(
            "synapse_route_cached_tokens_total", "Cached prompt tokens of answers that "
            "reported them: as the router predicted and as the engine reported.",
            ["backend", "source"], registry=r)
        self.route_prefill_cost = Gauge(
            "synapse_route_learned_prefill_seconds_per_token", "Prefill seconds per uncached "
            "token the router uses for the backend.", ["backend"], registry=r)
        self.route_decode_cost = Gauge(
            "synapse_route_learned_decode_seconds_per_step", "Decode step seconds the router "
            "uses for the backend.", ["backend"], registry=r)
        self.route_overhead = Gauge(
            "synapse_route_learned_overhead_seconds", "Fixed time to a first token the "
            "router uses for the backend.", ["backend"], registry=r)

        # -- fairness (issue 18): tokens per tenant, the fair queue, coalescing -----------
        # (controlplane/api/fairness.py records them)
        self.tokens = Counter(
            "synapse_tokens_total", "Tokens by tenant, model and kind: prompt, completion "
            "and cached (engines' usage), cache_hit (prompt + completion of answers served "
            "from the response cache: what it saved).", ["tenant", "model", "kind"],
            registry=r)
        self.queue_depth = Gauge(
            "synapse_queue_depth", "Requests waiting in the fair queue, by priority class "
            "and tenant.", ["class", "tenant"], registry=r)
        self.queue_wait = Histogram(
            "synapse_queue_wait_seconds", "Time requests spent in the fair queue, by class, "
            "tenant and outcome (dispatched, timeout, cancelled).",
            ["class", "tenant", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seats = Gauge(
            "synapse_queue_backend_seats", "The concurrency limit the fair queue learned per "
            "backend (sequences the engine runs at once; absent until its reports show it).",
            ["backend"], registry=r)
        self.queue_refused = Counter(
            "synapse_queue_refused_total", "Requests the fair queue refused at once, by "
            "class, tenant and reason (queue_full, overloaded).", ["class", "tenant", "reason"],
            registry=r)
        self.coalesced = Counter(
            "synapse_cache_coalesced_total", "Requests that waited for an identical request "
            "in flight: answered from it (hit) or sent on their own (alone).", ["outcome"],
            registry=r)
        self.usage_flush_failures = Counter(
            "synapse_usage_flush_failures_total", "Usage flushes to the shared store that "
            "failed (the counts wait for the next flush).", registry=r)


class FastCounter:
    """A labelled counter child's ``inc``, on the same value object without its lock.

    Only the event loop's thread updates these children (the serving path), so the lock
    guards against nothing there; readers in other threads (``/metrics`` rendering) still
    take it, and a float's read is atomic under the GIL."""

    __slots__ = ("_value",)

    def __init__(self, child: Any) -> None:
        self._value = child._value

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._value._value += amount


class FastHistogram:
    """A labelled histogram child's ``observe``: the first bucket whose upper bound is at
    least the amount, found by bisection (a NaN, like in prometheus_client, is in none)."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._sum = child._sum
        self._buckets = child._buckets
        self._bounds = child._upper_bounds

    def observe(self, amount: float) -> None:
        self._sum._value += amount      # unlocked, as FastCounter's
        bounds = self._bounds
        i = bisect.bisect_left(bounds, amount)
        if i < len(bounds) and amount <= bounds[i]:
            self._buckets[i]._value += 1


def fast(child: Any) -> Any:
    """``child`` (a labelled child of a metric above) with its update at a lower cost per
    call: a :class:`FastCounter` or :class:`FastHistogram`, else the child itself (a
    gauge, or a prometheus_client whose children no longer keep these parts)."""
    if isinstance(child, Counter) and _plain(getattr(child, "_value", None)):
        return FastCounter(child)
    if (isinstance(child, Histogram) and hasattr(child, "_upper_bounds")
            and _plain(getattr(child, "_sum", None))
            and all(_plain(b) for b in getattr(child, "_buckets", [None]))):
        return FastHistogram(child)
    return child


def _plain(value: object) -> bool:
    """Whether ``value`` is prometheus_client's in-process float (``MutexValue``), which
    the fast children update in place; a multiprocess (mmap) value keeps its own path."""
    return type(value) is values.MutexValue
