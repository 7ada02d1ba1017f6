"""A tenant over its request rate is refused before its body is read (probe 108 F2): a
client that sends a request head and waits gets the 429, on the fast lane
(``Content-Length``) and on aiohttp's path (chunked) alike, and its body is never parsed."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.core import validation
from tests.controlplane import cp_testing as t


async def _head_only(url: str, key: str, framing: str) -> bytes:
    """Send a chat request's head (no body) and read what comes back within 5 s."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                 f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                 f"{framing}\r\n\r\n".encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 5)
    except TimeoutError:
        return b"(nothing)"
    finally:
        writer.close()


@pytest.mark.parametrize("framing", ["Content-Length: 60000",
                                     "Transfer-Encoding: chunked"])
async def test_a_tenant_over_its_rate_gets_429_without_sending_its_body(
        framing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parses = [0]
    real = validation.parse_json

    def counted(*args: object, **kwargs: object) -> object:
        parses[0] += 1
        return real(*args, **kwargs)    # type: ignore[arg-type]
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)], http={"body_timeout_s": 30},
                       auth={"tenants": [
                           {"name": "a", "keys": [t.KEY_A], "requests_per_second": 0.01,
                            "burst": 1},
                           {"name": "b", "keys": [t.KEY_B]}]})
        async with t.running(s) as cp:
            a = cp.client(t.KEY_A)
            await a.chat.completions.create(model="llama",
                                            messages=[{"role": "user", "content": "hi"}])
            await a.close()
            monkeypatch.setattr(validation, "parse_json", counted)
            answer = await _head_only(cp.url, t.KEY_A, framing)
            assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
            assert b"rate_limit_exceeded" in answer
            assert parses[0] == 0
