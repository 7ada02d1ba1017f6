"""An engine's ``/metrics`` read to a bound (the control plane's prober reads an upstream's
to the same one): an ``external`` engine is any server at a URL, and the agent read its
exposition whole, however long, and parsed it on the loop that reports the node."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import metrics
from agent import runner as runners
from agent.core import types
from synapse_common import read_limits
from tests.agent.supervisor_testing import supervisor_settings

LIMIT = read_limits.METRICS_MAX_BYTES
CHUNK = 1 << 20
ENDLESS_CHUNKS = 16 * LIMIT // CHUNK     # an endless body, bounded here: 16 limits' worth


def padded(size: int) -> bytes:
    """An engine's exposition of ``size`` bytes (three requests running; a comment line
    pads it)."""
    samples = b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3.0\n"
    return samples + b"#" + b"x" * (size - len(samples) - 2) + b"\n"


class Engine:
    """A stand-in external engine whose ``/metrics`` is ``body`` (with its Content-Length),
    or, ``endless``, 1 MiB chunks without one until the reader goes."""

    def __init__(self) -> None:
        self.body = padded(LIMIT)
        self.endless = False

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        if not self.endless:
            return web.Response(body=self.body, content_type="text/plain")
        resp = web.StreamResponse()     # no Content-Length: read to find its end
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"#" + b"x" * (CHUNK - 2) + b"\n"
        with contextlib.suppress(ConnectionError):
            for _ in range(ENDLESS_CHUNKS):
                await resp.write(chunk)
            await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def scraped(engine: Engine, tmp_path) -> AsyncIterator[tuple[runners.Runner, CollectorRegistry]]:
    app = web.Application()
    app.router.add_get("/metrics", engine.metrics)
    site = web.AppRunner(app)
    await site.setup()
    await web.TCPSite(site, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{site.addresses[0][1]}"
    spec = types.EngineSpec(name="x", engine="external", model="m", url=url)
    registry = CollectorRegistry()
    hooks = runners.Hooks(metrics.Metrics(registry), "n", lambda: None)
    try:
        async with aiohttp.ClientSession() as session:
            yield runners.Runner(spec, supervisor_settings(tmp_path, probe_timeout_s=30), session,
                                 hooks, "127.0.0.1"), registry
    finally:
        await site.cleanup()


@pytest.mark.parametrize("endless", [False, True], ids=["content-length", "endless"])
async def test_a_body_over_the_bound_is_a_failed_scrape_warned_once(
        endless: bool, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine()
    async with scraped(engine, tmp_path) as (r, registry):
        await r.scrape()                        # the bound itself is read
        assert r.metrics_ok and r.in_flight() == 3
        engine.body, engine.endless = padded(LIMIT + 1), endless
        with caplog.at_level(logging.WARNING, "agent.supervisor"):
            await r.scrape()
            await r.scrape()
        assert not r.metrics_ok and r.in_flight() is None
        assert registry.get_sample_value("synapse_agent_engine_scrape_errors_total",
                                         {"node": "n", "backend": "x"}) == 2
        warnings = [m for m in caplog.messages if "/metrics scrape failed" in m]
        assert warnings == [f"backend x: /metrics scrape failed: over {LIMIT} bytes"]
        engine.endless = False
        engine.body = padded(LIMIT)
        await r.scrape()                        # read again once it is within the bound
        assert r.metrics_ok
