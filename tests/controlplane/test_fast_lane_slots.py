"""A tenant's concurrency slot in the shared (Redis) store, taken at a request's head on
the fast lane, is given back however the request ends: its client gone after the head,
or while the store was still deciding, its body late (408) or invalid (400). And a head
the store refuses is never invited to send its body (``Expect: 100-continue``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane import config
from controlplane.adapters import redis_limits
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane.test_fast_lane import answer, serving

ACTIVE = "synapse:rl:a:active"       # tenant a's slots in flight (redis_limits' key)
BODY = json.dumps({"model": t.MODEL, "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def _settings(redis_url: str, body_timeout_s: float = 30, redis_timeout_s: float = 1.0,
              rate: dict[str, Any] | None = None) -> config.ControlPlaneSettings:
    """Tenant ``a`` allowed one request in flight, counted in Redis; no backend."""
    return t.settings(upstreams=[], http={"body_timeout_s": body_timeout_s},
                      redis={"url": redis_url, "timeout_s": redis_timeout_s},
                      auth={"tenants": [{"name": "a", "keys": [t.KEY_A], "max_concurrent": 1,
                                         **(rate or {})},
                                        {"name": "b", "keys": [t.KEY_B]}]})


def _head(length: int, *extra: str, key: str = t.KEY_A) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: x", f"Authorization: Bearer {key}",
             "Content-Type: application/json", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _slots(url: str) -> int:
    client = redis_limits.connect(url)
    try:
        return int(await client.zcard(ACTIVE))
    finally:
        await client.aclose()


async def _until_slots(url: str, n: int, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (have := await _slots(url)) != n:
        assert loop.time() < deadline, f"{what}: {have} slots held, not {n}"
        await asyncio.sleep(0.05)


async def _not_refused(port: int) -> None:
    """The tenant's next request is not refused for its concurrency (no backend: 503)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_head(len(BODY)) + BODY)
        status, _, body = await answer(reader)
        assert status != 429, body
    finally:
        writer.close()


class _SlowRedis:
    """A TCP proxy to Redis holding back each reply a while: the store's script has run
    (the slot is in Redis) while its caller still waits for the answer."""

    def __init__(self, port: int, delay_s: float) -> None:
        self._port, self._delay_s = port, delay_s
        self._pipes: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        try:
            yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        finally:
            server.close()
            for pipe in self._pipes:
                pipe.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self._port)
        pipes = [asyncio.ensure_future(self._pipe(cr, uw, 0.0)),
                 asyncio.ensure_future(self._pipe(ur, cw, self._delay_s))]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    delay_s: float) -> None:
        try:
            while data := await src.read(65536):
                await asyncio.sleep(delay_s)
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()


@pytest.mark.parametrize("with_body", [False, True])
async def test_a_client_gone_while_the_store_decides_leaves_no_slot(
        redis_server: harness.RedisServer, with_body: bool) -> None:
    """The client resets its connection after its head (or its whole request) while the
    store's answer is on its way: the slot the store added is released at once, and the
    tenant's next request is served (before, it stayed for its lease, about two minutes:
    with one slot, the tenant was refused all that time)."""
    async with _SlowRedis(redis_server.port, 0.5).running() as url:
        async with serving(_settings(url, redis_timeout_s=5.0)) as (port, _):
            sock = socket.create_connection(("127.0.0.1", port))
            try:
                sock.sendall(_head(len(BODY)) + (BODY if with_body else b""))
                await _until_slots(redis_server.url, 1, "the store's script ran")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()                # a reset: the handler is cancelled mid-acquire
            await _until_slots(redis_server.url, 0, "the abandoned slot released")
            await _not_refused(port)


async def test_a_client_gone_after_its_head_releases_its_slot(
        redis_server: harness.RedisServer) -> None:
    async with serving(_settings(redis_server.url)) as (port, _):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head(len(BODY)) + BODY[:10])
        await _until_slots(redis_server.url, 1, "the slot taken at the head")
        writer.close()
        await _until_slots(redis_server.url, 0, "the slot released")
        await _not_refused(port)


async def test_a_body_too_late_releases_its_slot(redis_server: harness.RedisServer) -> None:
    async with serving(_settings(redis_server.url, body_timeout_s=1.0)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head(len(BODY)) + BODY[:10])
        status, headers, _ = await answer(reader)
        writer.close()
        assert (status, headers.get("connection")) == (408, "close")
        await _until_slots(redis_server.url, 0, "the slot released")


async def test_an_invalid_body_after_its_head_releases_its_slot(
        redis_server: harness.RedisServer) -> None:
    """A 400 for a body that came after its head: the slot is free and the connection goes
    on to the tenant's next request, which is not refused."""
    async with serving(_settings(redis_server.url)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        bad = b"{" * 20
        writer.write(_head(len(bad)))
        await _until_slots(redis_server.url, 1, "the slot taken at the head")
        writer.write(bad)
        status, _, _ = await answer(reader)
        assert status == 400
        await _until_slots(redis_server.url, 0, "the slot released")
        writer.write(_head(len(BODY)) + BODY)
        status, _, body = await answer(reader)
        writer.close()
        assert status != 429, body


async def test_expect_refused_by_the_store_is_not_invited(
        redis_server: harness.RedisServer) -> None:
    """The tenant's one slot is held by another replica (this one has no trace of it): an
    ``Expect: 100-continue`` head gets its 429 and ``Connection: close``, never ``100
    Continue`` first (before, it was invited to send its body, then refused)."""
    client = redis_limits.connect(redis_server.url)
    await client.zadd(ACTIVE, {"another-replica": 4e9})
    await client.aclose()
    async with serving(_settings(redis_server.url)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head(60_000, "Expect: 100-continue"))     # the lane's
        status, headers, body = await answer(reader)
        assert (status, headers.get("connection")) == (429, "close"), body
        assert b"concurrent requests" in body
        assert await asyncio.wait_for(reader.read(), 10) == b""    # closed after it
        writer.close()


async def test_expect_admitted_by_the_store_is_invited_and_served(
        redis_server: harness.RedisServer) -> None:
    """The 100 comes once the store has granted the slot; the body then sent is served and
    the connection goes on; the slot is released."""
    async with serving(_settings(redis_server.url)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(_head(len(BODY), "Expect: 100-continue"))
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(BODY)
            status, _, body = await answer(reader)
            assert status == 503, body          # no backend: served to the end
        writer.close()
        await _until_slots(redis_server.url, 0, "the slot released")


async def test_a_refused_expect_is_closed_without_waiting_for_the_client() -> None:
    """429 with ``Connection: close`` to an ``Expect`` head, and a client that neither sends
    its body nor closes: the server closes its side after the answer (RFC 9112 §9.6), so
    the client reads its end at once, not after ``http.body_timeout_s``."""
    s = t.settings(upstreams=[], http={"body_timeout_s": 600}, auth={"tenants": [
        {"name": "a", "keys": [t.KEY_A], "requests_per_second": 0.01, "burst": 1}]})
    async with serving(s) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_head(len(BODY)) + BODY)          # spends the token
        await answer(reader)
        writer.write(_head(len(BODY), "Expect: 100-continue"))
        status, headers, _ = await answer(reader)
        assert (status, headers.get("connection")) == (429, "close")
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
