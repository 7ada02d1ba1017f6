"""``OPTIONS`` on a simulator with a key, as through the agent's guard in front of vLLM:
only a CORS preflight (``Origin`` and ``Access-Control-Request-Method``) passes without
the key; a bare ``OPTIONS`` is refused (behind the guard, vLLM's ``/metrics`` answered
one with the engine's metrics)."""

from __future__ import annotations

import aiohttp

from synapse_common import clock as clocks
from tests.simulator.conftest import ENGINE_KEY, in_process, keyed_settings

PREFLIGHT = {"Origin": "http://example.com", "Access-Control-Request-Method": "GET"}


async def _options(url: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.options(url, headers=headers) as r:
        return r.status


async def test_only_a_preflight_passes_without_the_key() -> None:
    async with in_process(keyed_settings(), clocks.Time()) as url:
        for path in ("/metrics", "/sim/state", "/v1/chat/completions"):
            for headers in ({}, {"Origin": "http://example.com"},
                            {"Authorization": "Bearer wrong-key"}):
                assert await _options(url + path, headers) == 401, (path, headers)
            assert await _options(url + path, PREFLIGHT) != 401, path
            assert await _options(url + path, {"Authorization": f"Bearer {ENGINE_KEY}"}) != 401
