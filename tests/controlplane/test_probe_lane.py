"""Findings of the hostile-tenant probe against the fast lane (controlplane.api.fast_lane),
each pinned on a real socket and compared with aiohttp's path (``http.fast_lane: false``)
serving the same bytes.

Each lane test failed before its fix, while the same bytes on aiohttp's path passed.
"""

from __future__ import annotations

import asyncio
import json

from tests.controlplane import cp_testing as t
from tests.controlplane import test_fast_lane as lane

BIG = 1024 * 1024      # a body far over what a head needs, within http.max_body_bytes


def _unauthenticated_head(length: int) -> bytes:
    """A chat request head with no key, announcing ``length`` bytes of body."""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


async def _status_before_body(fast_lane: bool) -> int:
    """The status a keyless chat request gets while its announced body is held back."""
    s = t.settings(http={"max_body_bytes": 4 * BIG, "body_timeout_s": 30.0,
                         "fast_lane": fast_lane})
    async with lane.serving(s) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_unauthenticated_head(BIG) + b"{")
        try:
            status, _, body = await asyncio.wait_for(lane.answer(reader), 3)
        finally:
            writer.close()
        assert json.loads(body)["error"]["code"] == "missing_api_key"
        return status


async def test_aiohttp_refuses_a_keyless_request_before_reading_its_body() -> None:
    """The rule the lane should keep (serving.py: authenticate, then read the body)."""
    assert await _status_before_body(fast_lane=False) == 401


async def test_the_lane_refuses_a_keyless_request_before_reading_its_body() -> None:
    """Probe finding: the lane held a keyless client's whole body (up to
    http.max_body_bytes) for up to http.body_timeout_s before the app saw the request:
    100 such connections added 400 MiB to a control plane."""
    assert await _status_before_body(fast_lane=True) == 401
