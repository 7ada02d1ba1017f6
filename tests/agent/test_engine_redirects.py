"""No request of the agent to an engine follows a redirect: an external
server's ``/openapi.json``, ``/health`` or ``/metrics`` that redirects sent the agent
wherever it pointed (the control plane's prober follows none). The stand-in redirects
each to a path that answers as the engine would, and records whether it was asked."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import engine_tasks, metrics
from agent import runner as runners
from agent.core import types
from tests import harness
from tests.agent.supervisor_testing import supervisor_settings
from tests.http_standins import served

RERANKER = {"openapi": "3.1.0", "paths": {"/v1/rerank": {}, "/health": {}}}
EXPOSITION = b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3.0\n"


class Redirecting:
    """Every path redirects to ``/followed`` + itself, which answers and is recorded; the
    paths asked first are recorded too."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.followed: list[str] = []

    async def moved(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        raise web.HTTPFound("/followed" + request.path)

    async def target(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.followed.append(path)
        if path == "openapi.json":
            return web.Response(body=json.dumps(RERANKER), content_type="application/json")
        if path == "metrics":
            return web.Response(body=EXPOSITION, content_type="text/plain")
        return web.json_response({})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/followed/{path}", self.target)
        app.router.add_get("/{path}", self.moved)
        async with served(app) as url:
            yield url


async def test_an_engines_document_is_read_without_following_a_redirect() -> None:
    server = Redirecting()
    async with server.running() as url, aiohttp.ClientSession() as session:
        assert await engine_tasks.discover(session, url, 30) == (), "no document"
    assert server.followed == []


async def test_an_external_engines_probes_and_scrapes_follow_no_redirect(tmp_path) -> None:
    server = Redirecting()
    async with server.running() as url, aiohttp.ClientSession() as session:
        spec = types.EngineSpec(name="x", engine="external", model="m", url=url)
        hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n", lambda: None)
        r = runners.Runner(spec, supervisor_settings(tmp_path), session, hooks, "127.0.0.1")
        r.start()
        try:
            await harness.until(lambda: server.asked.count("/health") >= 3, 10,
                                "three probes of /health")
            assert r.phase == runners.Phase.STARTING, "a redirect is not a 200"
            await r.scrape()
            assert not r.metrics_ok and r.in_flight() is None
        finally:
            await r.stop()
    assert server.followed == []
