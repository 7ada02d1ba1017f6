"""The control plane's per-tenant tables as ``synapse controlplane`` builds them: one
tenant flooding the in-process L1 (through the HTTP API), the router's sessions or the
Responses pins cannot push another tenant's entries out (nor count the others' writes by
watching its own go), and each tenant's share is the table's total over the configured
tenants (the two of ``cp_testing``: a half each).

The L1 is built by ``cache_wiring.build_l1`` with the configured tenants' count, in front
of the engine simulator. (A repeat within a few seconds of its miss can be answered by the
coalescer's landed copy instead of the L1, so what the L1 holds of the flooding tenant is
counted rather than asked for.)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry

from controlplane import cache_wiring, metrics
from controlplane.adapters import hf_tokenizer
from controlplane.api import services as services_mod
from controlplane.core import catalog, response_cache, response_pins, router
from simulator import app as sim_app
from simulator import config as sim_config
from synapse_common import engines
from tests.controlplane import cp_testing as t

ENTRIES = 8          # cache.l1_max_entries: 4 for each of the two tenants


@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[str]:
    app = sim_app.build(sim_config.SimulatorSettings(model=t.MODEL, time_scale=0))
    async with t.served(app) as url:
        yield url


async def test_a_flood_from_one_tenant_leaves_anothers_cached_answer_a_hit(tmp_path) -> None:
    async with simulator() as url:
        s = t.settings(upstreams=[t.upstream("sim", url)], data_dir=str(tmp_path),
                       cache={"l1_max_entries": ENTRIES, "semantic_enabled": False})
        cat = catalog.Catalog(catalog.ModelEntry(m.name, tuple(m.aliases)) for m in s.models)
        tenants = services_mod.tenant_count(services_mod.build_tenants(
            s.auth, cat, services_mod._tenant_settings(s.auth)))
        cache = response_cache.TieredCache(
            options=response_cache.Options(semantic_enabled=False),
            l1=cache_wiring.build_l1(s, tenants=tenants),
            metrics=metrics.Metrics(CollectorRegistry()))
        async with t.running(s, cache) as cp, cp.client(t.KEY_A) as a, \
                cp.client(t.KEY_B) as b:

            async def ask(client, text: str) -> str:
                raw = await client.chat.completions.with_raw_response.create(
                    model="llama", temperature=0, max_tokens=8,
                    messages=[{"role": "user", "content": text}])
                await cache.drain()                 # its store lands before the next ask
                return str(raw.headers["x-synapse-cache"])

            assert await ask(b, "What is a GPU?") == "miss"
            assert await ask(b, "What is a GPU?") == "hit-exact"     # from the L1 itself
            flood = [f"Question number {i}?" for i in range(3 * ENTRIES)]
            assert [await ask(a, q) for q in flood] == ["miss"] * len(flood)
            assert await ask(b, "What is a GPU?") == "hit-exact"
            # a's writes pushed out only its own oldest answers, past its share
            assert len(cache.l1) == 1 + ENTRIES // 2     # type: ignore[arg-type]
        await cache.close()


def test_the_services_split_sessions_and_pins_between_the_configured_tenants() -> None:
    svc = services_mod.build(t.settings())
    pins, sessions = svc.response_pins, svc.router.sessions
    assert pins is not None
    pins.remember("b", "resp_b", "n1/b")
    svc.router.remember_session(router.session_key("b", "u"), "n1/b")
    for i in range(router.SESSION_MEMORY // 2 + 1):         # a's share, and one more
        svc.router.remember_session(router.session_key("a", f"u{i}"), "n1/a")
    for i in range(response_pins.LIMIT // 2 + 1):
        pins.remember("a", f"resp_{i}", "n1/a")
    assert sessions.peek("b", router.session_key("b", "u")) == "n1/b"
    assert sessions.peek("a", router.session_key("a", "u0")) is None
    assert len(sessions) == router.SESSION_MEMORY // 2 + 1
    assert pins.backend_of("b", "resp_b") == "n1/b"
    assert pins.backend_of("a", "resp_0") is None and pins.backend_of("a", "resp_1") == "n1/a"
    assert len(pins) == response_pins.LIMIT // 2 + 1


def test_the_services_give_each_tenant_its_share_of_a_model_tokenizers_memo() -> None:
    """A configured ``models[].tokenizer`` is loaded before the tenants are counted; the
    app factory then gives its memo of pieces the same split as every other table."""
    path = str(engines.find().require_model())
    services_mod.build(t.settings(models=[{"name": t.MODEL, "tokenizer": path}]))
    memo = hf_tokenizer.load(path)._memo
    assert memo.max_bytes == hf_tokenizer.MEMO_MAX_TOKENS // 2      # ids, of two tenants
    services_mod.build(t.settings(models=[{"name": t.MODEL, "tokenizer": path}],
                                  auth={"enabled": False}))
    assert hf_tokenizer.load(path)._memo.max_bytes == hf_tokenizer.MEMO_MAX_TOKENS
