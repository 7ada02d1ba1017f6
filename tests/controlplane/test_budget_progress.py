"""A large whole answer that holds the whole-answer budget is bounded by its progress,
not by its total time: a client that keeps reading, more slowly than the answer's size
over ``http.upstream_idle_timeout_s``, gets it whole (fast lane, aiohttp's path, the
relay), and so does the proxy from a backend that sends it steadily, more slowly than
its size over the read timeout. Those that stop are cut (``test_budget_holds``)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web

from controlplane.adapters import http1
from tests.controlplane import cp_testing as t
from tests.controlplane.test_budget_holds import (
    MIB,
    ROUTES,
    answer,
    budget,
    slow_client,
    upstream,
    whole,
)

SIZE = 6 * MIB
READ = 16 * 1024        # what the slow client reads at a time, then pauses
PAUSE_S = 0.01          # never silent long, but slower than SIZE per idle timeout


def length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


@pytest.mark.parametrize("route", list(ROUTES))
async def test_a_client_reading_steadily_but_slowly_gets_the_whole_answer(
        route: str) -> None:
    lane, path = ROUTES[route]
    with budget(8 * SIZE) as b:
        async with t.served(whole(t.MODEL, SIZE)) as up:
            s = t.settings(upstreams=[upstream("one", up, t.MODEL)],
                           http={"fast_lane": lane})
            idle = s.http.upstream_idle_timeout_s
            async with t.running(s) as cp:
                reader, writer, head = await slow_client(cp.url, path, {
                    "model": t.MODEL, "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert head.startswith(b"HTTP/1.1 200"), head
                want, got, start = length(head), 0, time.monotonic()
                try:
                    with contextlib.suppress(ConnectionError):
                        while got < want:
                            chunk = await reader.read(READ)
                            if not chunk:
                                break
                            got += len(chunk)
                            await asyncio.sleep(PAUSE_S)
                finally:
                    writer.close()
                took = time.monotonic() - start
        assert took > idle, "the read outlasted the idle timeout (else it proves nothing)"
        assert got == want, f"cut at {got} of {want} bytes after {took:.1f}s"
        assert b.held == 0


PIECE = 64 * 1024
PIECE_PAUSE_S = 0.03    # about 2 MiB/s: steady, but SIZE takes longer than the timeout


def steady(model: str, size: int) -> web.Application:
    """A whole answer sent with its length, a piece at a time, at a steady rate."""
    blob = answer(model, size)

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(blob)
        await resp.prepare(request)
        for at in range(0, len(blob), PIECE):
            await resp.write(blob[at:at + PIECE])
            await asyncio.sleep(PIECE_PAUSE_S)
        await resp.write_eof()
        return resp
    return t.hosted_api(chat, model)


async def test_a_backend_sending_a_large_answer_steadily_but_slowly_is_read_whole(
        ) -> None:
    with budget(8 * SIZE) as b:
        async with t.served(steady(t.MODEL, SIZE)) as up:
            s = t.settings(upstreams=[upstream("one", up, t.MODEL)])
            timeout = max(s.http.upstream_first_byte_timeout_s,
                          s.http.upstream_idle_timeout_s)
            assert SIZE > http1.HELD_MIN_RATE * timeout * 4, "the floor is far below"
            async with t.running(s) as cp, aiohttp.ClientSession() as http:
                start = time.monotonic()
                async with http.post(cp.url + "/v1/chat/completions", json={
                        "model": t.MODEL, "messages": [{"role": "user", "content": "a"}]},
                        headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                    status, body = r.status, await r.read()
                took = time.monotonic() - start
        assert status == 200, body[:300]
        assert took > timeout, "the answer outlasted the read timeout (else it proves nothing)"
        assert body == answer(t.MODEL, SIZE), "the answer, whole"
        assert b.held == 0
