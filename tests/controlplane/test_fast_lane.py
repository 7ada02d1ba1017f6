"""The fast lane (controlplane.api.fast_lane) on a real socket: what it serves itself, what
it hands to aiohttp mid-connection without losing a byte, pipelining, a client that goes
away, and the switch that turns it off."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web, web_protocol

from controlplane import config
from controlplane.adapters import http1
from controlplane.api import app as app_mod
from controlplane.api import lane_wire
from controlplane.api import server as server_mod
from controlplane.api import services as services_mod
from tests import harness
from tests.controlplane import cp_testing as t


@contextlib.asynccontextmanager
async def serving(s: config.ControlPlaneSettings,
                  ) -> AsyncIterator[tuple[int, server_mod.LaneServer]]:
    svc = services_mod.build(s)
    runner = server_mod.Runner(app_mod.create_app(s, services=svc), s.http,
                               handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = runner.server
    assert isinstance(server, server_mod.LaneServer)
    try:
        yield runner.addresses[0][1], server
    finally:
        await runner.cleanup()


def chat(stream: bool = False, content: str = "hi", extra: str = "", key: str = t.KEY_A,
         ) -> bytes:
    body = json.dumps({"model": t.MODEL, "stream": stream, "max_tokens": 4,
                       "messages": [{"role": "user", "content": content}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer " + key.encode() + extra.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


MODELS = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
          + t.KEY_A.encode() + b"\r\n\r\n")


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: status, headers (lower-case names), body (de-chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, body
        body += chunk[:-2]


def kinds(server: server_mod.LaneServer) -> list[str]:
    return sorted(type(c).__name__ for c in server.connections)


async def test_the_serving_routes_stay_in_the_lane_and_answer_as_aiohttp_would() -> None:
    async with t.backends(("b1", "ok")) as (b1,), serving(t.round_robin(b1)) as (port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for stream in (False, True, False):
            writer.write(chat(stream))
            status, headers, body = await answer(reader)
            assert status == 200 and headers["x-synapse-backend"] == "static/b1"
            assert headers["x-request-id"] and "date" in headers
            if stream:
                assert headers["content-type"] == "text/event-stream"
                assert body.rstrip().endswith(b"data: [DONE]")
            else:
                assert json.loads(body)["choices"][0]["message"]["content"] == "hello from b1"
        assert kinds(server) == ["Connection"]      # never handed to aiohttp
        writer.write(chat(key="sk-nope-0123456789"))   # errors: the envelope
        status, _, body = await answer(reader)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        writer.close()


async def test_another_route_hands_the_connection_to_aiohttp_without_losing_a_byte() -> None:
    async with t.backends(("b1", "ok")) as (b1,), serving(t.round_robin(b1)) as (port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat())
        assert (await answer(reader))[0] == 200
        # the next request, pipelined with a chat request behind it, is not the lane's
        writer.write(MODELS + chat(content="after the hand-off"))
        status, _, body = await answer(reader)
        assert status == 200 and t.MODEL in {m["id"] for m in json.loads(body)["data"]}
        status, _, body = await answer(reader)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        assert json.loads(b1.bodies[-1])["messages"][0]["content"] == "after the hand-off"
        assert kinds(server) == ["_Protocol"]
        writer.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with t.backends(("b1", "ok")) as (b1,), serving(t.round_robin(b1)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(chat(content=f"q{i}") for i in range(5)))
        ids = []
        for _ in range(5):
            status, headers, _ = await answer(reader)
            assert status == 200
            ids.append(headers["x-request-id"])
        assert len(set(ids)) == 5
        assert [json.loads(b)["messages"][0]["content"] for b in b1.bodies] == [
            f"q{i}" for i in range(5)]
        writer.close()


async def test_a_body_arriving_in_pieces_and_a_chunked_body_are_both_served() -> None:
    async with t.backends(("b1", "ok")) as (b1,), serving(t.round_robin(b1)) as (port, server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        whole = chat(content="x" * 5000)
        for i in range(0, len(whole), 700):
            writer.write(whole[i:i + 700])
            await writer.drain()
            await asyncio.sleep(0.01)
        assert (await answer(reader))[0] == 200
        assert kinds(server) == ["Connection"]
        body = json.dumps({"model": t.MODEL, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "chunked"}]}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + t.KEY_A.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert (await answer(reader))[0] == 200      # aiohttp's, from here on
        assert json.loads(b1.bodies[-1])["messages"][0]["content"] == "chunked"
        writer.close()


async def test_an_unparseable_or_oversized_request_gets_aiohttps_envelope() -> None:
    s = t.settings(upstreams=[], http={"max_header_bytes": 1024})
    async with serving(s) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat(extra="\r\nX-Big: " + "a" * 3000))
        status, _, body = await answer(reader)
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_http"
        assert b"aaaa" not in body
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + t.KEY_A.encode() + b"\r\nContent-Length: 999999\r\n\r\n")
        status, _, body = await answer(reader)
        assert status == 413
        writer.close()


async def test_a_client_that_goes_away_cancels_its_request_upstream() -> None:
    async with t.backends(("b1", "hang")) as (b1,), serving(t.round_robin(b1)) as (port, _):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat())
        for _ in range(100):
            if b1.bodies:
                break
            await asyncio.sleep(0.02)
        writer.close()
        for _ in range(100):
            if b1.cancelled:
                break
            await asyncio.sleep(0.02)
        assert b1.cancelled == 1


async def test_connection_close_is_honoured() -> None:
    async with t.backends(("b1", "ok")) as (b1,), serving(t.round_robin(b1)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat(extra="\r\nConnection: close"))
        status, headers, _ = await answer(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_off_aiohttp_serves_every_connection() -> None:
    async with t.backends(("b1", "ok")) as (b1,), \
            serving(t.round_robin(b1, http={"fast_lane": False})) as (port, server):
        assert server.lane is None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat())
        assert (await answer(reader))[0] == 200
        assert all(isinstance(c, web_protocol.RequestHandler) for c in server.connections)
        writer.close()


def test_a_whole_answer_is_written_as_aiohttp_would_or_left_to_it() -> None:
    resp = web.json_response({"a": 1}, headers={"x-one": "1"})
    raw = lane_wire.serialized(resp, keep_alive=False)
    assert raw is not None
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK" and body == b'{"a": 1}'
    assert {"x-one: 1", "Content-Length: 8", "Connection: close"} <= set(lines)
    assert "Content-Type: application/json; charset=utf-8" in lines
    bad: Any = web.Response(body=b"x", headers={"x-bad": "a\r\nInjected: 1"})
    assert lane_wire.serialized(bad, keep_alive=True) is None    # aiohttp refuses it
    streamed = web.StreamResponse()
    assert lane_wire.serialized(streamed, keep_alive=True) is None


async def test_shutdown_lets_the_request_in_flight_finish_and_closes_idle_connections() -> None:
    async with t.backends(("b1", "slow")) as (b1,):
        s = t.round_robin(b1)
        svc = services_mod.build(s)
        runner = server_mod.Runner(app_mod.create_app(s, services=svc), s.http,
                                   handler_cancellation=True, access_log=None,
                                   shutdown_timeout=20)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat(stream=True))
        await reader.readuntil(b"\r\n\r\n")         # the stream has begun
        stopping = asyncio.create_task(runner.cleanup())
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        rest = await asyncio.wait_for(reader.read(), 20)
        assert b"data: [DONE]" in rest
        await stopping
        writer.close()
        idle_writer.close()


async def test_over_max_connections_the_longest_idle_is_closed_or_the_new_one_refused() -> None:
    async with t.backends(("b1", "hang")) as (b1,), \
            serving(t.round_robin(b1, http={"max_connections": 16})) as (port, server):
        assert server.max_connections == 16
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
        await harness.until(lambda: len(server.connections) == 16, 10, "16 connections")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # the first opened, idle longest, made room
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        for _, w in idle[1:]:
            w.write(chat())           # every connection busy (the backend never answers)
        writer.write(chat())
        await harness.until(lambda: len(b1.bodies) == 16, 10, "16 requests in flight")
        refused_reader, _ = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(refused_reader.read(), 5) == b""   # none idle
        for _, w in [*idle, (reader, writer)]:
            w.close()


async def test_the_apps_response_hooks_still_run_on_lane_answers() -> None:
    async with t.backends(("b1", "ok")) as (b1,):
        s = t.round_robin(b1)
        app = app_mod.create_app(s, services=services_mod.build(s))

        async def stamp(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["x-stamped"] = "yes"
        app.on_response_prepare.append(stamp)
        runner = server_mod.Runner(app, s.http, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1",
                                                           runner.addresses[0][1])
            for stream in (False, True):
                writer.write(chat(stream))
                status, headers, _ = await answer(reader)
                assert status == 200 and headers["x-stamped"] == "yes"
            writer.close()
        finally:
            await runner.cleanup()


async def test_a_body_that_does_not_arrive_in_time_is_a_408_the_app_answers() -> None:
    """The app's middleware answers it, as on aiohttp's path: a request id the client can
    quote, and the request counted under its route."""
    await _late_body_is_a_408(t.settings(upstreams=[], http={"body_timeout_s": 1.0}))


async def test_a_late_body_is_a_408_when_the_handler_awaits_it_from_the_head(
        redis_server: harness.RedisServer) -> None:
    """A tenant whose limits are in Redis: the request goes to the handler at its head,
    which awaits the body; the same 408, closed after, counted."""
    await _late_body_is_a_408(t.settings(
        upstreams=[], http={"body_timeout_s": 1.0},
        redis={"url": redis_server.url, "timeout_s": 1.0},
        auth={"tenants": [{"name": "a", "keys": [t.KEY_A], "max_concurrent": 4}]}))


async def _late_body_is_a_408(s: config.ControlPlaneSettings) -> None:
    async with serving(s) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(chat()[:-5])       # the body's last bytes never come
        status, headers, body = await answer(reader)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close" and headers["date"].endswith(" GMT")
        assert headers["x-request-id"]
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + t.ADMIN.encode() + b"\r\n\r\n")
        status, _, metrics = await answer(reader)
        writer.close()
    assert status == 200
    assert any(line.startswith("synapse_requests_total{") and 'status="408"' in line
               and 'route="/v1/chat/completions"' in line and line.endswith(" 1.0")
               for line in metrics.decode().splitlines())


async def test_what_a_request_sets_in_its_context_ends_with_it() -> None:
    """Each request starts from the connection's context, not the last request's: the
    tenant a pipelined request's answers are charged to (``http1.charge``) is not the one
    before it's, on the lane or after a hand-off to aiohttp."""
    seen: list[str] = []

    async def charged(request: web.Request) -> web.Response:
        seen.append(http1.TENANT.get())
        http1.charge(json.loads(await request.read())["messages"][0]["content"])
        return web.json_response({})

    async def probe(_request: web.Request) -> web.Response:
        seen.append(http1.TENANT.get())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", charged)
    app.router.add_get("/probe", probe)
    runner = server_mod.Runner(app, t.settings(upstreams=[]).http, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(chat(content="a") + chat(content="b")
                     + b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(3):
            assert (await answer(reader))[0] == 200
        writer.close()
    finally:
        await runner.cleanup()
    assert seen == ["", "", ""]
