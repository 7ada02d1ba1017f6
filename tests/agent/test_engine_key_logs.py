"""The engine key never reaches the agent's log: a failed read of an engine's
``/v1/models`` or ``/openapi.json`` is logged (at debug) by the error's class, never by
an aiohttp error's repr, which holds the request's headers and so the key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from agent import engine_context, engine_tasks
from synapse_common import engine_key

KEY = engine_key.derive("agent-token-for-the-engine-key-log-tests")
MALFORMED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nBad Header\x00: x\r\n\r\nhello"


async def _malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(MALFORMED)
    await writer.drain()
    writer.close()


@pytest.fixture
async def broken_engine() -> AsyncIterator[str]:
    """An engine that answers every request with a head aiohttp refuses."""
    server = await asyncio.start_server(_malformed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def _context(session: aiohttp.ClientSession, url: str) -> object:
    return await engine_context.ask(session, url, ["m"], 5, engine_key.headers(KEY))


async def _tasks(session: aiohttp.ClientSession, url: str) -> object:
    return await engine_tasks.discover(session, url, 5, engine_key.headers(KEY))


@pytest.mark.parametrize(("read", "unknown"), [(_context, None), (_tasks, None)],
                         ids=["v1-models", "openapi"])
async def test_a_failed_read_logs_no_engine_key(
        broken_engine: str, caplog: pytest.LogCaptureFixture,
        read: Callable[[aiohttp.ClientSession, str], Awaitable[object]],
        unknown: object) -> None:
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as session:
        assert await read(session, broken_engine) == unknown
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("agent.engine")]
    assert any("could not be read: ClientResponseError (status 400)" in line
               for line in lines), lines
    assert KEY not in caplog.text
