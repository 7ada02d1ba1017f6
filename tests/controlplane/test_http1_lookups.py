"""What the relay, the dispatcher and the connection read of a backend's answer head
(:mod:`controlplane.adapters.http1`), and the request head written for it: each header by
name (the first value of a repeated one), the head's bounds, and a request header with a
CR, LF or NUL refused wherever it sits. The serving path looks headers up by name rather
than walking them, so these pin what that lookup must keep."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import errors
from controlplane.adapters import http1


class _Pool:
    def release(self, conn: http1.Connection, reusable: bool) -> None:
        conn.response = None

    def forget_idle(self, conn: http1.Connection) -> None:
        return None


def _answer(*reads: bytes) -> http1.UpstreamResponse:
    """The answer parsed from ``reads`` (each one read off the socket)."""
    loop = asyncio.new_event_loop()
    try:
        conn = http1.Connection(_Pool(), ("http", "backend", 80))
        resp = http1.UpstreamResponse(conn, 5.0, loop)
        conn.response = resp
        for data in reads:
            conn.data_received(data)
        return resp
    finally:
        loop.close()


def _failure(resp: http1.UpstreamResponse) -> errors.UpstreamError | None:
    return resp._exc


def test_a_header_is_its_first_value_whatever_the_case() -> None:
    resp = _answer(b"HTTP/1.1 429 Too Many\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"content-type: text/html\r\nRETRY-AFTER: 7\r\nRetry-After: 9\r\n"
                   b"Content-Length: 2\r\n\r\nno")
    assert resp.status == 429 and resp.complete
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.header("content-type") == resp.header("CONTENT-TYPE")
    assert resp.content_type == "text/plain"     # the dispatcher's reading: the same header
    assert resp.header("retry-after") == "7"
    assert resp.header("retry-after-ms") is None
    assert resp.headers[1] == ("content-type", "text/html")   # all of them, as they came


def test_an_informational_heads_headers_and_trailers_are_not_the_answers() -> None:
    resp = _answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\nX-Early: 1\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n",
                   b"2\r\n{}\r\n0\r\nX-Trailer: planted\r\nContent-Type: text/html\r\n\r\n")
    assert resp.status == 200 and resp.complete and _failure(resp) is None
    assert resp.header("link") is None and resp.header("x-early") is None
    assert resp.header("x-trailer") is None
    assert resp.header("content-type") == "application/json"
    assert {k for k, _ in resp.headers} == {"Content-Type", "Transfer-Encoding"}


def _head_of(size: int) -> bytes:
    """A 200 head whose names and values hold ``size`` bytes in all."""
    fixed = len(b"Content-Length") + len(b"2") + len(b"X-Pad")
    return (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: " + b"p" * (size - fixed)
            + b"\r\n\r\n{}")


def test_a_head_at_its_byte_bound_is_an_answer_and_one_byte_more_is_refused() -> None:
    resp = _answer(_head_of(http1.MAX_HEAD_BYTES))
    assert resp.status == 200 and _failure(resp) is None
    refused = _failure(_answer(_head_of(http1.MAX_HEAD_BYTES + 1)))
    assert isinstance(refused, errors.UpstreamProtocolError)
    assert f"a head of over {http1.MAX_HEAD_BYTES} bytes" in str(refused)


def test_the_byte_bound_counts_informational_heads_too() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: " + b"l" * 40_000 + b"\r\n\r\n"
    refused = _failure(_answer(early, _head_of(30_000)))
    assert isinstance(refused, errors.UpstreamProtocolError)
    assert "a head of over" in str(refused)


def test_a_head_of_one_header_too_many_is_refused_before_its_end() -> None:
    # (the parser reports a header once the next one begins)
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(http1.MAX_HEADERS + 2))
    resp = _answer(b"HTTP/1.1 200 OK\r\n" + lines)      # the head has not ended
    refused = _failure(resp)
    assert isinstance(refused, errors.UpstreamProtocolError)
    assert f"over {http1.MAX_HEADERS} headers" in str(refused)
    assert len(resp.raw_headers) == http1.MAX_HEADERS + 1


TARGET = http1.Target("http://backend:8000/v1/chat/completions?x=1")


def test_a_request_head_is_written_as_before() -> None:
    assert http1.head("POST", TARGET, {"Content-Type": "application/json",
                                       "x-request-id": "r1"}, b"{}") == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: backend:8000\r\n"
        b"Accept-Encoding: identity\r\nContent-Length: 2\r\n"
        b"Content-Type: application/json\r\nx-request-id: r1\r\n\r\n")
    assert http1.head("GET", TARGET, {}, b"") == (
        b"GET /v1/chat/completions?x=1 HTTP/1.1\r\nHost: backend:8000\r\n"
        b"Accept-Encoding: identity\r\n\r\n")


@pytest.mark.parametrize("bad", ["\r", "\n", "\0", "\r\n"])
@pytest.mark.parametrize("where", ["name", "value"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_request_header_with_a_cr_lf_or_nul_anywhere_is_refused(
        bad: str, where: str, position: int) -> None:
    headers = {"a": "1", "b": "2", "c": "3"}
    name = list(headers)[position]
    if where == "name":
        headers[name + bad + "x"] = headers.pop(name)
        name = name + bad + "x"
    else:
        headers[name] = "v" + bad + "Injected: yes"
    with pytest.raises(ValueError, match="CR, LF or NUL") as raised:
        http1.head("POST", TARGET, headers, b"")
    assert repr(name) in str(raised.value)
