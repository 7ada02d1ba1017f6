"""A Responses stream's unfinished line is held only up to the longest answer the control
plane assembles (:class:`controlplane.core.response_ids.WholeLines`): a hostile engine
streaming without a line break has its stream ended with an ``error`` event and its
connection closed, instead of the control plane holding (and re-copying) all of it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from controlplane import errors
from controlplane.core import response_ids as ids
from controlplane.core import sse
from tests.controlplane import cp_testing as t
from tests.controlplane.endless_line import PIECE, EndlessLine

CAP = sse.ASSEMBLED_MAX
CREATED = {"type": "response.created", "sequence_number": 0,
           "response": {"id": "resp_engine1", "object": "response", "status": "in_progress",
                        "model": t.MODEL, "output": []}}


def test_a_line_that_never_ends_is_refused_past_the_longest_answer() -> None:
    lines = ids.WholeLines()
    first = b"event: response.created\ndata: {}\n"
    assert lines.feed(first + PIECE) == first
    with pytest.raises(errors.UpstreamError, match="without a line break"):
        for _ in range(CAP // len(PIECE) + 1):
            assert lines.feed(PIECE) == b""
    assert lines.rest() == b"", "what it held is dropped, never passed on unrewritten"


def test_a_line_up_to_the_limit_passes_whole_in_any_pieces() -> None:
    lines = ids.WholeLines(limit=10)
    assert lines.feed(b"a" * 4) == b"" and lines.feed(b"a" * 6) == b""
    assert lines.held == 10
    assert lines.feed(b"\nb") == b"a" * 10 + b"\n" and lines.rest() == b"b"
    assert lines.feed(b"c" * 25 + b"\r\n") == b"c" * 25 + b"\r\n", "a whole line is not held"
    with pytest.raises(errors.UpstreamError):
        lines.feed(b"\n" + b"d" * 11)


async def test_a_hostile_engines_endless_line_ends_the_stream_with_an_error() -> None:
    hostile = EndlessLine("/v1/responses", f"event: response.created\ndata: {json.dumps(CREATED)}\n\n".encode(), total=3 * CAP)
    async with hostile.served() as url:
        # a vLLM (it takes a cache_salt): no other filter holds the stream's lines
        s = t.settings(upstreams=[{"name": "hostile", "url": url, "kind": "vllm",
                                   "models": [t.MODEL], "tasks": ["responses"]}])
        async with t.running(s) as cp, aiohttp.ClientSession() as http, http.post(
                f"{cp.url}/v1/responses", headers={"Authorization": f"Bearer {t.KEY_A}"},
                json={"model": t.MODEL, "input": "Hi", "stream": True}) as r:
            raw = await asyncio.wait_for(r.read(), 60)
    events = raw.strip().split(b"\n\n")
    assert len(events) == 2 and events[0].startswith(b"event: response.created"), raw[:300]
    assert b"resp_engine1_" in events[0], "the id it did see is sealed"
    name, data = events[1].split(b"\n")
    assert name == b"event: error"
    error = json.loads(data.removeprefix(b"data: "))
    assert error["code"] == "stream_interrupted" and error["sequence_number"] == 1
    assert "without a line break" in error["message"]
    assert hostile.sent < 2 * CAP, "the engine was let go soon after the bound"
