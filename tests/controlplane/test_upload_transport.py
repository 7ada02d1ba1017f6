"""The upload transport refuses what no transport relays: a hostile backend's redirect
(aiohttp followed it, re-sending the tenant's audio to wherever it pointed), a 204 or
205, an encoded body (relayed undecoded, without its Content-Encoding)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from controlplane import errors
from controlplane.adapters import upload_client
from tests import http_standins


class Source:
    error: errors.SynapseError | None = None
    replayable = True

    async def chunks(self) -> AsyncIterator[bytes]:
        yield b"RIFF....WAVE"


@pytest.fixture
async def backend() -> AsyncIterator[tuple[str, list[str]]]:
    asked: list[str] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        asked.append(request.path)
        await request.read()
        kind = request.path.rsplit("/", 1)[-1]
        if kind == "redirect":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        if kind == "empty":
            return web.Response(status=204)
        if kind == "gzip":
            return web.Response(body=b"\x1f\x8b\x08\x00", headers={"Content-Encoding": "gzip"})
        return web.json_response({"text": "hi",
                                  "accept": request.headers.get("Accept-Encoding")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with http_standins.served(app) as url:
        yield url, asked


@pytest.mark.parametrize("kind", ["redirect", "empty", "gzip"])
async def test_an_answer_no_transport_relays_is_refused(
        backend: tuple[str, list[str]], kind: str) -> None:
    url, asked = backend
    async with upload_client.session() as client:
        transport = upload_client.UploadTransport(client, Source(), "audio/wav", 5.0)
        with pytest.raises(errors.UpstreamProtocolError, match=r"never relayed|encoded"):
            await transport.send("POST", f"{url}/v1/{kind}", b"", {}, 5.0)
    assert asked == [f"/v1/{kind}"]            # the redirect was not followed


async def test_a_plain_answer_passes_and_identity_is_asked_for(
        backend: tuple[str, list[str]]) -> None:
    url, _ = backend
    async with upload_client.session() as client:
        transport = upload_client.UploadTransport(client, Source(), "audio/wav", 5.0)
        resp = await transport.send("POST", f"{url}/v1/audio", b"", {}, 5.0)
        assert resp.status == 200
        body = await resp.read()
        resp.close()
    assert b'"accept": "identity"' in body
