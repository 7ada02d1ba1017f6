"""Fleet-wide ``/api/v1/stats`` and ``Admin.GetStats`` (issue 19).

With ``redis.url`` every replica answers the others' questions on one Redis channel
(:class:`controlplane.adapters.redis_fanout.Fanout`), and :func:`snapshot` asks the fleet,
waits up to ``stats.fleet_timeout_s`` and merges what came back with its own figures
(:mod:`controlplane.core.stats_merge`). The answer says how many replicas were asked and
how many answered (``replicas_asked``, ``replicas_answered``, ``replicas``); a replica
that does not answer in time is left out, and Redis being unreachable leaves this
replica's figures alone, with ``fleet_error`` saying why (never the URL). Without Redis
the answer is this replica's, as one of one.

A pod of ``http.workers`` processes is as many replicas to Redis (each answers on the
channel). When Redis cannot be asked, the pod's other processes are asked instead, on
the private unix sockets that serve their metrics (:data:`OWN_ROUTE`,
``Services.worker_metrics_sockets``), asked beside Redis and within the same deadline (a
Redis that accepts but never answers does not cost the timeout twice): the answer is then the
pod's, and ``fleet_error`` says so, rather than one process's figures, which miss every
request the kernel gave its siblings.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from controlplane.adapters import redis_fanout
from controlplane.api import context, worker_metrics
from controlplane.api import services as services_mod
from controlplane.core import stats_merge
from synapse_common import aiotasks

log = logging.getLogger("synapse.controlplane.stats")
CHANNEL = "synapse:stats"
OWN_ROUTE = "/stats"        # a process's own figures, on its pod's private socket
_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("stats_fanout_task", asyncio.Task)


def install(app: web.Application) -> None:
    app.cleanup_ctx.append(_fanout_ctx)


@context.with_redis
async def _fanout_ctx(app: web.Application, svc: services_mod.Services,
                      url: str) -> AsyncIterator[None]:
    async def answer() -> bytes:
        return orjson.dumps(local(svc))

    def on_error(exc: Exception) -> None:
        svc.metrics.redis_errors.labels("stats").inc()
        log.debug("fleet stats through redis: %s", type(exc).__name__)

    fanout = redis_fanout.Fanout(url, CHANNEL, answer, on_error)
    svc.stats_fanout = fanout
    app[_TASK] = asyncio.get_running_loop().create_task(fanout.run())
    yield
    svc.stats_fanout = None
    await aiotasks.stop(app[_TASK])
    await fanout.close()


def local(svc: services_mod.Services) -> dict[str, Any]:
    """This replica's figures, as the other replicas receive them."""
    nodes = sum(1 for n in svc.registry.nodes() if n.status == "ready")
    backends = sum(1 for _, why in svc.registry.all_backends() if not why)  # routable
    return stats_merge.export(svc.stats, nodes, backends)


async def own(request: web.Request) -> web.Response:
    """This process's figures (:func:`local`), for its pod's other processes."""
    return web.Response(body=orjson.dumps(local(request.app[context.SERVICES])),
                        content_type="application/json")


async def snapshot(svc: services_mod.Services) -> dict[str, Any]:
    """The fleet's figures (``Stats.snapshot`` keys, ``nodes_ready``, ``backends_ready``,
    ``replica`` — the one answering —, ``replicas_asked``, ``replicas_answered``,
    ``replicas``, ``fleet_error``)."""
    parts = [local(svc)]
    asked, error = 1, ""
    timeout_s = svc.settings.stats.fleet_timeout_s
    fanout = svc.stats_fanout
    sockets = svc.worker_metrics_sockets
    # The pod's other processes are asked at once, beside Redis, and heard only if Redis
    # fails: asked after it, a Redis that accepts but never answers cost the timeout twice.
    siblings = (asyncio.ensure_future(_ask_siblings(sockets, timeout_s)) if sockets
                else None)
    try:
        if fanout is not None:
            try:
                others, answers = await fanout.ask(timeout_s)
            except Exception as exc:
                svc.metrics.redis_errors.labels("stats").inc()
                error = f"redis unreachable ({type(exc).__name__})"
            else:
                asked += others
                parts.extend(_decoded(answers))
        if (fanout is None or error) and siblings is not None:
            texts = await siblings
            asked += len(sockets)
            parts.extend(_decoded([t.encode() for t in texts if t is not None]))
            error = error and f"{error}: this pod's figures only"
        else:
            error = error and f"{error}: this replica's figures only"
    finally:
        if siblings is not None and not siblings.done():
            siblings.cancel()
    merged = stats_merge.merge(parts)
    merged.update(replica=svc.replica, replicas_asked=asked, replicas_answered=len(parts),
                  fleet_error=error)
    return merged


async def _ask_siblings(sockets: tuple[pathlib.Path, ...], timeout_s: float) -> list[str | None]:
    """Each of the pod's other processes' figures (None where one did not answer)."""
    return list(await asyncio.gather(*(worker_metrics.fetch(p, timeout_s, OWN_ROUTE)
                                       for p in sockets)))


def _decoded(answers: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for raw in answers:
        try:
            part = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(part, dict):
            out.append(part)
    return out
