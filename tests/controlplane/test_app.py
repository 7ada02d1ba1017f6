"""The small routes: models, health, readiness, metrics, stats, OpenAPI, unknown routes."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from aiohttp import web

from controlplane.api import app as app_mod
from tests.controlplane import cp_testing as t


async def get(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def test_models_list_canonical_names_and_aliases_for_the_tenant() -> None:
    s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]}, {"name": "secret"}],
                   auth={"tenants": [{"name": "a", "keys": [t.KEY_A],
                                      "allowed_models": ["llama"]},
                                     {"name": "b", "keys": [t.KEY_B]}]},
                   upstreams=[t.upstream("x", "http://127.0.0.1:9", ["served-only"])])
    async with t.running(s) as cp:
        a = cp.client(t.KEY_A)
        assert sorted(m.id for m in (await a.models.list()).data) == ["llama", t.MODEL]
        b = cp.client(t.KEY_B)
        assert sorted(m.id for m in (await b.models.list()).data) == \
            sorted(["llama", t.MODEL, "secret", "served-only"])
        with pytest.raises(openai.AuthenticationError):
            await cp.client("nope").models.list()
        await a.close()
        await b.close()


async def test_health_ready_metrics_stats_and_openapi() -> None:
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings()) as cp:
            status, _, _ = await get(f"{cp.url}/health")
            assert status == 200
            status, _, body = await get(f"{cp.url}/ready")     # test_readiness: the rest
            assert status == 503 and b"registry syncing" in body
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            for _ in range(200):             # ready once the upstream was probed
                if (await get(f"{cp.url}/ready"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await get(f"{cp.url}/ready"))[0] == 200
            client = cp.client()
            await client.chat.completions.create(model="llama",
                                                 messages=[{"role": "user", "content": "x"}])
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope",
                                                     messages=[{"role": "user", "content": "x"}])
            await client.close()
            _, headers, body = await get(f"{cp.url}/metrics", t.ADMIN)
            text = body.decode()
            for name in ("synapse_requests_total", "synapse_request_duration_seconds",
                         "synapse_time_to_first_byte_seconds", "synapse_upstream_retries_total",
                         "synapse_route_decisions_total", "synapse_backends"):
                assert name in text
            assert (f'synapse_requests_total{{model="{t.MODEL}",route="/v1/chat/completions",'
                    'status="200",tenant="a"} 1.0') in text
            # unknown names are not labels
            assert 'model="unknown",route="/v1/chat/completions",status="404"' in text
            assert 'synapse_backends{state="ready"} 1.0' in text

            assert (await get(f"{cp.url}/api/v1/stats"))[0] == 401
            assert (await get(f"{cp.url}/api/v1/stats", t.KEY_A))[0] == 403
            status, _, body = await get(f"{cp.url}/api/v1/stats", t.ADMIN)
            stats = json.loads(body)
            assert status == 200 and stats["requests_total"] == 2
            assert stats["cache_hit_rate"] == 0.0
            assert stats["per_model"][t.MODEL]["requests"] == 1
            assert stats["per_backend"]["static/one"]["p50_ms"] > 0

            status, _, body = await get(f"{cp.url}/openapi.json")
            spec = json.loads(body)
            assert status == 200 and spec["openapi"].startswith("3.")
            assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                    "/health", "/ready", "/metrics", "/api/v1/stats"} <= set(spec["paths"])
            # served without a key: it names no model (some are other tenants' only)
            assert t.MODEL not in body.decode() and "llama" not in body.decode()

            status, headers, body = await get(f"{cp.url}/v2/nothing")
            assert status == 404 and json.loads(body)["error"]["code"] == "unknown_route"
            assert headers["x-request-id"]


async def _chat_as_both_tenants(cp: t.RunningCP) -> None:
    for _ in range(200):                 # ready once the upstream was probed
        if (await get(f"{cp.url}/ready"))[0] == 200:
            break
        await asyncio.sleep(0.05)
    for key in (t.KEY_A, t.KEY_B):
        client = cp.client(key)
        await client.chat.completions.create(model="llama",
                                             messages=[{"role": "user", "content": "x"}])
        await client.close()


async def test_a_tenant_key_cannot_read_the_metrics_of_the_api_port() -> None:
    async with t.backends(("one", "ok")) as (b,), \
            t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
        await _chat_as_both_tenants(cp)
        for key, status in ((None, 401), ("sk-not-a-key", 401), (t.KEY_A, 403),
                            (t.KEY_B, 403)):
            got, _, body = await get(f"{cp.url}/metrics", key)
            assert got == status, (key, got, body[:200])
            assert b'tenant="' not in body and b"metrics.port" in body
            assert json.loads(body)["error"]["type"] in ("authentication_error",
                                                         "permission_error")
        status, _, body = await get(f"{cp.url}/metrics", t.ADMIN)
        assert status == 200 and b'tenant="a"' in body and b'tenant="b"' in body
        spec = json.loads((await get(f"{cp.url}/openapi.json"))[2])
        assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


async def test_metrics_on_a_port_of_their_own_leave_the_api_port() -> None:
    async with t.backends(("one", "ok")) as (b,), t.running(t.settings(
            upstreams=[t.upstream("one", b.url)], metrics={"port": 0})) as cp:
        await _chat_as_both_tenants(cp)
        for key in (None, t.KEY_A, t.ADMIN):
            assert (await get(f"{cp.url}/metrics", key))[0] == 404
        spec = json.loads((await get(f"{cp.url}/openapi.json"))[2])
        assert "/metrics" not in spec["paths"]
        runner = web.AppRunner(app_mod.create_metrics_app(cp.services))
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
            status, _, body = await get(url)     # the scraper's port: no key needed
            assert status == 200 and b'tenant="a"' in body and b'tenant="b"' in body
        finally:
            await runner.cleanup()


async def test_without_tenant_keys_the_metrics_of_the_api_port_are_open() -> None:
    async with t.running(t.settings(auth={"enabled": False})) as cp:
        status, _, body = await get(f"{cp.url}/metrics")
        assert status == 200 and b"synapse_requests_total" in body


async def test_wrong_method_is_405_with_allow_and_the_envelope() -> None:
    async with t.running(t.settings()) as cp:
        async with aiohttp.ClientSession() as s:
            async with s.delete(f"{cp.url}/v1/models") as resp:
                assert resp.status == 405
                assert "GET" in resp.headers["Allow"]
                assert (await resp.json())["error"]["code"] == "method_not_allowed"
