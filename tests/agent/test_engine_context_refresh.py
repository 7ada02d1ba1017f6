"""A backend's context length is not learnt once for the engine's life: a read that got
no answer when the engine became ready is asked again at the next probes, an engine
read before is asked again every minute (``CONTEXT_RECHECK_S``: an external engine
replaced behind its URL), and a read that gets no answer keeps the length last read."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import metrics
from agent import runner as runners
from agent.core import types
from agent.core.types import Phase
from tests import harness
from tests.agent.supervisor_testing import drive, supervisor_settings
from tests.clock import VirtualTime
from tests.http_standins import served


class Engine:
    """An external engine whose ``/v1/models`` lists ``length`` (None: a server error,
    as a busy or restarting engine gives)."""

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.asked = 0

    def app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            return web.Response()

        async def models(request: web.Request) -> web.Response:
            self.asked += 1
            if self.length is None:
                return web.Response(status=503)
            return web.json_response({"object": "list", "data": [
                {"id": "m", "max_model_len": self.length}]})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        return app


def _runner(tmp_path, session: aiohttp.ClientSession, url: str, changes: list[int],
            **kw: Any) -> runners.Runner:
    hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n",
                          lambda: changes.append(1))
    spec = types.EngineSpec(name="x", engine="external", model="m", url=url)
    return runners.Runner(spec, supervisor_settings(tmp_path, **kw.pop("settings", {})),
                          session, hooks, "127.0.0.1", **kw)


async def test_a_length_not_read_when_the_engine_became_ready_is_read_at_the_next_probes(
        tmp_path) -> None:
    """Review finding: a read that failed when the engine became ready left its length
    unknown for the engine's life."""
    engine, changes = Engine(None), []
    async with served(engine.app()) as url, aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, url, changes)
        r.start()
        try:
            await harness.until(lambda: r.phase == Phase.READY, 10, "ready")
            assert r.status(draining=False).max_model_len == 0
            engine.length = 4096
            await harness.until(lambda: r.max_model_len == 4096, 10, "the length read")
            assert r.status(draining=False).max_model_len == 4096
            assert changes, "reported at once"
            asked = engine.asked
            await asyncio.sleep(0.5)    # five probe intervals: read, it is not asked again
            assert engine.asked == asked
        finally:
            await r.stop()


async def test_a_length_is_read_again_later_and_kept_while_the_engine_gives_no_answer(
        tmp_path) -> None:
    """An external engine replaced behind the same URL may have another length; one that
    does not answer (busy, restarting) keeps the length last read."""
    vt, engine, changes = VirtualTime(), Engine(4096), []
    async with served(engine.app()) as url, aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, url, changes, timing=vt.time,
                    settings={"probe_interval_s": 5})
        r.start()
        try:
            await drive(vt, lambda: r.phase == Phase.READY, "ready")
            assert r.max_model_len == 4096
            engine.length, asked = None, engine.asked
            ready_at = vt.now
            await drive(vt, lambda: vt.now - ready_at > 70, "a minute and more", within=100)
            assert engine.asked > asked, "read again"
            assert r.status(draining=False).max_model_len == 4096, "the last length kept"
            engine.length = 8192    # replaced behind the same URL
            await drive(vt, lambda: r.max_model_len == 8192, "the new length", within=20)
            assert r.status(draining=False).max_model_len == 8192
        finally:
            await r.stop()
