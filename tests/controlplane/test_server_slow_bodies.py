"""Clients that send a whole request head and then trickle its body cannot hold every
connection slot (controlplane.api.server, controlplane.api.fast_lane): over
``http.max_connections`` the body arriving slowest is closed (never an upload at a usable
rate), one tenant may wait for at most its share of bodies (429
``too_many_pending_bodies``), a body the server itself holds back (its handler not
reading it yet) or one in flight is not taken for a slow one, and a tenant with a rate
limit takes its token at the head on the lane, as on aiohttp's path."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from controlplane import config
from controlplane.adapters import http1
from controlplane.api import fast_lane
from controlplane.api import server as server_mod
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane import test_fast_lane as lane

CAP = 16
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def head(key: str, length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % length)


async def trickling(port: int, key: str, n: int) -> list[Conn]:
    """``n`` connections, each a complete head and the first byte of its body."""
    held = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(key, 60_000) + b"{")
        await writer.drain()
        held.append((reader, writer))
    return held


def close(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()


@contextlib.asynccontextmanager
async def uploading(port: int, key: str) -> AsyncIterator[Conn]:
    """A request whose body (most of a MiB) goes out in steady pieces, far above the
    rate floor, until the block ends; then the rest of it."""
    body = json.dumps({"model": t.MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": "x" * 900_000}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(key, len(body)))
    sent = 0

    async def upload() -> None:
        nonlocal sent
        while sent < len(body) - 64 * 1024:
            writer.write(body[sent:sent + 16 * 1024])
            sent += 16 * 1024
            await writer.drain()
            await asyncio.sleep(0.01)
    task = asyncio.create_task(upload())
    try:
        yield reader, writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    writer.write(body[sent:])


@pytest.mark.parametrize("fast_lane_on", [True, False])
async def test_a_tenant_trickling_bodies_on_every_slot_does_not_lock_another_out(
        fast_lane_on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Complete heads whose bodies come a byte at a time are neither idle nor stalled
    heads: over the cap, the one whose body arrives slowest is closed for the newcomer;
    an upload in steady pieces on the same server is not. (One tenant may hold every
    slot here: it is the eviction alone that lets the other in.)"""
    monkeypatch.setattr(server_mod, "STALLED_HEAD_S", 0.3)
    monkeypatch.setattr(fast_lane, "TENANT_BODIES_SHARE", 1.0)
    async with t.backends(("b1", "ok")) as (b1,), lane.serving(t.round_robin(b1, http={
            "max_connections": CAP, "fast_lane": fast_lane_on,
            "max_body_bytes": 1024 * 1024})) as (port, server):
        async with uploading(port, t.KEY_A) as (up_reader, _):
            held = await trickling(port, t.KEY_A, CAP - 1)
            await harness.until(lambda: len(server.connections) == CAP, 10, "the cap")
            await asyncio.sleep(0.4)    # each body asked for longer than STALLED_HEAD_S
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(lane.chat(key=t.KEY_B))
            assert (await asyncio.wait_for(lane.answer(reader), 10))[0] == 200
            # the body that came slowest (a byte in the longest time) made room
            assert await asyncio.wait_for(held[0][0].read(), 5) == b""
        assert (await asyncio.wait_for(lane.answer(up_reader), 10))[0] == 200
        close([*held, (reader, writer)])


async def test_one_tenant_waits_for_at_most_its_share_of_bodies() -> None:
    """Half the cap: the next head of that tenant with a body to come is a 429 in the
    OpenAI envelope, closed after; another tenant's goes on; the count is gone with the
    connections."""
    async with t.backends(("b1", "ok")) as (b1,), lane.serving(t.round_robin(b1, http={
            "max_connections": CAP})) as (port, server):
        assert server.lane is not None
        pending = server.lane.bodies_pending
        held = await trickling(port, t.KEY_A, CAP // 2)
        await harness.until(lambda: pending == {"a": CAP // 2}, 10, "A's bodies counted")
        [(reader, writer)] = await trickling(port, t.KEY_A, 1)
        status, headers, body = await asyncio.wait_for(lane.answer(reader), 10)
        error = json.loads(body)["error"]
        assert status == 429 and error["code"] == "too_many_pending_bodies"
        assert error["type"] == "rate_limit_error" and "retry-after" in headers
        assert headers["connection"] == "close" and headers["x-request-id"]
        writer.close()
        request = lane.chat(key=t.KEY_B)
        other_reader, other = await asyncio.open_connection("127.0.0.1", port)
        other.write(request[:-10])
        await harness.until(lambda: pending.get("b") == 1, 10, "B's body counted")
        other.write(request[-10:])
        assert (await asyncio.wait_for(lane.answer(other_reader), 10))[0] == 200
        assert pending == {"a": CAP // 2}
        close([*held, (other_reader, other)])
        await harness.until(lambda: not pending, 10, "the counts gone at zero")


async def test_with_tenant_keys_off_no_share_of_bodies_is_kept() -> None:
    """``auth.enabled: false`` makes every client the one tenant ``anonymous``: a share of
    it would be a share of the whole deployment, so bodies are not counted per tenant."""
    async with t.backends(("b1", "ok")) as (b1,), lane.serving(t.round_robin(b1, http={
            "max_connections": CAP}, auth={"enabled": False})) as (port, server):
        assert server.lane is not None
        held = await trickling(port, "any", CAP // 2)
        request = lane.chat(key="any")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request[:-10])
        await asyncio.sleep(0.2)        # its head read, its body still to come
        writer.write(request[-10:])
        assert (await asyncio.wait_for(lane.answer(reader), 10))[0] == 200
        assert server.lane.bodies_pending == {}
        close([*held, (reader, writer)])


async def test_a_limited_tenant_takes_its_token_at_the_head_on_the_lane() -> None:
    """As ``serving.acquire`` does on aiohttp's path: heads whose bodies are still to come
    each take a token, so the one past the burst is refused at its head, not held."""
    limited = {"tenants": [
        {"name": "a", "keys": [t.KEY_A], "requests_per_second": 0.01, "burst": 2}]}
    async with t.backends(("b1", "ok")) as (b1,), \
            lane.serving(t.round_robin(b1, auth=limited)) as (port, _):
        request = lane.chat()
        first: list[Conn] = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request[:-10])
            first.append((reader, writer))
        third = await trickling(port, t.KEY_A, 1)
        status, _, body = await asyncio.wait_for(lane.answer(third[0][0]), 10)
        assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        for reader, writer in first:      # the two admitted at their heads are served
            writer.write(request[-10:])
            assert (await asyncio.wait_for(lane.answer(reader), 10))[0] == 200
        close([*first, *third])


@contextlib.asynccontextmanager
async def uploads_served(read_first: bool) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """aiohttp's server at ``CAP`` connections: ``POST /upload`` reads its body after a
    wait of its own (a fair-queue turn, a backend's pace), or reads it at once and then
    answers slowly; ``POST /hold`` reads its body and answers once the event is set."""
    released = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        if read_first:
            body = await request.read()
            await asyncio.sleep(1.0)
        else:
            await asyncio.sleep(1.0)
            body = await request.read()
        return web.Response(text=str(len(body)))

    async def hold(request: web.Request) -> web.Response:
        await request.read()
        await released.wait()
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/upload", upload)
    app.router.add_post("/hold", hold)
    runner = server_mod.Runner(app, config.HttpSettings(max_connections=CAP, fast_lane=False),
                               handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1], released
    finally:
        released.set()
        await runner.cleanup()


@pytest.mark.parametrize("read_first", [False, True])
async def test_an_upload_in_flight_is_answered_over_the_cap(
        read_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body sent at once, as fast as the socket takes it, to a handler that waits before
    reading it (aiohttp stops reading the socket once its buffer is full: the client
    cannot send, whatever the rate floor) or that reads it at once and answers slowly (its
    bytes arriving before the handler's task first runs are body, not a next head): over
    the cap it is neither a stalled head nor the slowest body; the newcomer is refused and
    the upload answered."""
    monkeypatch.setattr(server_mod, "connection_cap", lambda configured: configured)
    monkeypatch.setattr(server_mod, "STALLED_HEAD_S", 0.3)
    monkeypatch.setattr(http1, "HELD_MIN_RATE", 64 << 20)    # only a paused body is spared
    body = b"x" * (8 << 20)
    async with uploads_served(read_first) as (port, released):
        up_reader, up = await asyncio.open_connection("127.0.0.1", port)
        up.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                 % len(body) + body)
        held = []
        for _ in range(CAP - 1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            held.append((reader, writer))
        await asyncio.sleep(0.5)        # the upload asked for longer than STALLED_HEAD_S
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""     # nothing made room
        status, _, answer = await asyncio.wait_for(lane.answer(up_reader), 10)
        assert (status, answer) == (200, str(len(body)).encode())
        released.set()
        close([*held, (reader, writer), (up_reader, up)])
