"""What the whole-answer budget (``http1.BUDGET``) covers, and for how long: a backend
that trickles the end of a large answer holds it for about one window of the read
timeout (below ``http1.HELD_MIN_RATE``), and a large answer still being written to a
client that does not read holds it until the client goes away or
``http.upstream_idle_timeout_s`` passes without the client taking a piece of it, on the
fast lane and on aiohttp's path alike. The budget is scaled down so that a few MiB
spend it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.adapters import http1
from controlplane.api import proxy
from tests import harness
from tests.controlplane import cp_testing as t

MIB = 1 << 20
OTHER = "other-model"
WAIT_S = 15.0       # how long a test waits for what must happen (a failure otherwise)


@contextlib.contextmanager
def budget(limit: int, share: int | None = None) -> Iterator[http1.Budget]:
    """The budget scaled to ``limit`` (and one tenant's share to ``share``: by default
    the whole limit, so that one tenant can spend it)."""
    held, old = http1.BUDGET, (http1.BUDGET.limit, http1.BUDGET.share)
    held.limit, held.share = limit, limit if share is None else share
    try:
        yield held
    finally:
        held.limit, held.share = old


async def until(check: Callable[[], bool], what: str) -> None:
    await harness.until(check, WAIT_S, what)


def answer(model: str, size: int) -> bytes:
    return (b'{"id":"c","object":"chat.completion","model":"%s","choices":[{"index":0,'
            b'"finish_reason":"stop","message":{"role":"assistant","content":"'
            % model.encode() + b"y" * size + b'"}}],"usage":{"prompt_tokens":1,'
            b'"completion_tokens":1,"total_tokens":2}}')


def trickling() -> web.Application:
    """Most of a whole answer at once, then a byte at a time, each well within the
    idle timeout, never ending."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"x":"' + b"y" * (5 * MIB))
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(0.2)
                await resp.write(b"y")
        return resp
    return t.hosted_api(chat)


def whole(model: str, size: int) -> web.Application:
    blob = answer(model, size)

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=blob, content_type="application/json")
    return t.hosted_api(chat, model)


def upstream(name: str, url: str, model: str) -> dict[str, object]:
    return {"name": name, "url": f"{url}/v1", "kind": "openai", "models": [model],
            "api_key": "k"}


async def test_a_trickling_answer_gives_the_budget_back_within_the_read_timeout() -> None:
    with budget(6 * MIB) as b:
        async with t.served(trickling()) as bad, t.served(whole(OTHER, 2 * MIB)) as good:
            s = t.settings(upstreams=[upstream("bad", bad, t.MODEL),
                                      upstream("good", good, OTHER)],
                           models=[{"name": t.MODEL}, {"name": OTHER}])
            async with t.running(s) as cp, aiohttp.ClientSession() as http:
                async def ask(model: str, key: str) -> tuple[int, bytes]:
                    async with http.post(cp.url + "/v1/chat/completions", json={
                            "model": model, "messages": [{"role": "user", "content": "a"}]},
                            headers={"Authorization": f"Bearer {key}"}) as r:
                        return r.status, await r.read()

                hostile = asyncio.create_task(ask(t.MODEL, t.KEY_A))
                try:
                    await trickled(hostile, ask, b)
                finally:
                    hostile.cancel()
        assert b.held == 0


async def trickled(hostile: asyncio.Task[tuple[int, bytes]],
                   ask: Callable[[str, str], Awaitable[tuple[int, bytes]]],
                   b: http1.Budget) -> None:
    """While the hostile answer trickles, the budget is spent; the rate floor ends it."""
    # What the burst leaves in the buffer (under the pause mark) is reserved only at the
    # next pause, which a trickle never brings: how much that is depends on how the
    # socket reads split the burst.
    await until(lambda: b.held >= 5 * MIB - http1.HIGH_WATER,
                "the trickling answer holds budget")
    status, _ = await ask(OTHER, t.KEY_B)
    assert status == 503, "the budget is spent while the answer trickles"
    # Once it holds budget, each window of the read timeout must bring
    # HELD_MIN_RATE of it: the trickle fails, the budget comes back.
    await until(lambda: b.held == 0, "the budget came back")
    status, body = await ask(OTHER, t.KEY_B)
    assert status == 200, body[:300]
    served = body == answer(OTHER, 2 * MIB)
    assert served, "the other tenant's answer, whole"
    status, body = await hostile
    assert status == 502, body[:300]
    assert b"while holding memory for it" in body


SIZE = 16 * MIB


async def slow_client(url: str, path: str, body: dict[str, object]
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A client with a small receive window that reads an answer's head, then stops."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = json.dumps(body).encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), t.KEY_A.encode(), len(raw), raw))
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


ROUTES = {
    "chat, fast lane": (True, "/v1/chat/completions"),
    "chat, aiohttp": (False, "/v1/chat/completions"),
    "messages (relay)": (True, "/v1/messages"),
}


@contextlib.asynccontextmanager
async def unread(route: str) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                     asyncio.StreamWriter, http1.Budget]]:
    """A large whole answer on ``route``, its client not reading past the head."""
    lane, path = ROUTES[route]
    with budget(4 * SIZE) as b:
        async with t.served(whole(t.MODEL, SIZE)) as up:
            s = t.settings(upstreams=[upstream("one", up, t.MODEL)],
                           http={"fast_lane": lane})
            async with t.running(s) as cp:
                reader, writer, head = await slow_client(cp.url, path, {
                    "model": t.MODEL, "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert head.startswith(b"HTTP/1.1 200"), head
                try:
                    yield reader, writer, b
                finally:
                    writer.close()
        assert b.held == 0


@pytest.mark.parametrize("route", list(ROUTES))
async def test_an_answer_a_client_does_not_read_holds_the_budget_until_it_leaves(
        route: str) -> None:
    async with unread(route) as (_, writer, b):
        assert b.held >= SIZE, "the unwritten answer holds its size of the budget"
        writer.close()
        await until(lambda: b.held == 0, "the budget came back when the client left")


@pytest.mark.parametrize("route", list(ROUTES))
async def test_an_answer_a_client_does_not_read_is_cut_at_the_idle_timeout(
        route: str) -> None:
    async with unread(route) as (reader, _, b):
        assert b.held >= SIZE
        await until(lambda: b.held == 0, "the budget came back at the idle timeout")
        got = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(WAIT_S):
                while chunk := await reader.read(1 << 16):
                    got += len(chunk)
        assert got < SIZE, "the connection was cut, not the answer written whole"


async def test_a_tenant_whose_answer_is_unread_holds_its_share_and_no_other_s() -> None:
    """The client's copy of a large answer holds budget under its request's tenant: while
    tenant a's client does not read one, a's next answer of the same size is over a's
    share (503, ``upstream_busy``, ``Retry-After``) and tenant b's is served whole; when
    a's client leaves, a holds nothing and is forgotten."""
    with budget(4 * SIZE, share=SIZE + SIZE // 2) as b:
        async with t.served(whole(t.MODEL, SIZE)) as up:
            s = t.settings(upstreams=[upstream("one", up, t.MODEL)])
            async with t.running(s) as cp, aiohttp.ClientSession() as http:
                async def ask(key: str) -> tuple[int, str | None, bytes]:
                    async with http.post(cp.url + "/v1/chat/completions", json={
                            "model": t.MODEL, "messages": [{"role": "user", "content": "a"}]},
                            headers={"Authorization": f"Bearer {key}"}) as r:
                        return r.status, r.headers.get("Retry-After"), await r.read()

                _, writer, head = await slow_client(cp.url, "/v1/chat/completions", {
                    "model": t.MODEL, "messages": [{"role": "user", "content": "hi"}]})
                try:
                    assert head.startswith(b"HTTP/1.1 200"), head
                    assert b.tenants.get("a", 0) >= SIZE, "the unread answer is a's"
                    status, retry, body = await ask(t.KEY_A)
                    assert (status, retry) == (503, "1"), body[:300]
                    assert json.loads(body)["error"]["code"] == http1.BUDGET_SPENT
                    status, _, body = await ask(t.KEY_B)
                    assert status == 200, body[:300]
                    served = body == answer(t.MODEL, SIZE)
                    assert served, "the other tenant's answer, whole"
                finally:
                    writer.close()
                await until(lambda: "a" not in b.tenants, "a's share came back")
        assert (b.held, b.tenants) == (0, {})


def test_with_tenant_keys_off_each_request_has_its_own_share() -> None:
    """``auth.enabled: false``: every client is the tenant ``anonymous``, whose share
    would be the whole deployment's; each request's answers count as its own."""
    def ctx(enabled: bool) -> Any:
        svc = SimpleNamespace(tenants=SimpleNamespace(enabled=enabled))
        return SimpleNamespace(svc=svc, tenant="anonymous", request_id="req-1")

    assert proxy.budget_key(ctx(True)) == "anonymous"
    assert proxy.budget_key(ctx(False)) == "req-1"


def test_giving_back_what_a_tenant_does_not_hold_forgets_it_without_raising() -> None:
    """A give that does not match a take (a bug) must not raise in an answer's close,
    which would leak its pooled connection."""
    b = http1.Budget(10, 5)
    assert b.take(3, "a")
    b.give(3, "b")
    b.give(3, "a")
    assert b.tenants == {}
