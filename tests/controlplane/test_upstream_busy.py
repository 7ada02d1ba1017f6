"""A whole answer refused because this process's memory for whole answers is spent is
nobody's fault: the client gets 503 with ``Retry-After`` over HTTP, and no other backend
is asked to recompute an answer that would be refused alike."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from controlplane.adapters import http1
from tests.controlplane import cp_testing as t

MIB = 1 << 20


async def test_a_spent_budget_is_503_with_retry_after_and_one_backend_asked() -> None:
    asked: list[str] = []

    def app(name: str) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            asked.append(name)
            return web.Response(body=b'{"x":"' + b"y" * (2 * MIB) + b'"}',
                                content_type="application/json")
        return t.hosted_api(chat)

    budget = http1.BUDGET
    limit, budget.limit = budget.limit, MIB
    try:
        async with t.served(app("one")) as one, t.served(app("two")) as two:
            s = t.settings(upstreams=[t.hosted("one", one), t.hosted("two", two)])
            async with t.running(s) as cp, aiohttp.ClientSession() as session:
                async with session.post(cp.url + "/v1/chat/completions", json={
                        "model": t.MODEL, "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                    body = await r.json()
                    assert r.status == 503, body
                    assert r.headers.get("Retry-After") == "1"
                    assert body["error"]["code"] == "upstream_busy"
            assert len(asked) == 1, "no other backend was asked"
            assert budget.held == 0
    finally:
        budget.limit = limit
