"""A backend's context length is not learnt once for the engine's life: a read that got
no answer when the engine became ready is asked again at the next probes, an engine
read before is asked again every minute (``CONTEXT_RECHECK_S``: an external engine
replaced behind its URL), and a read that gets no answer keeps the length last read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
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
    as a busy or restarting engine gives), or answers ``status`` when it is not 200.
    ``hang``: the next ``/v1/models`` waits for ``release`` and ``/health`` fails from
    then on."""

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.asked = 0
        self.status = 200
        self.hang = False
        self.hung = 0
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            return web.Response(status=503 if self.hung else 200)

        async def models(request: web.Request) -> web.Response:
            self.asked += 1
            if self.hang:
                self.hung += 1
                await self.release.wait()
            if self.status != 200:
                return web.Response(status=self.status)
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


@contextlib.asynccontextmanager
async def _ready(tmp_path, engine: Engine
                 ) -> AsyncIterator[tuple[VirtualTime, runners.Runner]]:
    """A runner of ``engine`` on virtual time, probing every 5 s, once it is ready;
    stopped at the end."""
    vt = VirtualTime()
    async with served(engine.app()) as url, aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, url, [], timing=vt.time,
                    settings={"probe_interval_s": 5})
        r.start()
        try:
            await drive(vt, lambda: r.phase == Phase.READY, "ready")
            yield vt, r
        finally:
            await r.stop()


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
    engine = Engine(4096)
    async with _ready(tmp_path, engine) as (vt, r):
        assert r.max_model_len == 4096
        engine.length, asked = None, engine.asked
        ready_at = vt.now
        await drive(vt, lambda: vt.now - ready_at > 70, "a minute and more", within=100)
        assert engine.asked > asked, "read again"
        assert r.status(draining=False).max_model_len == 4096, "the last length kept"
        engine.length = 8192    # replaced behind the same URL
        await drive(vt, lambda: r.max_model_len == 8192, "the new length", within=20)
        assert r.status(draining=False).max_model_len == 8192


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_read_keeps_the_length_last_read(tmp_path, status: int) -> None:
    """Review finding: an external engine whose key rotated (its ``/health`` open, as
    vLLM's is) answers ``/v1/models`` 401 or 403; that wiped the length it had told."""
    engine = Engine(4096)
    async with _ready(tmp_path, engine) as (vt, r):
        assert r.max_model_len == 4096
        engine.status, asked, ready_at = status, engine.asked, vt.now
        await drive(vt, lambda: vt.now - ready_at > 70, "a minute and more", within=100)
        assert engine.asked > asked, "read again"
        assert r.status(draining=False).max_model_len == 4096, "the last length kept"


async def test_a_read_that_hangs_does_not_hold_the_probes(tmp_path) -> None:
    """Review finding: the runner awaited its context read between two probes, so while
    ``/v1/models`` took its whole timeout every probe waited that long, and an engine
    gone unhealthy meanwhile was noticed that much later. Here the read hangs for longer
    than the test may wait: the probes go on, the engine is found unhealthy, the length
    last read stands, and stopping the runner ends the read (nothing it tells later is
    taken)."""
    vt, engine, changes = VirtualTime(), Engine(4096), []
    async with served(engine.app()) as url, aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, url, changes, timing=vt.time,
                    settings={"probe_interval_s": 5, "probe_timeout_s": 600})
        r.start()
        try:
            await drive(vt, lambda: r.phase == Phase.READY, "ready")
            engine.hang = True      # the next read hangs; /health fails from then on
            await drive(vt, lambda: r.phase == Phase.UNHEALTHY, "unhealthy", within=100)
            assert engine.hung, "the read hung while the probes went on"
            assert r.max_model_len == 4096
        finally:
            await r.stop()
        engine.length = 8192    # what the read would tell, were it still waiting
        engine.release.set()
        await asyncio.sleep(0.2)
        assert r.max_model_len != 8192, "the read went on after the runner stopped"
