"""The fast lane against aiohttp, as an attacker probes a new HTTP parser: the same raw
bytes go to a control plane with ``http.fast_lane`` on and to one with it off, and what
comes back must be the same — each answer's status and error code (and an echoed
``x-request-id``), whether the connection is left open, any bytes that are not an answer,
and the requests the backend received, in order. A request aiohttp refuses that the lane
serves, a body framed differently, bytes lost or given to the wrong request, a hang or a
500 all show as a difference.

Every case runs at once, against both servers, on its own connection (a case's requests
carry its name, so the backend's bodies are told apart); the tests then compare the two
observations of each case.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import gzip
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from controlplane.api import app as app_mod
from controlplane.api import readiness
from controlplane.api import server as server_mod
from controlplane.api import services as services_mod
from tests import harness
from tests.controlplane import cp_testing as t

QUIET_S = 4.0       # no byte for this long: the connection is open and has said all
BODY_TIMEOUT_S = 1.5
MAX_BODY = 64 * 1024
MAX_HEAD = 4096
CRLF = b"\r\n"
CHAT = b"/v1/chat/completions"
AUTH = b"Authorization: Bearer " + t.KEY_A.encode()


def body(tag: str, chat: bool = True, stream: bool = False) -> bytes:
    """A request body whose prompt is ``tag`` (how the backend's copy is attributed)."""
    fields: dict[str, object] = {"model": t.MODEL, "max_tokens": 4, "stream": stream}
    if chat:
        fields["messages"] = [{"role": "user", "content": tag}]
    else:
        fields["prompt"] = tag
    return json.dumps(fields).encode()


def request(tag: str, *, method: bytes = b"POST", target: bytes = CHAT,
            version: bytes = b"HTTP/1.1", extra: tuple[bytes, ...] = (),
            host: bool = True, auth: bool = True, length: bytes | None = None,
            payload: bytes | None = None, eol: bytes = CRLF, stream: bool = False) -> bytes:
    """A raw request: ``extra`` header lines after the usual ones; ``length`` replaces the
    Content-Length value (``b"-"``: no such header); ``payload`` replaces the body."""
    data = body(tag, chat=b"chat" in target, stream=stream) if payload is None else payload
    lines = [method + b" " + target + b" " + version]
    if host:
        lines.append(b"Host: x")
    if auth:
        lines.append(AUTH)
    lines.append(b"Content-Type: application/json")
    if length != b"-":
        lines.append(b"Content-Length: " + (b"%d" % len(data) if length is None else length))
    lines.extend(extra)
    return eol.join(lines) + eol + eol + data


MODELS = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n\r\n"
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


def split(data: bytes, size: int) -> tuple[bytes, ...]:
    return tuple(data[i:i + size] for i in range(0, len(data), size))


WAIT = b"<wait for an answer>"     # in a case's pieces: read one answer, then write on
EOF = b"<half-close>"              # in a case's pieces: shut the client's side for writing


@dataclasses.dataclass(frozen=True)
class Case:
    """Bytes to send, in pieces; ``reference`` the pieces aiohttp gets instead, for the
    few cases where aiohttp's own quirk must be stepped around (see :func:`_cases`)."""

    pieces: tuple[bytes, ...]
    reference: tuple[bytes, ...] | None = None


def _cases() -> dict[str, Case]:
    """Each case's bytes, written in the pieces given (a short pause between pieces).

    aiohttp parses every byte it has read before it serves any request, so a fault in a
    later message read with an earlier one makes it refuse both (one 400, the earlier
    request never served): ``reference`` gives it the later bytes after the earlier
    answer, which is what the lane does (it parses one message at a time, and RFC 9112
    has a server ignore what follows ``Connection: close``)."""
    c: dict[str, Case] = {}

    def one(name: str, data: bytes) -> None:
        c[name] = Case((data,))

    # -- the plain requests, as a baseline
    one("plain", request("plain#0"))
    one("completions", request("completions#0", target=b"/v1/completions"))
    one("stream", request("stream#0", stream=True))
    one("bad_json", request("bad_json#0", payload=b'{"model": '))
    one("no_auth", request("no_auth#0", auth=False))
    # -- Content-Length and Transfer-Encoding: smuggling shapes
    b = body("cl_te#0")
    one("cl_te", request("", length=b"%d" % len(b), payload=chunked(b),
                         extra=(b"Transfer-Encoding: chunked",)) + request("cl_te#1"))
    one("te_cl", request("", length=b"-", payload=chunked(body("te_cl#0")),
                         extra=(b"Transfer-Encoding: chunked", b"Content-Length: 3"))
        + request("te_cl#1"))
    one("te_identity", request("te_identity#0", extra=(b"Transfer-Encoding: identity",)))
    one("te_chunked_gzip", request("", length=b"-", payload=chunked(body("te_chunked_gzip#0")),
                                   extra=(b"Transfer-Encoding: gzip, chunked",)))
    one("te_obs_name", request("te_obs_name#0", extra=(b"Transfer-Encoding : chunked",)))
    one("te_xchunked", request("te_xchunked#0", extra=(b"Transfer-Encoding: xchunked",)))
    b = body("cl_dup_equal#0")
    one("cl_dup_equal", request("", payload=b, extra=(b"Content-Length: %d" % len(b),)))
    smuggled = request("cl_dup_diff#1")
    one("cl_dup_diff", request("", payload=b + smuggled,
                               extra=(b"Content-Length: %d" % (len(b) + len(smuggled)),)))
    one("cl_comma", request("", payload=b, length=b"%d, %d" % (len(b), len(b))))
    b = body("cl_plus#0")
    one("cl_plus", request("", payload=b, length=b"+%d" % len(b)))
    b = body("cl_ws#0")
    one("cl_ws", request("", payload=b, length=b"  %d \t" % len(b)))
    one("cl_inner_space", request("", payload=b, length=b"%d %d" % (len(b) // 10,
                                                                      len(b) % 10)))
    b = body("cl_zeros#0")
    one("cl_zeros", request("", payload=b, length=b"000%d" % len(b)))
    one("cl_huge", request("cl_huge#0", length=b"9" * 30))
    one("cl_2_64", request("cl_2_64#0", length=b"18446744073709551616"))
    one("cl_over_limit", request("cl_over_limit#0", length=b"%d" % (MAX_BODY + 1)))
    for name, size in (("body_at_limit", MAX_BODY), ("body_over_limit", MAX_BODY + 1)):
        tag = f"{name}#0"
        padded = body(tag + "x" * (size - len(body(tag))))
        assert len(padded) == size
        one(name, request("", payload=padded) + request(f"{name}#1"))
    one("cl_negative", request("cl_negative#0", length=b"-5"))
    one("cl_hex", request("cl_hex#0", length=b"0x10"))
    one("cl_empty", request("cl_empty#0", length=b""))
    one("cl_unicode_digit", request("cl_unicode_digit#0", length=b"\xb2"))
    one("cl_absent", request("cl_absent#0", length=b"-"))
    one("cl_absent_no_body", request("", length=b"-", payload=b""))
    one("cl_zero", request("", length=b"0", payload=b"") + request("cl_zero#1"))
    # -- header syntax
    one("obs_fold", request("obs_fold#0", extra=(b"X-A: a", b" b")))
    one("obs_fold_cl", request("obs_fold_cl#0", extra=(b"X-A: a",), length=b"\r\n 10"))
    one("obs_fold_te", request("obs_fold_te#0",
                               extra=(b"X-A: a", b" Transfer-Encoding: chunked")))
    one("first_header_folded", request("first_header_folded#0").replace(
        b"HTTP/1.1\r\nHost", b"HTTP/1.1\r\n Host", 1))
    one("bare_lf", request("bare_lf#0", eol=b"\n"))
    one("bare_lf_then_crlf", request("bare_lf_then_crlf#0", eol=b"\n")
        + request("bare_lf_then_crlf#1"))
    one("bare_lf_one_line", request("bare_lf_one_line#0").replace(b"Host: x\r\n",
                                                                   b"Host: x\n", 1))
    one("bare_lf_end", request("bare_lf_end#0").replace(b"\r\n\r\n", b"\r\n\n", 1)
        + request("bare_lf_end#1"))
    one("bare_cr", request("bare_cr#0").replace(b"Host: x\r\n", b"Host: x\r", 1))
    one("name_space", request("name_space#0", extra=(b"X A: 1",)))
    one("name_space_colon", request("name_space_colon#0", extra=(b"X-A : 1",)))
    one("name_bad_char", request("name_bad_char#0", extra=(b"X(A): 1",)))
    one("name_non_ascii", request("name_non_ascii#0", extra=(b"X-\xe9: 1",)))
    one("name_empty", request("name_empty#0", extra=(b": 1",)))
    one("no_colon", request("no_colon#0", extra=(b"X-A",)))
    one("nul_value", request("nul_value#0", extra=(b"X-A: a\x00b",)))
    one("ctl_value", request("ctl_value#0", extra=(b"X-A: a\x01b",)))
    one("del_value", request("del_value#0", extra=(b"X-A: a\x7fb",)))
    one("latin1_value", request("latin1_value#0", extra=(b"X-A: caf\xe9",)))
    one("utf8_request_id", request("utf8_request_id#0", extra=(b"X-Request-Id: rid-\xc3\xa9",)))
    one("utf8_session", request("utf8_session#0", extra=(b"X-Session-Id: s\xc3\xa9",)))
    one("bad_utf8_session", request("bad_utf8_session#0", extra=(b"X-Session-Id: s\xff",)))
    one("ws_session", request("ws_session#0", extra=(b"X-Session-Id: s1 ",)))
    one("ws_cache_control", request("ws_cache_control#0", extra=(b"Cache-Control: no-store ",)))
    one("cl_long_zeros", request("", payload=body("cl_long_zeros#0"),
                                 length=b"0" * 200 + b"%d" % len(body("cl_long_zeros#0"))))
    one("ws_request_id", request("ws_request_id#0", extra=(b"X-Request-Id: rid-1 \t ",)))
    one("ws_auth", request("ws_auth#0", auth=False, extra=(AUTH + b"  ",)))
    # headers the serving path reads
    tp = b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    one("traceparent", request("traceparent#0", extra=(tp,)))
    one("traceparent_ws", request("traceparent_ws#0", extra=(tp + b"  ",)))
    one("traceparent_bad", request("traceparent_bad#0", extra=(b"traceparent: 00-zz",)))
    one("priority", request("priority#0", extra=(b"x-synapse-priority: high ",)))
    one("priority_bad", request("priority_bad#0", extra=(b"x-synapse-priority: \xff",)))
    one("x_api_key", request("x_api_key#0", auth=False,
                             extra=(b"x-api-key: " + t.KEY_A.encode(),)))
    one("no_cache", request("no_cache#0", extra=(b"Cache-Control: no-cache",)))
    one("accept_gzip", request("accept_gzip#0", extra=(b"Accept-Encoding: gzip",)))
    one("cookie", request("cookie#0", extra=(b"Cookie: a=b; c=d",)))
    one("bearer_lower", request("bearer_lower#0", auth=False,
                                extra=(b"authorization: bearer " + t.KEY_A.encode(),)))
    one("no_host", request("no_host#0", host=False))
    one("dup_host", request("dup_host#0", extra=(b"Host: y",)))
    one("dup_content_type", request("dup_content_type#0",
                                    extra=(b"Content-Type: text/plain",)))
    one("dup_user_agent", request("dup_user_agent#0", extra=(b"User-Agent: a",
                                                             b"User-Agent: b")))
    one("dup_auth", request("dup_auth#0", extra=(b"Authorization: Bearer sk-other",)))
    one("gzip_body", request("", payload=gzip.compress(body("gzip_body#0")),
                             extra=(b"Content-Encoding: gzip",)))
    one("identity_encoding", request("identity_encoding#0",
                                     extra=(b"Content-Encoding: identity",)))
    one("ws_key1", request("ws_key1#0", extra=(b"Sec-WebSocket-Key1: 4 @1  46546xW%0l 1 5",)))
    # -- the request target
    one("absolute_form", request("absolute_form#0", target=b"http://x" + CHAT))
    one("query", request("query#0", target=CHAT + b"?a=1"))
    one("empty_query", request("empty_query#0", target=CHAT + b"?"))
    one("fragment", request("fragment#0", target=CHAT + b"#f"))
    one("percent", request("percent#0", target=b"/v1/chat/%63ompletions"))
    one("double_slash", request("double_slash#0", target=b"/" + CHAT))
    one("trailing_slash", request("trailing_slash#0", target=CHAT + b"/"))
    one("dot_segment", request("dot_segment#0", target=b"/v1/x/../chat/completions"))
    one("upper_path", request("upper_path#0", target=b"/V1/chat/completions"))
    one("long_url", request("long_url#0", target=CHAT + b"?" + b"a" * (MAX_HEAD + 100)))
    one("long_url_fits", request("long_url_fits#0", target=CHAT + b"?" + b"a" * 3000))
    one("non_ascii_url", request("non_ascii_url#0", target=CHAT + b"\xc3\xa9"))
    # -- method and version
    one("lower_post", request("lower_post#0", method=b"post"))
    one("get_lane_path", request("get_lane_path#0", method=b"GET"))
    one("put_lane_path", request("put_lane_path#0", method=b"PUT"))
    one("http10", request("http10#0", version=b"HTTP/1.0"))
    one("http10_keep_alive", request("http10_keep_alive#0", version=b"HTTP/1.0",
                                     extra=(b"Connection: keep-alive",))
        + request("http10_keep_alive#1", version=b"HTTP/1.0"))
    one("http12", request("http12#0", version=b"HTTP/1.2"))
    one("http2_version", request("http2_version#0", version=b"HTTP/2.0"))
    one("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + request("http2_preface#1"))
    one("http09", b"POST " + CHAT + b"\r\n\r\n")
    one("leading_crlf", CRLF + request("leading_crlf#0"))
    one("leading_empty_lines", CRLF * 2 + request("leading_empty_lines#0"))
    one("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    # -- framing: bodies shorter, longer, split
    b = body("cl_short#0")
    short = request("", payload=b, length=b"%d" % (len(b) - 3))
    c["cl_short"] = Case((short,), (short[:-3], WAIT, short[-3:]))
    after = short[-3:] + request("cl_short_pipelined#1")
    c["cl_short_pipelined"] = Case((short[:-3] + after,), (short[:-3], WAIT, after))
    b = body("cl_short_smuggle#0")
    inner = request("cl_short_smuggle#1")
    one("cl_short_smuggle", request("", payload=b + inner, length=b"%d" % len(b)))
    b = body("cl_long#0")
    one("cl_long", request("", payload=b, length=b"%d" % (len(b) + 10)))
    b = body("cl_long_pipelined#0")
    long = request("", payload=b, length=b"%d" % (len(b) + 10))
    after = request("cl_long_pipelined#1")
    c["cl_long_pipelined"] = Case((long + after,), (long + after[:10], WAIT, after[10:]))
    c["split_body"] = Case(split(request("split_body#0" + "x" * 2000), 97))
    whole = request("split_head#0")
    end = whole.index(b"\r\n\r\n") + 4
    c["split_head"] = Case((*split(whole[:end], 23), whole[end:]))
    whole = request("split_end#0")
    end = whole.index(b"\r\n\r\n")
    c["split_end"] = Case((whole[:end + 1], whole[end + 1:end + 3], whole[end + 3:]))
    c["split_pipeline"] = Case(split(b"".join(request(f"split_pipeline#{i}")
                                              for i in range(4)), 101))
    # -- pipelining and the connection
    one("pipelined_mix", request("pipelined_mix#0") + MODELS
        + request("pipelined_mix#1", target=b"/v1/completions") + HEALTH
        + request("pipelined_mix#2") + MODELS + request("pipelined_mix#3", stream=True))
    one("pipelined_many", b"".join(request(f"pipelined_many#{i}") for i in range(12)))
    first, rest = request("pipelined_then_garbage#0"), (b"BLAH\r\n\r\n"
                                                        + request("pipelined_then_garbage#1"))
    c["pipelined_then_garbage"] = Case((first + rest,), (first, WAIT, rest))
    first, rest = request("close#0", extra=(b"Connection: close",)), request("close#1")
    c["close"] = Case((first + rest,), (first, WAIT, rest))
    one("close_upper", request("close_upper#0", extra=(b"Connection: CLOSE",)))
    one("close_in_list", request("close_in_list#0", extra=(b"Connection: keep-alive, close",)))
    one("keep_alive", request("keep_alive#0", extra=(b"Connection: keep-alive",))
        + request("keep_alive#1"))
    one("connection_upgrade", request("connection_upgrade#0", extra=(b"Connection: upgrade",)))
    one("upgrade_ws", request("upgrade_ws#0", extra=(b"Connection: Upgrade",
                                                     b"Upgrade: websocket")))
    one("upgrade_h2c", request("upgrade_h2c#0", extra=(b"Connection: Upgrade, HTTP2-Settings",
                                                       b"Upgrade: h2c",
                                                       b"HTTP2-Settings: AAMAAABkAARAAAAA")))
    whole = request("expect#0", extra=(b"Expect: 100-continue",))
    end = whole.index(b"\r\n\r\n") + 4
    c["expect"] = Case((whole[:end], whole[end:]))
    one("expect_other", request("expect_other#0", extra=(b"Expect: something",)))
    c["half_close"] = Case((request("half_close#0"), EOF))
    c["half_close_pipelined"] = Case((request("half_close_pipelined#0")
                                      + request("half_close_pipelined#1"), EOF))
    one("pipelined_big", b"".join(request(f"pipelined_big#{i}" + "x" * 50_000)
                                  for i in range(8)))
    one("pipelined_big_then_other", b"".join(request(f"pipelined_big_then_other#{i}"
                                                     + "x" * 50_000) for i in range(6))
        + MODELS + request("pipelined_big_then_other#6", stream=True)
        + request("pipelined_big_then_other#7", version=b"HTTP/1.0"))
    first = request("two_connection_headers#0", extra=(b"Connection: keep-alive",
                                                       b"Connection: close"))
    rest = request("two_connection_headers#1")
    c["two_connection_headers"] = Case((first + rest,), (first, WAIT, rest))
    one("request_line_two_spaces", request("request_line_two_spaces#0",
                                           target=b" " + CHAT))
    one("request_line_tab", request("request_line_tab#0").replace(b" HTTP/1.1", b"\tHTTP/1.1"))
    one("empty_host", request("empty_host#0", host=False, extra=(b"Host:",)))
    one("host_trailing_ws", request("host_trailing_ws#0", host=False, extra=(b"Host: x \t",)))
    one("version_trailing_space", request("version_trailing_space#0", version=b"HTTP/1.1 "))
    whole = request("half_close_mid_body#0")
    c["half_close_mid_body"] = Case((whole[:-20], EOF))
    c["half_close_mid_head"] = Case((whole[:40], EOF))
    one("stream_in_pipeline", request("stream_in_pipeline#0", stream=True)
        + request("stream_in_pipeline#1") + request("stream_in_pipeline#2", stream=True))
    one("pipelined_after_bad_json", request("", payload=b"{") + request("pipelined_after_bad_json#1"))
    one("pipelined_after_401", request("pipelined_after_401#0", auth=False)
        + request("pipelined_after_401#1"))
    one("pipelined_after_413", request("pipelined_after_413#0", length=b"%d" % (MAX_BODY + 1),
                                       payload=b"")
        + request("pipelined_after_413#1"))
    # -- sizes
    one("long_header", request("long_header#0", extra=(b"X-A: " + b"a" * (MAX_HEAD + 10),)))
    one("head_just_over", request("head_just_over#0", extra=(b"X-A: " + b"a" * (MAX_HEAD - 200),
                                                             b"X-B: " + b"b" * 300)))
    for n in (100, 127, 128, 129, 300):
        name = f"headers_{n}"
        one(name, request(f"{name}#0", extra=tuple(b"X-H%d: v" % i for i in range(n - 4))))
    return c


CASES = _cases()
# The same bytes in small pieces (a message boundary, a head's end, a header cut
# anywhere), not so small that a body outlasts BODY_TIMEOUT_S; served by servers of
# their own, as they carry the same prompts.
PIECES = {name: Case(split(case.pieces[0], 11)) for name, case in CASES.items()
          if len(case.pieces) == 1 and case.reference is None and len(case.pieces[0]) < 1500}


@dataclasses.dataclass(frozen=True)
class Seen:
    """What one case's bytes drew from one server."""

    answers: tuple[tuple[int, str | None, str | None], ...]  # status, error code, rid echo
    closed: bool                # the server closed the connection
    stray: bytes                # bytes that are not an answer
    upstream: tuple[str, ...]   # the prompts the backend received, in order


async def _answer(reader: asyncio.StreamReader,
                  ) -> tuple[int, str | None, str | None] | bytes | None:
    """The next answer; None at a clean end (or silence); the raw bytes when not one."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), QUIET_S)
    except TimeoutError:
        return None
    except asyncio.IncompleteReadError as exc:
        return exc.partial or None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 2 or not parts[1].isdigit():
        return head
    status = int(parts[1])
    headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:] if ln)}
    if status < 200:
        return status, None, None
    try:
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            data = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                data += (await reader.readexactly(size + 2))[:-2]
            await reader.readexactly(2)
        else:
            data = await reader.read()
    except (asyncio.IncompleteReadError, ValueError):
        return head
    code = None
    if status >= 400:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            code = json.loads(data)["error"]["code"]
    rid = headers.get("x-request-id", "")
    return status, code, rid if rid.startswith("rid") else None


async def _observe(port: int, pieces: tuple[bytes, ...],
                   ) -> tuple[list[tuple[int, str | None, str | None]], bool, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[tuple[int, str | None, str | None]] = []
    try:
        for i, piece in enumerate(pieces):
            if piece is WAIT:
                got = await _answer(reader)
                if not isinstance(got, tuple):
                    return answers, True, b"<no answer to wait for>"
                answers.append(got)
                continue
            if i:
                await asyncio.sleep(0.01)
            if piece is EOF:
                writer.write_eof()
            else:
                writer.write(piece)
            await writer.drain()
    except ConnectionError:
        pass    # the server closed: what it answered is still to be read
    try:
        while True:
            got = await _answer(reader)
            if isinstance(got, tuple):
                answers.append(got)
                continue
            if got is None:
                return answers, reader.at_eof(), b""
            return answers, True, got[:200]
    except ConnectionError:
        return answers, True, b"<reset>"
    finally:
        writer.close()


def _prompt(raw: bytes) -> str:
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        sent = json.loads(raw)
        return str(sent["messages"][0]["content"] if "messages" in sent else sent["prompt"])
    return "<unreadable> " + raw[:80].decode("latin-1")


@contextlib.asynccontextmanager
async def _serving(lane: bool) -> AsyncIterator[tuple[int, t.FakeBackend]]:
    async with t.backends(("b1", "ok")) as (b1,):
        # One tenant: every case is tenant a's, sent at once, and with a second tenant
        # configured a parse slowed by a busy machine would start a's loop-share clock
        # and space the rest by timing, not by what this test compares.
        s = t.round_robin(b1, http={"fast_lane": lane, "max_body_bytes": MAX_BODY,
                                    "max_header_bytes": MAX_HEAD,
                                    "body_timeout_s": BODY_TIMEOUT_S},
                          auth={"tenants": [{"name": "a", "keys": [t.KEY_A]}]})
        svc = services_mod.build(s)
        runner = server_mod.Runner(app_mod.create_app(s, services=svc),
                                   s.http, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        assert isinstance(runner.server, server_mod.LaneServer)
        assert (runner.server.lane is not None) is lane
        # The first health probe decides at once: on a busy machine it could time out
        # while the cases arrived, and every case answered 503 no_backend for its 5 s.
        await harness.until(lambda: readiness.check(svc)[0] == 200, 20, "the first probe")
        try:
            yield runner.addresses[0][1], b1
        finally:
            await runner.cleanup()


async def _observe_all(lane: bool, cases: dict[str, Case]) -> dict[str, Seen]:
    async with _serving(lane) as (port, backend):
        seen = await asyncio.gather(*(
            _observe(port, case.pieces if lane else case.reference or case.pieces)
            for case in cases.values()))
        prompts = [_prompt(raw) for raw in backend.bodies]
    out = {}
    backend_got: dict[str, list[str]] = {}
    for prompt in prompts:
        backend_got.setdefault(prompt.partition("#")[0], []).append(prompt)
    for name, (answers, closed, stray) in zip(cases, seen, strict=True):
        out[name] = Seen(tuple(answers), closed, stray, tuple(backend_got.pop(name, ())))
    out["<unattributed>"] = Seen((), False, b"", tuple(
        p for ps in backend_got.values() for p in ps))
    return out


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def observed() -> Iterator[dict[str, dict[str, Seen]]]:
    """Every case against both servers (both runs side by side, in one event loop).

    Earlier tests' garbage is collected first, outside any loop: a client an earlier test
    left open closes itself from its finaliser in whatever loop runs then, and would be
    counted here as this server's error."""
    gc.collect()
    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)

    async def all_runs() -> list[dict[str, Seen]]:
        return await asyncio.gather(*(_observe_all(lane, cases) for cases in (CASES, PIECES)
                                      for lane in (True, False)))
    try:
        lane, plain, lane_pieces, plain_pieces = asyncio.run(all_runs())
    finally:
        root.removeHandler(errors)
    lane.update({f"{name}/pieces": seen for name, seen in lane_pieces.items()})
    plain.update({f"{name}/pieces": seen for name, seen in plain_pieces.items()})
    yield {"lane": lane, "aiohttp": plain, "errors": {m: Seen((), False, b"", ())
                                                      for m in errors.records}}


@pytest.mark.parametrize("case", [*CASES, "<unattributed>",
                                  *(f"{name}/pieces" for name in PIECES),
                                  "<unattributed>/pieces"])
def test_the_lane_answers_as_aiohttp_does(observed: dict[str, dict[str, Seen]],
                                          case: str) -> None:
    assert observed["lane"][case] == observed["aiohttp"][case]


def test_nothing_is_logged_as_an_error(observed: dict[str, dict[str, Seen]]) -> None:
    assert list(observed["errors"]) == []
