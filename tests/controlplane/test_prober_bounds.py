"""What a backend's health path can cost the control plane, and what it may answer: a
probe judges the status alone (2xx is healthy, a 204 too), follows no redirect, and reads
a few bytes of the body at most, none of them from what whole answers may hold
(:data:`controlplane.adapters.http1.BUDGET`)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane import errors
from controlplane.adapters import http1, prober
from tests.controlplane.test_upstream import Conn, client, on_both_loops, serving
from tests.controlplane.test_upstream_bounds import refused, sending

MIB = 1 << 20
PROBE_LIMIT_S = 10.0     # the stalled probe's time limit, far beyond reading a head


@on_both_loops
async def test_a_health_path_answering_204_is_healthy() -> None:
    """The relay's refusal of 204 (no answer to relay) applied to probes too: an nginx
    ``return 204;`` health path made its backend unhealthy for good."""
    for status, framing in ((204, b""), (205, b"Content-Length: 0\r\n")):
        no_content = sending(b"HTTP/1.1 %d No Content\r\n%s\r\n" % (status, framing))
        async with serving(no_content) as srv, client() as c:
            assert await prober.probe(c, prober.Target(key="static/x",
                                                       url=srv.url + "/health"))
            await refused(c, srv.url, rf"status {status}, which is never relayed")


@on_both_loops
async def test_a_redirect_is_unhealthy_and_not_followed() -> None:
    moved = sending(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/health\r\n"
                    b"Content-Length: 0\r\n\r\n")
    async with serving(moved) as srv, client() as c:
        target = prober.Target(key="static/x", url=srv.url + "/health")
        assert not await prober.probe(c, target)
        assert len(srv.requests) == 1
        ok = prober.Target(key="static/x", url=srv.url + "/health",
                           ok_statuses=frozenset({302}))
        assert await prober.probe(c, ok), "a status the target names stays healthy"


async def large_then_stall(conn: Conn) -> None:
    await conn.read_request()
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * MIB))
    await conn.send(b"x" * (3 * MIB - 1))       # the last byte never comes
    await conn.wait_closed_by_peer()


@on_both_loops
async def test_a_probe_holds_no_budget() -> None:
    """A probe read the whole body against the shared budget: a health path sending a
    large body and then stalling held it until the probe's time limit, and another
    tenant's large answer was refused meanwhile."""
    budget = http1.BUDGET
    limit, budget.limit = budget.limit, 4 * MIB
    honest = sending(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * MIB)
                     + b"y" * (2 * MIB))
    try:
        async with serving(large_then_stall) as bad, serving(honest) as good, client() as c:
            started = asyncio.get_running_loop().time()
            healthy = await prober.probe(c, prober.Target(
                key="static/bad", url=bad.url + "/health", timeout_s=PROBE_LIMIT_S))
            assert healthy, "the status is all a probe needs"
            # half the probe's time limit: a loaded machine may take seconds to read the
            # head, and a probe that waited for the end takes the whole limit
            assert asyncio.get_running_loop().time() - started < PROBE_LIMIT_S / 2, \
                "it waited for the end"
            assert budget.held == 0
            resp = await c.send("POST", good.url + "/v1/embeddings", b"{}", {})
            try:
                assert len(await resp.read()) == 2 * MIB
            finally:
                resp.close()
    finally:
        budget.limit = limit


@on_both_loops
async def test_a_redirect_to_a_relayed_request_is_still_refused() -> None:
    moved = sending(b"HTTP/1.1 307 X\r\nLocation: http://elsewhere.example/\r\n"
                    b"Content-Length: 0\r\n\r\n")
    async with serving(moved) as srv, client() as c:
        with pytest.raises(errors.UpstreamProtocolError, match="never relayed"):
            resp = await c.send("POST", srv.url + "/v1/chat/completions", b"{}", {})
            resp.close()
