"""Errors answered below the app (controlplane.api.server) in the shape of the path's API:
a refused ``Expect`` (417) and a request aiohttp cannot parse (400) are Anthropic's shape
under ``/v1/messages``, where the Anthropic SDKs read nothing else, and the OpenAI envelope
elsewhere, or when the request line has no path to read. Raw sockets: no client library
sends these."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.controlplane import cp_testing as t
from tests.controlplane.test_fast_lane import answer, serving

KEY = t.KEY_A.encode()
MESSAGES = [b"/v1/messages", b"/v1/messages/count_tokens", b"/v1/messages/batches",
            b"//v1/messages/x", b"/v1/%6Dessages", b"http://x/v1/messages?beta=true"]
OPENAI = [b"/v1/chat/completions", b"/v1/messagesx", b"/v1/responses"]


def head(target: bytes, *lines: bytes) -> bytes:
    return (b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nx-api-key: " + KEY
            + b"\r\nAuthorization: Bearer " + KEY + b"\r\n"
            + b"".join(line + b"\r\n" for line in lines) + b"\r\n")


# A request aiohttp's parser refuses, by what is wrong with it.
UNPARSEABLE = {
    "bad_header_name": lambda p: head(p, b"Bad Name: x", b"Content-Length: 2") + b"{}",
    "bad_content_length": lambda p: head(p, b"Content-Length: 2x") + b"{}",
    "two_content_lengths": lambda p: head(p, b"Content-Length: 2",
                                          b"Content-Length: 3") + b"{}",
    "bad_chunked_body": lambda p: head(p, b"Transfer-Encoding: chunked") + b"zz\r\n{}\r\n",
    "oversized_header": lambda p: head(p, b"X-Big: " + b"a" * 3000,
                                       b"Content-Length: 2") + b"{}",
    "bad_request_line": lambda p: head(p).replace(b" HTTP/1.1\r\n", b" HTTP/1.1 x\r\n", 1),
}


def anthropic_shaped(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert data["type"] == "error" and "code" not in data["error"], data
    assert data["error"]["type"] == "invalid_request_error", data
    return data


def openai_shaped(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert "type" not in data and data["error"]["code"], data
    return data


async def exchange(port: int, *writes: bytes) -> tuple[int, bytes]:
    """Send ``writes`` (a pause between them) on one connection; the last answer's status
    and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, data in enumerate(writes):
            if i:
                await asyncio.sleep(0.05)
            writer.write(data)
            await writer.drain()
        status, _, body = await answer(reader)
        return status, body
    finally:
        writer.close()


def settings(fast_lane: bool) -> Any:
    return t.settings(upstreams=[], http={"max_header_bytes": 1024, "fast_lane": fast_lane})


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_a_refused_expect_is_anthropic_shaped_under_messages_only(fast_lane: bool) -> None:
    """A route's 417 was the OpenAI envelope there, and no route's (an unserved
    sub-path) aiohttp's plain text quoting the header."""
    async with serving(settings(fast_lane)) as (port, _):
        for target in MESSAGES + OPENAI:
            status, body = await exchange(port, head(target, b"Expect: 200-ok",
                                                     b"Content-Length: 2") + b"{}")
            assert status == 417, target
            shaped = anthropic_shaped if target in MESSAGES else openai_shaped
            data = shaped(body)
            assert "100-continue" in json.dumps(data) and b"200-ok" not in body, target


@pytest.mark.parametrize("fast_lane", [True, False])
@pytest.mark.parametrize("fault", sorted(UNPARSEABLE))
async def test_an_unparseable_request_is_anthropic_shaped_under_messages_only(
        fast_lane: bool, fault: str) -> None:
    async with serving(settings(fast_lane)) as (port, _):
        for target in MESSAGES + OPENAI:
            status, body = await exchange(port, UNPARSEABLE[fault](target))
            assert status == 400, (target, body)
            shaped = anthropic_shaped if target in MESSAGES else openai_shaped
            message = json.dumps(shaped(body))
            assert b"Bad Name" not in body and b"aaaa" not in body, target     # no echo
            assert "request" in message or "header" in message, message


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_the_path_is_read_where_the_failing_head_began_and_none_is_openai(
        fast_lane: bool) -> None:
    """The path is read from where the failing request's head began: its request line
    split over reads, or on a connection whose previous request went elsewhere. A
    request line with no path to read (bytes that are not HTTP, no target) is answered
    in the OpenAI envelope."""
    async with serving(settings(fast_lane)) as (port, _):
        for wire in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                     b"POST\r\nHost: x\r\n\r\n", b"GET * HTTP/1.1 /v1/messages\r\n\r\n"):
            status, body = await exchange(port, wire)
            assert status == 400, wire
            openai_shaped(body)
        bad = UNPARSEABLE["bad_header_name"](b"/v1/messages")
        status, body = await exchange(port, bad[:9], bad[9:30], bad[30:])
        assert status == 400
        anthropic_shaped(body)
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(health)
            assert (await answer(reader))[0] == 200
            writer.write(bad)
            status, _, body = await answer(reader)
            assert status == 400
            anthropic_shaped(body)
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head(b"/v1/messages", b"Content-Length: 2") + b"{}")
            await answer(reader)                    # answered, whatever it is
            writer.write(UNPARSEABLE["bad_header_name"](b"/v1/chat/completions"))
            status, _, body = await answer(reader)
            assert status == 400
            openai_shaped(body)
        finally:
            writer.close()
