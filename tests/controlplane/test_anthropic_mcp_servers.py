"""Anthropic's ``mcp_servers[].url`` gets the media-URL rule (controlplane.core.media_urls):
a backend that serves ``/v1/messages`` itself gets the body as sent, and one that honoured
the field would dial whatever URL a tenant put there. An internal URL is refused before
anything is routed, naming the field, in Anthropic's error shape; a public one passes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import typedefs, web

from controlplane import errors
from controlplane.core import media_urls
from simulator import app as sim_app
from simulator import config as sim_config
from tests.controlplane import cp_testing as t

INTERNAL = ["http://10.0.0.7:8080/sse", "http://192.168.1.1/mcp",
            "http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/",
            "http://[::ffff:127.0.0.1]/", "file:///etc/passwd", "gopher://example.com/"]
PUBLIC = "https://mcp.example.com/sse"


def ask(*servers: Any) -> dict[str, Any]:
    return {"model": "llama", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hi"}],
            "mcp_servers": [{"type": "url", "url": PUBLIC, "name": "docs"}, *servers]}


@pytest.mark.parametrize("url", INTERNAL)
def test_an_internal_mcp_server_url_is_refused_naming_the_field(url: str) -> None:
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_body(ask({"type": "url", "url": url, "name": "x"}), "public")
    assert err.value.param == "mcp_servers[1].url"
    assert err.value.code == "invalid_media_url"
    media_urls.check_body(ask({"type": "url", "url": url, "name": "x"}), "any")


def test_a_public_mcp_server_url_passes_and_inline_refuses_it() -> None:
    media_urls.check_body(ask(), "public")
    with pytest.raises(errors.BadRequest, match=r"http\.media_urls is inline"):
        media_urls.check_body(ask(), "inline")


@pytest.mark.parametrize(("servers", "param"), [
    ({"type": "url", "url": "http://10.0.0.7/"}, "mcp_servers"),
    ("http://10.0.0.7/", "mcp_servers"),
    (["http://10.0.0.7/"], "mcp_servers[0]"),
    ([{"type": "url", "name": "a"}, None], "mcp_servers[1]"),
])
@pytest.mark.parametrize("policy", media_urls.POLICIES)
def test_mcp_servers_not_a_list_of_objects_is_refused_naming_the_field(
        servers: Any, param: str, policy: media_urls.Policy) -> None:
    body = {"model": "llama", "max_tokens": 8, "messages": [], "mcp_servers": servers}
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_body(body, policy)
    assert err.value.param == param
    assert err.value.message.startswith(param + ":")


@contextlib.asynccontextmanager
async def native_engine() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """The simulator serving ``/v1/messages`` itself, with the bodies it was sent."""
    seen: list[dict[str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
        if request.path == "/v1/messages":
            seen.append(orjson.loads(await request.read()))
        return await handler(request)

    app = sim_app.build(sim_config.SimulatorSettings(model=t.MODEL, tasks=["messages"],
                                                     time_scale=0))
    app.middlewares.append(record)
    async with t.served(app) as url:
        yield url, seen


async def test_over_http_an_internal_mcp_server_never_reaches_the_engine() -> None:
    upstream = {"name": "sim", "url": "", "models": [t.MODEL], "tasks": ["messages"]}
    async with native_engine() as (url, seen), t.running(t.settings(
            upstreams=[{**upstream, "url": url}])) as cp, aiohttp.ClientSession() as http:
        key = {"x-api-key": t.KEY_A, "anthropic-version": "2023-06-01"}
        for servers, field in (
                ({"type": "url", "url": "http://169.254.169.254/", "name": "m"},
                 "mcp_servers[1].url"),
                ("not a server", "mcp_servers[1]")):
            async with http.post(f"{cp.url}/v1/messages", headers=key,
                                 json=ask(servers)) as r:
                body = await r.json()
            assert r.status == 400, body
            assert body["type"] == "error", body
            assert body["error"]["type"] == "invalid_request_error"
            assert body["error"]["message"].startswith(field + ":")
        async with http.post(f"{cp.url}/v1/messages/count_tokens", headers=key,
                             json=ask({"url": "http://10.0.0.7/"})) as r:
            body = await r.json()
        assert r.status == 400 and "mcp_servers[1].url" in body["error"]["message"], body
        assert seen == []
        async with http.post(f"{cp.url}/v1/messages", headers=key, json=ask()) as r:
            assert r.status == 200, await r.text()
        assert seen[-1]["mcp_servers"][0]["url"] == PUBLIC
