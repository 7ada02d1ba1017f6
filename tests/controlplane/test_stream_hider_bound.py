"""The cached-token counts of a backend whose prefix cache tenants share are hidden one
whole line at a time (:class:`controlplane.core.cache_salt.StreamHider`), and its
unfinished line is held only up to the longest answer the control plane assembles: a
hostile engine streaming without a line break has its stream ended with an error event
and its connection closed, instead of the control plane holding (and re-copying) it all."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import orjson
import pytest

from controlplane import errors
from controlplane.core import cache_salt, sse
from tests.controlplane import cp_testing as t
from tests.controlplane.endless_line import PIECE, EndlessLine

CAP = sse.ASSEMBLED_MAX
FIRST = {"id": "c1", "object": "chat.completion.chunk", "model": t.MODEL,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}
USAGE = {"prompt_tokens": 300, "completion_tokens": 2,
         "prompt_tokens_details": {"cached_tokens": 272}}


def test_a_line_that_never_ends_is_refused_past_the_longest_answer() -> None:
    hider = cache_salt.StreamHider()
    first = b"data: " + orjson.dumps(FIRST) + b"\n\n"
    assert hider.feed(first + PIECE) == first
    with pytest.raises(errors.UpstreamError, match="without a line break"):
        for _ in range(CAP // len(PIECE) + 1):
            assert hider.feed(PIECE) == b""
    assert hider.rest() == b"", "what it held is dropped, never passed on with its counts"


def test_a_line_up_to_the_limit_has_its_counts_hidden_in_any_pieces() -> None:
    line = b"data: " + orjson.dumps({"choices": [], "usage": USAGE})
    hider = cache_salt.StreamHider(limit=len(line))
    out = b"".join(hider.feed(line[i:i + 7]) for i in range(0, len(line), 7))
    out += hider.feed(b"\n\ndata: [DONE]\n\n") + hider.rest()
    assert b'"cached_tokens":0' in out and b"272" not in out, out
    assert out.endswith(b"\n\ndata: [DONE]\n\n")
    with pytest.raises(errors.UpstreamError):
        hider.feed(line + b"x")


async def test_a_hostile_engines_endless_line_ends_the_stream_with_an_error() -> None:
    hostile = EndlessLine("/v1/chat/completions", b"data: " + orjson.dumps(FIRST) + b"\n\n", total=3 * CAP)
    async with hostile.served() as url:
        # no kind: no cache_salt is sent, tenants a and b share its prefix cache, and
        # its answers' counts are hidden (the StreamHider holds its lines)
        s = t.settings(upstreams=[t.upstream("hostile", url)])
        async with t.running(s) as cp, aiohttp.ClientSession() as http, http.post(
                f"{cp.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {t.KEY_A}"},
                json={"model": t.MODEL, "stream": True,
                      "messages": [{"role": "user", "content": "Hi"}]}) as r:
            assert r.status == 200
            raw = await asyncio.wait_for(r.read(), 60)
            (backend,) = cp.services.registry.static_backends()
    assert backend.shares_cache, "the stand-in shares its prefix cache: counts are hidden"
    events = raw.strip().split(b"\n\n")
    assert len(events) == 2 and json.loads(events[0].removeprefix(b"data: ")) == FIRST, \
        raw[:300]
    error = json.loads(events[1].removeprefix(b"data: "))["error"]
    assert error["code"] == "stream_interrupted", error
    assert "without a line break" in error["message"]
    assert hostile.sent < 2 * CAP, "the engine was let go soon after the bound"
