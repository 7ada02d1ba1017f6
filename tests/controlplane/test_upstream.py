"""The upstream transport (HTTP/1.1 client) against a raw TCP server that answers as each
test needs. Every failure it reports is a :mod:`controlplane.errors` class naming no address."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools
import pytest
import uvloop

from controlplane import errors
from controlplane.adapters import http1, upstream

Handler = Callable[["Conn"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def on_both_loops(case: Callable[[], Awaitable[None]]) -> Callable[[str], None]:
    """Run a test on asyncio's loop and on uvloop (the control plane's, whose transports
    are not asyncio classes)."""
    def test(loop: str) -> None:
        runner = uvloop.run if loop == "uvloop" else asyncio.run
        runner(asyncio.wait_for(case(), 30))

    test.__name__ = case.__name__
    test.__doc__ = case.__doc__
    return pytest.mark.parametrize("loop", ["asyncio", "uvloop"])(test)


class RawServer:
    """Counts connections; ``handler(conn)`` serves each (``conn.n``: the n-th)."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.connections = 0
        self.closed_by_peer = 0
        self.requests: list[bytes] = []
        self.open_now = 0
        self.open_max = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        assert self.handler is not None
        try:
            await self.handler(Conn(self, reader, writer, self.connections))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    async def wait_closed_by_peer(self, reader: asyncio.StreamReader) -> None:
        if await reader.read(1) == b"":
            self.closed_by_peer += 1


@dataclasses.dataclass
class Conn:
    """The n-th connection to a :class:`RawServer`, as its handler sees it."""

    srv: RawServer
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    n: int

    async def read_request(self) -> bytes:
        return await self.srv.read_request(self.reader)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_peer(self) -> None:
        await self.srv.wait_closed_by_peer(self.reader)


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[RawServer]:
    srv = RawServer()
    srv.handler = handler
    srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
    port = srv.server.sockets[0].getsockname()[1]
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        srv.server.close()


@contextlib.asynccontextmanager
async def client(**kw: float) -> AsyncIterator[upstream.UpstreamClient]:
    c = upstream.UpstreamClient(kw.pop("connect", 2.0), kw.pop("first_byte", 5.0),
                                kw.pop("idle", 5.0), **kw)  # type: ignore[arg-type]
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def keep_alive(answer: bytes = OK, delay_s: float = 0.0) -> Handler:
    """Answer every request on the connection with ``answer`` (after ``delay_s``)."""
    async def handler(conn: Conn) -> None:
        while True:
            await conn.read_request()
            if delay_s:
                await asyncio.sleep(delay_s)
            await conn.send(answer)
    return handler


def answer_once(answer: bytes, *, then_wait_close: bool = False) -> Handler:
    """Read one request, send ``answer`` (then wait until the client closes the connection,
    with ``then_wait_close``)."""
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(answer)
        if then_wait_close:
            await conn.wait_closed_by_peer()
    return handler


@on_both_loops
async def test_connections_are_kept_alive_and_reused() -> None:
    async with serving(keep_alive()) as srv, client() as c:
        for i in range(5):
            resp = await c.send("POST", srv.url + "/v1/chat", b'{"i": %d}' % i,
                                {"Content-Type": "application/json", "x-request-id": "r"})
            assert (resp.status, resp.content_type, await resp.read()) == (
                200, "application/json", b"{}")
            resp.close()
        assert srv.connections == 1
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/chat HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in first and b"\r\nContent-Length: 8\r\n" in first
        assert b"\r\nx-request-id: r\r\n" in first and first.endswith(b'{"i": 0}')


@on_both_loops
async def test_chunked_bodies_are_unframed_and_arrive_as_they_come() -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8"
                          b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: [DONE]\n\n"):
            await conn.send(b"%x\r\n%s\r\n" % (len(part), part))
            await asyncio.sleep(0.05)
        await conn.send(b"0\r\n\r\n")
        await conn.read_request()       # the connection is reused
        await conn.send(OK)
        await asyncio.sleep(1)

    async with serving(handler) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/v1/chat", b"{}", {})
        assert resp.content_type == "text/event-stream"
        chunks = []
        while (chunk := await resp.next_chunk()) is not None:
            chunks.append(chunk)
        assert chunks == [b"data: 1\n\n", b"data: [DONE]\n\n"]
        resp.close()
        again = await c.send("POST", srv.url + "/v1/chat", b"{}", {})
        assert await again.read() == b"{}"
        again.close()
        assert srv.connections == 1


@on_both_loops
async def test_a_body_ended_by_the_connection_is_read_whole_and_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    async with serving(answer_once(answer)) as srv, client() as c:
        for _ in range(2):
            resp = await c.send("POST", srv.url + "/x", b"", {})
            assert await resp.read() == b"all of it"
            resp.close()
        assert srv.connections == 2
        assert c.open_connections == 0


@on_both_loops
async def test_a_stale_idle_connection_is_retried_once_on_a_new_one() -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(OK)
        if conn.n == 1:
            # Keep-alive time-out racing the next request: read it, close unanswered.
            await conn.read_request()
            return
        await asyncio.sleep(1)

    async with serving(handler) as srv, client() as c:
        first = await c.send("POST", srv.url + "/x", b"1", {})
        await first.read()
        first.close()
        second = await c.send("POST", srv.url + "/x", b"2", {})
        assert await second.read() == b"{}"
        second.close()
        assert srv.connections == 2
        assert [r[-1:] for r in srv.requests] == [b"1", b"2", b"2"]


@on_both_loops
async def test_a_new_connection_closed_before_answering_is_an_error_not_a_retry() -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()

    async with serving(handler) as srv, client() as c:
        with pytest.raises(errors.UpstreamError, match="before answering"):
            await c.send("POST", srv.url + "/x", b"{}", {})
        assert srv.connections == 1
        assert c.open_connections == 0


@on_both_loops
async def test_an_answer_cut_in_the_middle_fails_the_read() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    async with serving(answer_once(answer)) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        with pytest.raises(errors.UpstreamError, match="middle of its answer"):
            await resp.read()
        resp.close()
        assert c.open_connections == 0


@on_both_loops
async def test_time_limits_connect_first_byte_and_read() -> None:
    async def handler(conn: Conn) -> None:
        if (await conn.read_request()).endswith(b"head"):
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.wait_closed_by_peer()

    async with serving(handler) as srv, client(first_byte=0.3, idle=0.3) as c:
        with pytest.raises(errors.UpstreamTimeout, match=r"within 0\.3s"):
            await c.send("POST", srv.url + "/x", b"silent", {})
        resp = await c.send("POST", srv.url + "/x", b"head", {})
        with pytest.raises(errors.UpstreamReadError, match="read timeout"):
            await resp.read()
        resp.close()
        with pytest.raises(errors.UpstreamReadError, match="read timeout"):
            resp2 = await c.send("POST", srv.url + "/x", b"head", {})
            try:
                await resp2.next_chunk(0.05)
                await resp2.next_chunk(0.05)
            finally:
                resp2.close()
        await asyncio.sleep(0.1)
        assert srv.closed_by_peer == 3, "each abandoned request closed its connection"
    refused = upstream.UpstreamClient(0.5, 1.0, 1.0)
    await refused.start()
    with pytest.raises(errors.UpstreamConnectError, match=r"cannot connect: Connection refused") \
            as info:
        await refused.send("POST", "http://127.0.0.1:1/x", b"", {})
    assert "127.0.0.1" not in str(info.value), "no address in an error a client may see"
    await refused.close()


@on_both_loops
async def test_closing_before_the_end_closes_the_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    async with serving(answer_once(answer, then_wait_close=True)) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        assert await resp.next_chunk() == b"abc"
        resp.close()
        await asyncio.sleep(0.1)
        assert srv.closed_by_peer == 1
        assert c.open_connections == 0


@on_both_loops
async def test_reading_pauses_while_the_caller_does_not_take_the_body() -> None:
    size = 8 * 1024 * 1024
    sent = 0

    async def handler(conn: Conn) -> None:
        nonlocal sent
        await conn.read_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for _ in range(size // len(block)):
            await conn.send(block)
            sent += len(block)

    async with serving(handler) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        await asyncio.sleep(0.5)
        assert sent < size, "the server could not send it all: reading was paused"
        got = 0
        while (chunk := await resp.next_chunk()) is not None:
            got += len(chunk)
            assert len(chunk) <= upstream.HIGH_WATER + 4 * 65536
        assert got == size
        resp.close()


@on_both_loops
async def test_a_whole_body_over_the_high_water_mark_is_read_not_left_paused() -> None:
    """read() took the body only once it was complete, while reading stayed paused above
    HIGH_WATER until the body was taken: a non-streamed answer over 256 KiB (logprobs,
    a long error) waited out the read timeout and became a 502."""
    size = upstream.HIGH_WATER * 4 + 123

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for start in range(0, size, len(block)):
            await conn.send(block[:size - start])

    async with serving(handler) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        body = await asyncio.wait_for(resp.read(), 10)
        assert len(body) == size
        resp.close()


@on_both_loops
async def test_the_connection_limit_makes_requests_wait() -> None:
    async def one(c: upstream.UpstreamClient, url: str) -> bytes:
        resp = await c.send("POST", url + "/x", b"{}", {})
        try:
            return await resp.read()
        finally:
            resp.close()

    async with serving(keep_alive(OK, delay_s=0.1)) as srv, client(limit=2) as c:
        results = await asyncio.gather(*(one(c, srv.url) for _ in range(6)))
        assert results == [b"{}"] * 6
        assert srv.open_max == 2 and srv.connections == 2


@on_both_loops
async def test_informational_answers_are_skipped_and_bad_http_is_an_error() -> None:
    async def handler(conn: Conn) -> None:
        if (await conn.read_request()).endswith(b"bad"):
            await conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        else:
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        await asyncio.sleep(0.5)

    async with serving(handler) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/x", b"fine", {})
        assert resp.status == 200 and await resp.read() == b"{}"
        assert [k for k, _ in resp.headers] == ["Content-Type", "Content-Length"]
        resp.close()
        with pytest.raises(errors.UpstreamProtocolError, match="invalid HTTP"):
            await c.send("POST", srv.url + "/x", b"bad", {})


@on_both_loops
async def test_headers_with_line_breaks_are_refused_before_sending() -> None:
    async with serving(keep_alive()) as srv, client() as c:
        with pytest.raises(ValueError, match="'x-evil' holds a CR, LF or NUL"):
            await c.send("POST", srv.url + "/x", b"{}", {"x-evil": "a\r\nInjected: yes"})
        resp = await c.send("GET", srv.url + "/health", b"", {"Authorization": "Bearer k"})
        status, body = resp.status, await resp.read()
        resp.close()
        assert (status, body) == (200, b"{}")
        assert srv.requests[0].startswith(b"GET /health HTTP/1.1\r\n")
        assert b"Content-Length" not in srv.requests[0]


def test_foreign_errors_are_translated_by_one_table_without_addresses() -> None:
    # asyncio's own strerror names the address: only the errno's words are kept
    refused = http1.translate(OSError(errno.ECONNREFUSED,
                                      "Connect call failed ('10.1.2.3', 8000)"))
    assert type(refused) is errors.UpstreamConnectError
    assert refused.message == "cannot connect: Connection refused"
    tls = ssl.SSLCertVerificationError(1, "certificate verify failed: Hostname mismatch, "
                                          "certificate is not valid for 'vllm.internal'")
    tls.reason = "CERTIFICATE_VERIFY_FAILED"
    assert http1.translate(tls).message == "cannot connect over TLS: CERTIFICATE_VERIFY_FAILED"
    bad = http1.translate(httptools.HttpParserError("invalid HTTP status code"))
    assert type(bad) is errors.UpstreamProtocolError and "invalid HTTP" in bad.message
    upgrade = http1.translate(httptools.HttpParserUpgrade(77))    # no HttpParserError
    assert type(upgrade) is errors.UpstreamProtocolError and "77" not in upgrade.message
    with pytest.raises(TypeError, match="no upstream error is mapped for KeyError"):
        http1.translate(KeyError("x"))


# -- one answer per request: bytes a backend sends beyond it (desync, cross-tenant bleed) --

def answer(text: str, rid: str | None = None) -> bytes:
    """A whole JSON answer, echoing ``rid`` as x-request-id when given."""
    body = b'{"answer": "%s"}' % text.encode()
    echo = b"x-request-id: %s\r\n" % rid.encode() if rid is not None else b""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + echo
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def request_id(request: bytes) -> str:
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"x-request-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


async def ask(c: upstream.UpstreamClient, url: str, rid: str = "r") -> tuple[int, bytes]:
    resp = await c.send("POST", url + "/v1/chat/completions", b"{}", {"x-request-id": rid})
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()


@on_both_loops
async def test_a_second_answer_in_the_same_write_is_dropped_and_the_connection_too() -> None:
    """Two whole answers in one write: the first is the request's, untouched (one status,
    one Content-Length, one JSON document); the second is nobody's and the connection that
    carried it is not used again."""
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(answer("first") + answer("PLANTED"))
        await conn.wait_closed_by_peer()

    async with serving(handler) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/v1/chat/completions", b"{}", {})
        body = await resp.read()
        assert (resp.status, body) == (200, b'{"answer": "first"}')
        assert [k for k, _ in resp.headers].count("Content-Length") == 1
        resp.close()
        await asyncio.sleep(0.1)
        assert c.open_connections == 0 and srv.closed_by_peer == 1


@on_both_loops
async def test_a_stream_then_a_planted_answer_ends_at_the_stream_s_end() -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        events = b"".join(b"%x\r\n%s\r\n" % (len(e), e)
                          for e in (b"data: 1\n\n", b"data: [DONE]\n\n"))
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + events + b"0\r\n\r\n"
                        + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"15\r\ndata: {\"PLANTED\": 1}\n\n\r\n")
        await conn.wait_closed_by_peer()

    async with serving(handler) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/v1/chat/completions", b"{}", {})
        chunks = []
        while (chunk := await resp.next_chunk()) is not None:
            chunks.append(chunk)
        resp.close()
        assert b"".join(chunks) == b"data: 1\n\ndata: [DONE]\n\n"
        assert c.open_connections == 0


@on_both_loops
async def test_a_partial_second_answer_does_not_send_the_connection_back_to_the_pool() -> None:
    """A whole answer, then the head and half the body of another: the connection was
    pooled mid-message, and its next user (another tenant, the health prober) got 502
    "invalid HTTP". It is closed instead; the next request goes over a new connection."""
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if conn.n == 1:
            await conn.send(answer("first") + answer("PLANTED")[:-10])
            await conn.wait_closed_by_peer()
            return
        await conn.send(answer("second"))
        await conn.wait_closed_by_peer()

    async with serving(handler) as srv, client() as c:
        assert await ask(c, srv.url) == (200, b'{"answer": "first"}')
        assert await ask(c, srv.url) == (200, b'{"answer": "second"}')
        assert srv.connections == 2


@on_both_loops
async def test_an_answer_arriving_late_is_not_the_next_request_s() -> None:
    """An engine answers request 1, then writes a second answer once request 2 was sent
    on the same keep-alive connection. Without the id check, request 2 got the planted
    answer, request 3 request 2's, and so on across tenants. The planted one carries
    request 1's id: request 2 fails as an invalid answer (the dispatcher fails over), the
    connection is closed, and request 3 gets its own answer."""
    async def handler(conn: Conn) -> None:
        while True:
            rid = request_id(await conn.read_request())
            if rid == "alice-1":
                await conn.send(answer("for alice", rid))
                continue
            if rid == "bob-2":       # planted now, request 2 already on the wire
                await conn.send(answer("PLANTED by alice", "alice-1"))
                await asyncio.sleep(0.05)
            await conn.send(answer(f"for {rid}", rid))

    async with serving(handler) as srv, client() as c:
        assert await ask(c, srv.url, "alice-1") == (200, b'{"answer": "for alice"}')
        with pytest.raises(errors.UpstreamProtocolError, match="another request"):
            await ask(c, srv.url, "bob-2")
        assert await ask(c, srv.url, "carol-3") == (200, b'{"answer": "for carol-3"}')
        assert await ask(c, srv.url, "dave-4") == (200, b'{"answer": "for dave-4"}')
        assert srv.connections == 2


@on_both_loops
async def test_the_id_check_drops_the_origin_s_idle_connections_and_spares_hosted_apis() -> None:
    """The idle connections of an origin caught off by one may be so too: closed. A
    backend that answers with ids of its own (OpenAI) is not held to ours."""
    async def handler(conn: Conn) -> None:
        while True:
            rid = request_id(await conn.read_request())
            if rid.startswith("hosted"):
                await conn.send(answer("hosted", "req_" + rid))
            elif rid == "off":
                await conn.send(answer("PLANTED", "someone-else"))
            else:
                await conn.send(answer(rid, rid))

    async with serving(handler) as srv, client() as c:
        for i in range(3):
            assert await ask(c, srv.url, f"hosted-{i}") == (200, b'{"answer": "hosted"}')
        held = [await c.send("POST", srv.url + "/x", b"{}", {"x-request-id": f"a{i}"})
                for i in range(3)]
        for resp in held:
            await resp.read()
            resp.close()
        assert c.open_connections == 3 and srv.connections == 3
        with pytest.raises(errors.UpstreamProtocolError, match="another request"):
            await ask(c, srv.url, "off")
        assert c.open_connections == 0, "the connection and the origin's idle ones closed"


@on_both_loops
async def test_switching_protocols_is_a_clean_error() -> None:
    """A 101 raised httptools' HttpParserUpgrade (no HttpParserError): asyncio logged
    "Fatal error on transport" and the client got "closed the connection"."""
    fatal: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: fatal.append(ctx))

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n" + answer("PLANTED"))
        await conn.wait_closed_by_peer()

    async with serving(handler) as srv, client() as c:
        with pytest.raises(errors.UpstreamProtocolError,
                           match=r"invalid HTTP: 101 Switching Protocols"):
            await ask(c, srv.url)
        await asyncio.sleep(0.1)
        assert c.open_connections == 0 and srv.closed_by_peer == 1
    assert fatal == []
