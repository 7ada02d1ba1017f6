"""The HTTP server below the app (controlplane.api.server) on a real socket: the
``http.max_connections`` cap closes the connection idle longest whoever serves it, the
fast lane or aiohttp, so idle connections cannot lock new clients out."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.api import server as server_mod
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane import test_fast_lane as lane

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
CAP = 16


async def _held_idle(port: int, say_hello: bool,
                     ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``CAP`` connections, each idle after one keyless ``GET /health`` (a route the lane
    hands to aiohttp) when ``say_hello``, else after nothing at all."""
    held = []
    for _ in range(CAP):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if say_hello:
            writer.write(HEALTH)
            assert (await lane.answer(reader))[0] == 200
        held.append((reader, writer))
        await asyncio.sleep(0.01)   # each idle a little longer than the next
    return held


@pytest.mark.parametrize(("fast_lane", "say_hello"), [
    (True, True),       # idle connections aiohttp serves since their first request
    (False, False),     # no lane (as over TLS): every connection is aiohttp's
    (False, True),
])
async def test_a_new_client_gets_in_by_closing_the_connection_idle_longest(
        fast_lane: bool, say_hello: bool) -> None:
    s = t.settings(http={"max_connections": CAP, "fast_lane": fast_lane})
    async with lane.serving(s) as (port, server):
        held = await _held_idle(port, say_hello)
        await harness.until(lambda: len(server.connections) == CAP, 10, "the cap reached")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        assert (await asyncio.wait_for(lane.answer(reader), 5))[0] == 200
        # the first opened, idle longest, made room; the others are still served
        assert await asyncio.wait_for(held[0][0].read(), 5) == b""
        _, second = held[1]
        second.write(HEALTH)
        assert (await asyncio.wait_for(lane.answer(held[1][0]), 5))[0] == 200
        for _, w in [*held, (reader, writer)]:
            w.close()


async def test_a_connection_in_the_middle_of_a_request_head_is_not_idle() -> None:
    s = t.settings(http={"max_connections": CAP, "fast_lane": False})
    async with lane.serving(s) as (port, _):
        held = await _held_idle(port, say_hello=True)
        for _, w in held:
            w.write(b"GET /health HTTP/1.1\r\n")     # a head begun, not finished
        await asyncio.sleep(0.2)
        refused, _ = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(refused.read(), 5) == b""     # none idle to close
        for reader, w in held:
            w.write(b"Host: x\r\n\r\n")
            assert (await asyncio.wait_for(lane.answer(reader), 5))[0] == 200
            w.close()


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_new_client_gets_in_by_closing_the_head_stalled_longest(
        fast_lane: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client holding every slot with heads it never finishes (each closed only after
    ``http.header_timeout_s``) must not lock the others out."""
    monkeypatch.setattr(server_mod, "STALLED_HEAD_S", 0.3)
    s = t.settings(http={"max_connections": CAP, "fast_lane": fast_lane})
    async with lane.serving(s) as (port, server):
        held = []
        for _ in range(CAP):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\n")     # a head begun, not finished
            held.append((reader, writer))
            await asyncio.sleep(0.01)
        await harness.until(lambda: len(server.connections) == CAP, 10, "the cap reached")
        await asyncio.sleep(0.4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        assert (await asyncio.wait_for(lane.answer(reader), 5))[0] == 200
        assert await asyncio.wait_for(held[0][0].read(), 5) == b""     # the slowest head
        second_reader, second = held[1]
        second.write(b"Host: x\r\n\r\n")
        assert (await asyncio.wait_for(lane.answer(second_reader), 5))[0] == 200
        for _, w in [*held, (reader, writer)]:
            w.close()
