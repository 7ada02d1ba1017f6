"""An engine's tasks learnt from its ``/openapi.json``, read to a bound (the control
plane's prober reads an upstream's to the same one): an ``external`` engine is any server
at a URL, and the agent read its document whole and parsed it on the loop that reports
the node."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from agent import engine_tasks
from synapse_common import read_limits, tasks
from tests.http_standins import served

RERANKER = {"openapi": "3.1.0", "paths": {"/v1/rerank": {}, "/health": {}}}


def padded(size: int) -> bytes:
    """A reranker's document of ``size`` bytes (a long description pads it)."""
    bare = json.dumps({**RERANKER, "info": {"description": ""}}).encode()
    return json.dumps({**RERANKER, "info": {"description": "x" * (size - len(bare))}}
                      ).encode()


async def _document_server(body: bytes, chunked: bool) -> web.Application:
    async def document(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse()     # no Content-Length: read to find its end
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(body), 1 << 20):
            await resp.write(body[start:start + (1 << 20)])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/openapi.json", document)
    return app


async def discovered(body: bytes, chunked: bool) -> tuple[str, ...] | None:
    async with served(await _document_server(body, chunked)) as url, \
            aiohttp.ClientSession() as session:
        return await engine_tasks.discover(session, url, 30)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_document_within_the_bound_is_read(chunked: bool) -> None:
    body = padded(read_limits.OPENAPI_MAX_BYTES)
    assert len(body) == read_limits.OPENAPI_MAX_BYTES
    assert await discovered(body, chunked) == (tasks.RERANK,)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_document_over_the_bound_is_no_document(chunked: bool,
                                                        caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    assert await discovered(padded(read_limits.OPENAPI_MAX_BYTES + 1), chunked) == ()
    assert f"over {read_limits.OPENAPI_MAX_BYTES} bytes: read as no document" in caplog.text


def test_a_document_that_is_not_an_openapi_object_shows_no_tasks() -> None:
    assert tasks.from_document(json.dumps(RERANKER).encode()) == (tasks.RERANK,)
    for bad in (b"not json", b"[]", b'{"paths": []}', b"[" * 100_000):
        assert tasks.from_document(bad) == ()
