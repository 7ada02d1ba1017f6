"""A tenant over its request rate is refused before its body is read (probe 108 F2): a
client that sends a request head and waits gets the 429, on the fast lane
(``Content-Length``) and on aiohttp's path (chunked) alike, and its body is never parsed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from controlplane.adapters import redis_limits
from controlplane.core import validation
from tests import harness
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


async def _a_head_is_refused_while_busy(backend: Any, busy: Any, cp: Any) -> None:
    """Tenant A's one slot taken by a request to ``busy`` (held at ``backend``): a head
    whose body is still to come, sent to ``cp``, gets its 429 naming the limit."""
    held = asyncio.create_task(busy.client(t.KEY_A).chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}]))
    try:
        await harness.until(lambda: bool(backend.bodies), 10, "the first request at the backend")
        answer = await _head_only(cp.url, t.KEY_A, "Content-Length: 60000")
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        assert b"concurrent requests" in answer
    finally:
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)


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
        s = _one_request_a_century(b.url)
        async with t.running(s) as cp:
            a = cp.client(t.KEY_A)
            await a.chat.completions.create(model="llama",
                                            messages=[{"role": "user", "content": "hi"}])
            await a.close()
            monkeypatch.setattr(validation, "parse_json", counted)
            answer = await _head_only(cp.url, t.KEY_A, framing)
            assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
            assert b"rate_limit_exceeded" in answer
            assert _retry_after(answer) > 50     # the next token, at 0.01/s; not 1 s
            assert parses[0] == 0


def _one_request_a_century(url: str, http: dict[str, Any] | None = None,
                           **sections: Any) -> Any:
    """Settings of one upstream at ``url`` and two tenants, ``a`` allowed one request now
    and the next in 100 s (its 429 names a wait no rounding reaches), ``b`` unlimited."""
    return t.settings(upstreams=[t.upstream("one", url)],
                      http={"body_timeout_s": 30, **(http or {})},
                      auth={"tenants": [
                          {"name": "a", "keys": [t.KEY_A], "requests_per_second": 0.01,
                           "burst": 1},
                          {"name": "b", "keys": [t.KEY_B]}]}, **sections)


def _retry_after(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"retry-after:", 1)[1].split(b"\r\n", 1)[0])


async def test_a_head_refused_by_the_lane_takes_no_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane refused the head: the app answers 429 without asking the limiter for a
    permit (which, had a token come since, would spend it on a request never served)."""
    async with t.backends(("one", "ok")) as (b,):
        s = _one_request_a_century(b.url)
        async with t.running(s) as cp:
            await cp.client(t.KEY_A).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}])
            asked = [0]
            real = cp.services.limiter.acquire

            async def counted(*args: object, **kwargs: object) -> object:
                asked[0] += 1
                return await real(*args, **kwargs)   # type: ignore[arg-type]
            monkeypatch.setattr(cp.services.limiter, "acquire", counted)
            answer = await _head_only(cp.url, t.KEY_A, "Content-Length: 60000")
            assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
            assert asked[0] == 0


async def test_a_tenant_at_its_concurrency_gets_429_at_the_head() -> None:
    """max_concurrent 1 and a request in flight: the lane refuses the next head as
    aiohttp's path does (before its body), naming the limit."""
    async with t.backends(("one", "hang")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)], http={"body_timeout_s": 30},
                       auth={"tenants": [{"name": "a", "keys": [t.KEY_A], "max_concurrent": 1},
                                         {"name": "b", "keys": [t.KEY_B]}]})
        async with t.running(s) as cp:
            await _a_head_is_refused_while_busy(b, cp, cp)


async def test_a_rate_refusal_of_the_shared_store_is_kept_for_the_head(
        redis_server: harness.RedisServer) -> None:
    """With Redis the lane cannot ask the store at the head; once the store refused the
    tenant on its rate, this replica refuses its heads until the token the store named
    (before, a Content-Length head waited for its body, to a 408)."""
    async with t.backends(("one", "ok")) as (b,):
        s = _one_request_a_century(b.url, redis={"url": redis_server.url, "timeout_s": 1.0})
        async with t.running(s) as cp:
            a = cp.client(t.KEY_A)
            await a.chat.completions.create(model="llama",
                                            messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.RateLimitError):     # the store refuses: remembered
                await a.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hi"}])
            answer = await _head_only(cp.url, t.KEY_A, "Content-Length: 60000")
            assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
            assert _retry_after(answer) > 50


async def test_a_shared_concurrency_lease_outlasts_the_body_and_the_loop_turns(
        redis_server: harness.RedisServer) -> None:
    """A slot is taken before the body is read: its lease in Redis covers the body's
    upload (http.body_timeout_s) and the loop-share turns before and after it, beside the
    backend's first byte and a stream gap (before, only those two and a minute)."""
    async with t.backends(("one", "hang")) as (b,):
        h = {"body_timeout_s": 600, "upstream_first_byte_timeout_s": 5,
             "upstream_idle_timeout_s": 5}
        s = t.settings(upstreams=[t.upstream("one", b.url)], http=h,
                       redis={"url": redis_server.url, "timeout_s": 1.0},
                       auth={"tenants": [{"name": "a", "keys": [t.KEY_A], "max_concurrent": 2},
                                         {"name": "b", "keys": [t.KEY_B]}]})
        async with t.running(s) as cp:
            busy = asyncio.create_task(cp.client(t.KEY_A).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}]))
            client = redis_limits.connect(redis_server.url)
            try:
                await harness.until(lambda: bool(b.bodies), 10, "the request at the backend")
                seconds, micros = await client.time()
                slots = await client.zrange("synapse:rl:a:active", 0, -1, withscores=True)
                assert len(slots) == 1
                lease = slots[0][1] - (seconds + micros / 1e6)
                assert lease > 600 + 2 * cp.services.loop_share.max_wait_s + 5 + 5
            finally:
                busy.cancel()
                await asyncio.gather(busy, return_exceptions=True)
                await client.aclose()


BIG = 4 * 1024 * 1024       # an upload far over what the lane lingers for


def _chat_head(url: str, key: str, length: int, *extra: str) -> bytes:
    host = url.removeprefix("http://").split(":")[0]
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}",
             f"Authorization: Bearer {key}", "Content-Type: application/json",
             f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One whole answer: its head and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


@contextlib.asynccontextmanager
async def _over_rate(**http: Any) -> AsyncIterator[t.RunningCP]:
    """A control plane whose tenant ``a`` has just spent its one token of the century."""
    async with t.backends(("one", "ok")) as (b,):
        s = _one_request_a_century(b.url, http={"max_body_bytes": 2 * BIG, **http})
        async with t.running(s) as cp:
            await cp.client(t.KEY_A).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}])
            yield cp


async def test_expect_100_continue_over_the_rate_gets_the_429_instead_of_100() -> None:
    """A client that asks before sending its body is told 429, never invited to send it
    (before, the head went to aiohttp's path, which answered 100 Continue first), and
    told the connection closes (the body it did not send is not awaited)."""
    async with _over_rate() as cp:
        host, port = cp.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(_chat_head(cp.url, t.KEY_A, BIG, "Expect: 100-continue"))
            await writer.drain()
            head, body = await _answer(reader)
            assert head.startswith(b"HTTP/1.1 429"), head
            assert b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        finally:
            writer.close()


async def test_expect_100_continue_under_the_rate_is_invited_then_served() -> None:
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(_one_request_a_century(b.url)) as cp:
            host, port = cp.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps({"model": "llama",
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            try:
                writer.write(_chat_head(cp.url, t.KEY_A, len(body), "Expect: 100-continue"))
                await writer.drain()
                invited = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert invited == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(body)
                head, _ = await _answer(reader)
                assert head.startswith(b"HTTP/1.1 200"), head
            finally:
                writer.close()


def _send_all_then_read(url: str) -> bytes:
    """What a naive client does: the whole head and body, then read (a send the server
    cut short is not the end: the answer may be there)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(_chat_head(url, t.KEY_A, BIG) + b"{" + b" " * (BIG - 2) + b"}")
        return sock.recv(65536)


async def test_clients_still_sending_a_large_body_see_their_429() -> None:
    """The 429 comes at the head; a client still sending its body gets it whether it reads
    while it sends (aiohttp), only once it has sent everything, or stops reading while it
    sends and closes its socket when a write fails (httpx's async client, the ``openai``
    one): a connection closed with the body unread would reset it, and that client lose
    its answer."""
    payload = b"{" + b" " * (BIG - 2) + b"}"
    async with _over_rate() as cp:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                    f"{cp.url}/v1/chat/completions", data=payload,
                    headers={"Authorization": f"Bearer {t.KEY_A}",
                             "Content-Type": "application/json"}) as resp:
                assert resp.status == 429
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
        answer = await asyncio.to_thread(_send_all_then_read, cp.url)
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        with pytest.raises(openai.RateLimitError):      # httpx's way (it reads after)
            await cp.client(t.KEY_A).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": " " * BIG}])


def _one_at_a_time(url: str, redis_url: str) -> Any:
    """Tenant ``a`` allowed one request in flight, counted in Redis (a pod's workers or a
    fleet's replicas share the count)."""
    return t.settings(upstreams=[t.upstream("one", url)], http={"body_timeout_s": 30},
                      redis={"url": redis_url, "timeout_s": 1.0},
                      auth={"tenants": [{"name": "a", "keys": [t.KEY_A], "max_concurrent": 1},
                                        {"name": "b", "keys": [t.KEY_B]}]})


async def test_a_shared_concurrency_refusal_comes_at_the_head(
        redis_server: harness.RedisServer) -> None:
    """With Redis, the tenant's one slot taken (here by another replica: this one has no
    trace of it): a head whose body is still to come gets its 429 naming the limit without
    sending the body (before, the lane waited for the body, here until its 408)."""
    async with t.backends(("one", "hang")) as (b,):
        s = _one_at_a_time(b.url, redis_server.url)
        async with t.running(s) as other, t.running(s) as cp:
            await _a_head_is_refused_while_busy(b, other, cp)


async def test_a_body_after_its_head_is_served_with_a_shared_store(
        redis_server: harness.RedisServer) -> None:
    """With Redis, a request handed to the app at its head is served once its body comes,
    in pieces, and the connection goes on to the next request; its slot is released."""
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(_one_at_a_time(b.url, redis_server.url)) as cp:
            host, port = cp.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                for i in range(2):
                    body = json.dumps({"model": "llama", "messages": [
                        {"role": "user", "content": f"piece {i} " + "x" * 20_000}]}).encode()
                    writer.write(_chat_head(cp.url, t.KEY_A, len(body)))
                    await writer.drain()
                    for at in range(0, len(body), 5000):
                        await asyncio.sleep(0.02)
                        writer.write(body[at:at + 5000])
                        await writer.drain()
                    head, _ = await _answer(reader)
                    assert head.startswith(b"HTTP/1.1 200"), head
            finally:
                writer.close()
            assert [json.loads(got)["messages"][0]["content"][:7] for got in b.bodies] == [
                "piece 0", "piece 1"]


@pytest.mark.parametrize(("path", "framing"), [
    ("/v1/embeddings", f"Content-Length: {BIG}"),
    ("/v1/chat/completions", "Transfer-Encoding: chunked")])
async def test_expect_100_continue_over_the_rate_on_aiohttps_path_is_not_invited(
        path: str, framing: str) -> None:
    """The routes aiohttp serves (embeddings, a chunked body) ask the same question as the
    lane before inviting a body: a tenant over its rate gets its 429, never ``100
    Continue`` (before, only its key was checked)."""
    async with _over_rate() as cp:
        host, port = cp.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {t.KEY_A}\r\n"
                          f"Content-Type: application/json\r\n{framing}\r\n"
                          "Expect: 100-continue\r\n\r\n").encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 429"), head
        finally:
            writer.close()
