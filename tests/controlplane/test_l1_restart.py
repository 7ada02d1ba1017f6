"""A restarted control plane answers from its L1 journal from its first request (probe 95,
F6b): the journal was read back in the background from the first lookup on, so a request
in a restart's first moments missed an entry the journal held and, with no backend
registered yet, was a 503, the same request a hit seconds later.

The L1 is built by ``cache_wiring.build_l1``, as ``synapse controlplane`` builds it, in
front of the engine simulator; the restarted one has no backend that answers at all.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

import openai
from prometheus_client import CollectorRegistry

from controlplane import cache_wiring, metrics
from controlplane.core import response_cache
from simulator import app as sim_app
from simulator import config as sim_config
from tests import harness
from tests.controlplane import cp_testing as t

QUESTION = [{"role": "user", "content": "What is a GPU?"}]


@contextlib.asynccontextmanager
async def control_plane(data_dir: pathlib.Path, backend: str,
                        ) -> AsyncIterator[tuple[openai.AsyncOpenAI, response_cache.TieredCache]]:
    s = t.settings(upstreams=[t.upstream("sim", backend)], data_dir=str(data_dir),
                   cache={"semantic_enabled": False})
    cache = response_cache.TieredCache(
        options=response_cache.Options(semantic_enabled=False),
        l1=cache_wiring.build_l1(s, tenants=2), metrics=metrics.Metrics(CollectorRegistry()))
    try:
        async with t.running(s, cache) as cp:
            yield cp.client(), cache
    finally:
        await cache.close()         # as at a stop: the journal written to the end


async def ask(client: openai.AsyncOpenAI) -> tuple[str, str]:
    raw = await client.chat.completions.with_raw_response.create(
        model="llama", temperature=0, max_tokens=8, messages=QUESTION)
    return str(raw.headers["x-synapse-cache"]), str(raw.parse().choices[0].message.content)


async def test_the_first_request_after_a_restart_is_answered_from_the_journal(
        tmp_path: pathlib.Path) -> None:
    app = sim_app.build(sim_config.SimulatorSettings(model=t.MODEL, time_scale=0))
    async with t.served(app) as url, control_plane(tmp_path, url) as (client, cache):
        status, answer = await ask(client)
        assert status == "miss"
        await cache.drain()
    gone = f"http://127.0.0.1:{harness.free_port()}"       # nothing listens there
    async with control_plane(tmp_path, gone) as (client, _):
        assert await ask(client) == ("hit-exact", answer)
