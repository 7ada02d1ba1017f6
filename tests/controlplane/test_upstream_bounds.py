"""What a hostile backend's answer can cost the control plane: a compromised engine runs
tenants' inputs, so its answer's head, trailers and framing are bounded
(:mod:`controlplane.adapters.http1`), each refusal an ``UpstreamProtocolError`` (the
dispatcher fails over, the client gets a 502) that closes the connection."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import errors
from controlplane.adapters import http1, upstream
from tests.controlplane.test_upstream import Conn, Handler, client, on_both_loops, serving

BODY = b'{"ok":1}'


def head_then(extra: bytes, *, chunked: bool = False) -> bytes:
    """A 200 head holding ``extra`` header lines."""
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else (
        b"Content-Length: %d\r\n" % len(BODY))
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + framing + b"\r\n"


def sending(*parts: bytes, forever: bytes = b"") -> Handler:
    """A handler: read the request, send ``parts``, then ``forever`` without end (until
    the client closes the connection), recording that it was closed."""
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        for part in parts:
            await conn.send(part)
        while forever:
            await conn.send(forever)
        await conn.wait_closed_by_peer()
    return handler


async def refused(c: upstream.UpstreamClient, url: str, match: str) -> None:
    with pytest.raises(errors.UpstreamProtocolError, match=match):
        resp = await c.send("POST", url + "/v1/chat/completions", b"{}", {})
        try:
            await resp.read()
        finally:
            resp.close()


@on_both_loops
async def test_a_head_of_too_many_headers_is_refused() -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(http1.MAX_HEADERS + 1))
    async with serving(sending(head_then(many) + BODY)) as srv, client() as c:
        await refused(c, srv.url, rf"over {http1.MAX_HEADERS} headers")
        await asyncio.sleep(0.05)
        assert c.open_connections == 0 and srv.closed_by_peer == 1


@on_both_loops
async def test_a_head_of_too_many_bytes_is_refused() -> None:
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 2000) for i in range(40))
    async with serving(sending(head_then(big) + BODY)) as srv, client() as c:
        await refused(c, srv.url, rf"over {http1.MAX_HEAD_BYTES} bytes")


@on_both_loops
async def test_a_header_without_end_is_refused_as_it_arrives() -> None:
    """One header value sent without end: httptools holds it until the header ends, so
    only the first-byte limit (a minute here) stopped it, gigabytes later."""
    start = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: "
    async with serving(sending(start, forever=b"a" * 65536)) as srv, \
            client(first_byte=60.0) as c:
        await refused(c, srv.url, "without body")
        assert c.open_connections == 0


@on_both_loops
async def test_headers_without_end_are_refused_as_they_arrive() -> None:
    start = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    async with serving(sending(start, forever=b"X-A: " + b"a" * 1000 + b"\r\n")) as srv, \
            client(first_byte=60.0) as c:
        await refused(c, srv.url, "over")


@on_both_loops
async def test_informational_heads_without_end_are_refused() -> None:
    async with serving(sending(forever=b"HTTP/1.1 100 Continue\r\n\r\n")) as srv, \
            client(first_byte=60.0) as c:
        await refused(c, srv.url, "without body")


@on_both_loops
async def test_trailers_are_never_the_answer_s_headers() -> None:
    chunked = b"%x\r\n%s\r\n0\r\nX-Trailer: planted\r\nSet-Cookie: t=1\r\n\r\n" % (
        len(BODY), BODY)
    async with serving(sending(head_then(b"", chunked=True) + chunked)) as srv, \
            client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        assert await resp.read() == BODY
        resp.close()
        names = {k.lower() for k, _ in resp.headers}
        assert names == {"content-type", "transfer-encoding"}


@on_both_loops
async def test_trailers_without_end_are_refused() -> None:
    chunked = b"%x\r\n%s\r\n0\r\n" % (len(BODY), BODY)
    async with serving(sending(head_then(b"", chunked=True) + chunked,
                               forever=b"X-T: " + b"t" * 1000 + b"\r\n")) as srv, \
            client(idle=60.0, first_byte=60.0) as c:
        await refused(c, srv.url, "without body")


@on_both_loops
async def test_a_long_stream_of_small_chunks_is_not_framing() -> None:
    """The framing between body bytes counts from the last body byte, not in total."""
    piece = b"data: x\n\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(20000))
    async with serving(sending(head_then(b"", chunked=True), chunks, b"0\r\n\r\n")) as srv, \
            client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        assert await resp.read() == piece * 20000
        resp.close()


@on_both_loops
async def test_redirects_and_no_content_are_no_answer() -> None:
    """A redirect reached the client with its Location, which the OpenAI SDK follows (a
    tenant's prompt sent wherever the engine said); a 204 or 304 an empty answer."""
    for status in (301, 302, 303, 304, 307, 308, 204, 205):
        answer = (b"HTTP/1.1 %d X\r\nLocation: http://elsewhere.example/v1/chat\r\n"
                  b"Content-Length: 0\r\n\r\n" % status)
        async with serving(sending(answer)) as srv, client() as c:
            await refused(c, srv.url, rf"status {status}, which is never relayed")
            assert c.open_connections == 0


@on_both_loops
async def test_an_encoded_body_is_refused_and_identity_is_asked_for() -> None:
    """Bodies are relayed and read as they came: a gzip body passed its Content-Encoding
    on to the client, and none of Synapse's own readers (usage, cache) could read it."""
    gz = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
          b"Content-Length: 2\r\n\r\n\x1f\x8b")
    async with serving(sending(gz)) as srv, client() as c:
        await refused(c, srv.url, "Content-Encoding")
        assert b"\r\nAccept-Encoding: identity\r\n" in srv.requests[0]
    # one coding per header line: a later line is as much the answer's coding
    split = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n"
             b"Content-Length: 2\r\n\r\n\x1f\x8b")
    async with serving(sending(split)) as srv, client() as c:
        await refused(c, srv.url, "Content-Encoding")
    plain = head_then(b"Content-Encoding: Identity\r\n") + BODY
    async with serving(sending(plain)) as srv, client() as c:
        resp = await c.send("POST", srv.url + "/x", b"{}", {})
        assert (resp.status, await resp.read()) == (200, BODY)
        resp.close()


def sized(n: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % n) + b"a" * n


@on_both_loops
async def test_whole_answers_together_hold_at_most_the_budget() -> None:
    """Each whole answer could hold 256 MiB, with no bound across requests: six at once
    took a control plane from 119 to 1,647 MB. What they hold beyond the high-water mark
    is reserved from one budget until their response is closed."""
    budget = http1.BUDGET
    limit, budget.limit = budget.limit, 1024 * 1024
    try:
        async with serving(sending(sized(700 * 1024))) as srv, client() as c:
            first = await c.send("POST", srv.url + "/x", b"{}", {})
            assert len(await first.read()) == 700 * 1024
            assert budget.held > 0, "the first answer's body is held until it is closed"
            second = await c.send("POST", srv.url + "/x", b"{}", {})
            with pytest.raises(errors.UpstreamProtocolError, match="at once") as over:
                await second.read()
            assert over.value.code == http1.BUDGET_SPENT, "no backend's fault"
            second.close()
            first.close()
            assert budget.held == 0
            third = await c.send("POST", srv.url + "/x", b"{}", {})
            assert len(await third.read()) == 700 * 1024, "the budget came back"
            third.close()
        async with serving(sending(sized(2 * 1024 * 1024))) as srv, client() as c:
            await refused(c, srv.url, "at once")
        assert budget.held == 0
    finally:
        budget.limit = limit


@on_both_loops
async def test_one_tenant_holds_at_most_its_share_of_the_budget() -> None:
    """A tenant asking for large answers must not spend what every tenant's whole answers
    share: beyond its share it is refused (the same code as a spent budget) while another
    tenant's answer of the same size is read. Each reservation goes back to the tenant it
    was taken for, whatever tenant the context names by then, and a tenant holding
    nothing is forgotten."""
    budget = http1.BUDGET
    limit, share = budget.limit, budget.share
    budget.limit, budget.share = 4 * 1024 * 1024, 1024 * 1024
    try:
        async with serving(sending(sized(700 * 1024))) as srv, client() as c:
            http1.charge("a")
            first = await c.send("POST", srv.url + "/x", b"{}", {})
            assert len(await first.read()) == 700 * 1024
            assert budget.tenants == {"a": budget.held}
            second = await c.send("POST", srv.url + "/x", b"{}", {})
            with pytest.raises(errors.UpstreamProtocolError, match="at once") as over:
                await second.read()
            assert over.value.code == http1.BUDGET_SPENT, "refused as a spent budget is"
            second.close()
            http1.charge("b")
            other = await c.send("POST", srv.url + "/x", b"{}", {})
            assert len(await other.read()) == 700 * 1024, "another tenant's is read"
            assert set(budget.tenants) == {"a", "b"}
            http1.charge("c")
            first.close()
            assert set(budget.tenants) == {"b"}, "given back under the tenant it was for"
            other.close()
            assert (budget.held, budget.tenants) == (0, {})
    finally:
        http1.charge("")
        budget.limit, budget.share = limit, share


@on_both_loops
async def test_one_answer_over_the_cap_is_the_backends() -> None:
    """An answer over the per-answer cap is that backend's (the dispatcher fails over); one
    refused for want of budget is nobody's (the dispatcher answers 503)."""
    cap = http1.MAX_WHOLE_BODY
    http1.MAX_WHOLE_BODY = 512 * 1024
    try:
        async with serving(sending(sized(700 * 1024))) as srv, client() as c:
            resp = await c.send("POST", srv.url + "/x", b"{}", {})
            with pytest.raises(errors.UpstreamProtocolError, match="over") as over:
                await resp.read()
            resp.close()
            assert over.value.code == "upstream_too_large"
    finally:
        http1.MAX_WHOLE_BODY = cap
