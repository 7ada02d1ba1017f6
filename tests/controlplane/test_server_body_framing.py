"""A chunked request body whose framing breaks after its head has arrived (a bad
chunk-size line, a chunk longer than announced, garbage after a chunk) is answered 400 at
once, in the shape of the path's API, and its connection closed: aiohttp's parser dropped
the body without failing it, and the handler waited out ``http.body_timeout_s`` (408).
With or without the fast lane (which hands chunked requests to aiohttp). Raw sockets.

``http.body_timeout_s`` is far longer than the client waits for an answer: a hang
detector, not a timing assertion."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.controlplane import cp_testing as t
from tests.controlplane.test_fast_lane import answer, serving
from tests.controlplane.test_server_error_shapes import anthropic_shaped, head, openai_shaped

BODY_TIMEOUT_S = 30.0
CLIENT_WAIT_S = 5.0             # far less than BODY_TIMEOUT_S: an answer that waits for it fails
CHUNKED = b"Transfer-Encoding: chunked"

# What follows a valid chunked head, write by write, by what breaks the framing.
BROKEN: dict[str, tuple[bytes, ...]] = {
    "bad_chunk_size": (b"zz\r\n{}\r\n",),
    "chunk_longer_than_announced": (b"2\r\n{\"a\": 1}\r\n",),
    "garbage_after_a_chunk": (b"2\r\n{}\r\n", b"\x00garbage\r\n"),
    "no_line_end_after_a_chunk": (b"5\r\n{\"a\":", b"1}xx"),
}
PATHS = [b"/v1/chat/completions", b"/v1/messages"]


def settings(fast_lane: bool) -> Any:
    return t.settings(upstreams=[], http={"body_timeout_s": BODY_TIMEOUT_S,
                                          "fast_lane": fast_lane})


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (nothing more sent) within the wait."""
    return await asyncio.wait_for(reader.read(), CLIENT_WAIT_S) == b""


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logged, [r.getMessage() for r in logged]


@pytest.mark.parametrize("fast_lane", [True, False])
@pytest.mark.parametrize("fault", sorted(BROKEN))
@pytest.mark.parametrize("path", PATHS)
async def test_a_body_whose_chunked_framing_breaks_is_a_400_at_once(
        fast_lane: bool, fault: str, path: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(settings(fast_lane)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head(path, CHUNKED))       # the head alone: the handler waits
            for data in BROKEN[fault]:
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(data)
            status, _, body = await asyncio.wait_for(answer(reader), CLIENT_WAIT_S)
            assert status == 400, body
            shaped = anthropic_shaped if path == b"/v1/messages" else openai_shaped
            assert "framing" in str(shaped(body)), body
            assert await closed(reader)
        finally:
            writer.close()
    no_errors_logged(caplog)


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_body_that_breaks_after_its_request_was_answered_closes_the_connection(
        fast_lane: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A request answered before its body was read (no key: 401) whose body then breaks:
    the connection is closed at once, with no second answer and nothing logged as an
    error (aiohttp waited up to its lingering time for the rest of the body)."""
    async with serving(settings(fast_lane)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         + CHUNKED + b"\r\n\r\n2\r\n{}\r\n")
            status, _, _ = await asyncio.wait_for(answer(reader), CLIENT_WAIT_S)
            assert status == 401
            await asyncio.sleep(0.1)
            writer.write(b"zz\r\n")
            assert await closed(reader)
        finally:
            writer.close()
    no_errors_logged(caplog)
