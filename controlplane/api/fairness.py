"""The serving path's calls into fairness (issue 18), one per point of the request.

``serving.generate`` and ``proxy.forward`` call these at their narrowest points:

0. :func:`lookup` / :func:`store` — the response cache, through the coalescer;
1. :func:`cache_hit` — an answer from the response cache: accounted as tokens saved;
2. :func:`admit` — after a cache miss, before routing: the tenant's (and the tenant x
   model's) tokens per minute and budget, charged ``n`` x the completion estimate for a
   request of ``n`` choices; 429 naming the limit otherwise;
3. :func:`hold` — after routing, when the queue is on (:func:`queues`): when the chosen
   backends are saturated, wait for a fair turn in the queue, then route again (the fleet
   moved meanwhile), a backend with room first;
4. :func:`upstream_body` / :func:`stripper` — a stream whose client did not ask for usage
   asks the engine for it, and the client's copy loses it again;
5. :func:`answered` — the exchange with the backend settled (its status and ``usage``);
   a stream relayed (:func:`counter` counts its content deltas) that ended without the
   engine's usage — its client went away, the engine broke it off — gets an estimate
   instead: the prompt's tokens and the deltas relayed, marked ``estimated``, so a cut
   stream is billed for what reached the client rather than for nothing; a whole answer
   of a generating path (``tasks.GENERATING``) without usage is billed the estimate it
   was admitted with, marked ``estimated`` (an engine that answers before it generates,
   as a background response does, or one that reports no usage, is not free); other
   paths' answers without usage (``/tokenize``, speech) count no tokens;
6. :func:`finish` — the request ended, however: the charge is corrected to the usage and
   the request accounted (in a task: this runs in ``finally`` of a handler that may be
   cancelled), coalesced followers are released (a leader that stored nothing), and the
   model's queue is woken.

The per-request state is a :class:`Flow` on the request's context (``flow``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from controlplane import errors
from controlplane.api import context, fairness_wiring
from controlplane.api import services as services_mod
from controlplane.core import (
    cache_port,
    fairness,
    stream_usage,
    token_limits,
    usage_book,
)
from controlplane.core import router as router_mod
from controlplane.core import types as core_types
from controlplane.core import usage as usage_mod
from protos.synapse.v1 import admin_pb2
from synapse_common import tasks, tracing

_tasks: set[asyncio.Task[Any]] = set()


@dataclasses.dataclass(slots=True)
class Flow:
    tenant: str
    model: str
    charge: token_limits.Charge | None = None
    status: int = 0                         # the backend's answer (0: none)
    usage: usage_mod.Usage | None = None
    strip: bool = False                     # usage asked on the client's behalf
    prompt: router_mod.Prompt | None = None
    delivered: stream_usage.DeliveredCounter | None = None     # a stream's content deltas
    # (model, class, weight, tokens) of a request the fair queue held: its tenant's place
    # in the queue pays what it used beyond those tokens (:func:`finish`)
    queued: tuple[str, str, float, int] | None = None


def _fair(request: web.Request) -> fairness.Fairness:
    svc = request[context.CONTEXT].svc
    return svc.fairness or fairness_wiring.get(svc)


async def lookup(request: web.Request,
                 cache_request: cache_port.CacheRequest) -> cache_port.CacheDecision:
    """The response cache's decision; a miss identical to a request in flight waits for
    it (coalescing) and is answered from it when it can be."""
    svc = request[context.CONTEXT].svc
    coalescer = (svc.fairness or fairness_wiring.get(svc)).coalescer
    if coalescer is None:
        return await svc.cache.lookup(cache_request)
    return await coalescer.lookup(svc.cache, cache_request)


def store(request: web.Request, decision: cache_port.CacheDecision,
          response: Mapping[str, Any]) -> None:
    """Hand a complete answer to the response cache (and to the requests waiting for it)."""
    svc = request[context.CONTEXT].svc
    coalescer = (svc.fairness or fairness_wiring.get(svc)).coalescer
    if coalescer is None:
        svc.cache.store(decision, response)
    else:
        coalescer.store(svc.cache, decision, response)


def cache_hit(request: web.Request, tenant: str, model: str,
              response: Mapping[str, Any]) -> None:
    _fair(request).cache_hit(tenant, model, response)


async def admit(request: web.Request, tenant: str, model: str, prompt: router_mod.Prompt,
                max_tokens: int, sequences: int = 1) -> None:
    """Charge the request's estimate (``sequences`` completions: ``n`` x the prompts of a
    batch), or raise the 429 of the limit it is over (a refused request is not
    accounted: usage counts the requests admitted). The fair queue weighs a held request
    by the same estimate (:func:`hold`)."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    fair = svc.fairness or fairness_wiring.get(svc)     # built on first use
    try:
        charge = await fair.admit(tenant, model, prompt.tokens, max_tokens, sequences)
    except errors.RateLimited as exc:
        svc.child(svc.metrics.rate_limited, tenant, exc.limit).inc()
        raise
    ctx.flow = Flow(tenant, model, charge, prompt=prompt)


def queues(request: web.Request) -> bool:
    """Whether a routed request may wait in the fair queue (``fairness.queue.enabled``);
    callers skip :func:`hold` (a coroutine and a closure per request) when it is off."""
    return _fair(request).gate is not None


async def hold(request: web.Request, route: core_types.RouteDecision,
               reroute: Callable[[], core_types.RouteDecision]) -> core_types.RouteDecision:
    """``route``, or when its backends are saturated a new route after a fair wait."""
    fair = _fair(request)
    if fair.gate is None:
        return route
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    flow = ctx.flow
    assert flow is not None     # admitted before it is routed
    cls, weight = fair.priority_of(flow.tenant,
                                   request.headers.get(svc.settings.fairness.queue.header))
    if not fair.must_wait(route, cls):
        return route
    charge = flow.charge
    tokens = (charge.prompt_tokens + charge.completion_tokens if charge is not None
              else route.prompt.tokens + fair.completion_estimate(route.prompt.max_tokens))
    try:
        with tracing.span("queue.wait", {"synapse.queue.class": cls}):
            await fair.hold(route, flow.tenant, cls, weight, tokens)
    except (errors.QueueFull, errors.QueueTimeout) as exc:
        reason = "queue_full" if isinstance(exc, errors.QueueFull) else "overloaded"
        svc.child(svc.metrics.queue_refused, cls, flow.tenant, reason).inc()
        raise
    flow.queued = (route.model, cls, weight, tokens)
    return fair.room_first(reroute(), cls)


def upstream_body(request: web.Request, body: Mapping[str, Any], model: str,
                  raw: bytes) -> bytes:
    """``raw``, or — for a stream that did not ask for usage, when usage is accounted —
    the body asking for it (the client's copy is stripped: :func:`stripper`)."""
    flow = request[context.CONTEXT].flow
    if flow is None or _fair(request).book is None or not stream_usage.needs_usage(body):
        return raw
    flow.strip = True
    return stream_usage.upstream_body({**body, "model": model})


def stripper(request: web.Request) -> stream_usage.UsageStripper | None:
    flow = request[context.CONTEXT].flow
    return stream_usage.UsageStripper() if flow is not None and flow.strip else None


def counter(request: web.Request) -> stream_usage.DeliveredCounter | None:
    """A counter of the content deltas of the event stream about to be relayed (fed what
    reached the client), for an admitted request; None otherwise."""
    flow = request[context.CONTEXT].flow
    if flow is None:
        return None
    flow.delivered = stream_usage.DeliveredCounter()
    return flow.delivered


def answered(request: web.Request, status: int,
             usage: usage_mod.Usage | None) -> usage_mod.Usage | None:
    """The exchange settled: the backend's status and the engine's usage (if found).
    The usage to account: the engine's, or for a 200 without it, :func:`_estimate`."""
    flow = request[context.CONTEXT].flow
    if flow is None:
        return usage
    flow.status = status
    if usage is None and status == 200:
        usage = _estimate(request, flow)
    flow.usage = usage
    return usage


def _estimate(request: web.Request, flow: Flow) -> usage_mod.Usage | None:
    """A 200's usage when the engine gave none, marked ``estimated``: for a stream
    relayed, the prompt's tokens and the content deltas relayed (a floor); for a whole
    answer of a path that generates, the estimate it was admitted with (prompt tokens and
    the completion estimate: what the token limits keep charged for it too); for other
    paths, none (nothing generated to count)."""
    if flow.delivered is not None:
        prompt = flow.prompt.tokens if flow.prompt is not None else 0
        return usage_mod.Usage(prompt, flow.delivered.count, None, estimated=True)
    charge = flow.charge
    if charge is not None and tasks.ROUTES.get(request.path) in tasks.GENERATING:
        return usage_mod.Usage(charge.prompt_tokens, charge.completion_tokens, None,
                               estimated=True)
    return None


def finish(request: web.Request, decision: cache_port.CacheDecision | None,
           failed: bool) -> None:
    """The request ended (``failed``: it raised). Never awaits: safe in ``finally`` of a
    cancelled handler."""
    ctx = request[context.CONTEXT]
    svc = ctx.svc
    fair = svc.fairness or fairness_wiring.get(svc)     # built on first use
    coalescer = fair.coalescer
    if decision is not None and coalescer is not None:
        coalescer.done(decision)
    flow = ctx.flow
    if flow is None:
        return
    if flow.queued is not None and fair.gate is not None and flow.usage is not None:
        # the queue tagged it with an estimate (no max_tokens: the default completion):
        # the tenant's place pays what it used, so a long answer costs its share
        model, cls, weight, tokens = flow.queued
        used = flow.usage.prompt_tokens + flow.usage.completion_tokens
        fair.gate.settle(model, flow.tenant, cls, weight, tokens, used)
    ok = flow.status == 200
    outcome = fairness.Outcome(flow.usage if ok else None, ok,
                               failed or ctx.broken or flow.status >= 400)
    charge = flow.charge
    if charge is None or not charge.to_correct:    # no limit to correct: no task of its own
        fair.record(flow.tenant, flow.model, outcome)
        return
    task = asyncio.get_running_loop().create_task(
        fair.settle(charge, flow.tenant, flow.model, outcome))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


# -- Admin.GetUsage ----------------------------------------------------------------------


async def usage_response(svc: services_mod.Services,
                         request: admin_pb2.GetUsageRequest) -> admin_pb2.GetUsageResponse:
    since = request.since_seconds if request.since_seconds > 0 else 86_400.0
    if since > 3660 * 86_400:
        raise errors.BadRequest("since_seconds is longer than ten years", param="since_seconds")
    try:
        rows = await fairness_wiring.usage_rows(svc, request.tenant or None, since)
    except Exception as exc:    # whatever the store raised (Redis down): say so, UNAVAILABLE
        svc.metrics.redis_errors.labels("usage").inc()
        raise errors.UsageStoreUnavailable(
            f"the usage store is unreachable ({type(exc).__name__}); try again shortly"
        ) from None
    return admin_pb2.GetUsageResponse(rows=[_row(r) for r in rows])


def _row(r: usage_book.Row) -> admin_pb2.UsageRow:
    c = r.counts
    return admin_pb2.UsageRow(
        day=r.key.day, tenant=r.key.tenant, model=r.key.model, requests=c.requests,
        prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
        cached_tokens=c.cached_tokens, cache_hit_tokens=c.cache_hit_tokens, errors=c.errors,
        cost=c.cost, estimated=c.estimated)
