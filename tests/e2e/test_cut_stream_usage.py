"""Streams cut short are billed, through the real processes: ``synapse controlplane`` in
front of ``synapse simulator``, a client that reads part of a long ``ignore_eos`` stream
and closes its socket, and ``synapsectl get usage`` reading what the tenant is billed.

The simulator stalls each stream after a fixed number of events (its stall fault, set
once a whole answer gave the prompt's token count as the engine counts it), so the client
always leaves while the answer is still being generated: the engine's usage
never comes, and the control plane records its own figures instead — the prompt's tokens
and the content deltas it relayed.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import socket
from collections.abc import Iterator

import pytest

from controlplane import ctl
from tests import fleet, harness

EVENTS = 240            # events the simulator sends before it stalls
CUTS = 3
MSGS = [{"role": "user", "content": "Write a very long story about a lighthouse."}]
PRICE = {"prompt_per_million": 1.0, "completion_per_million": 2.0}


@pytest.fixture
def stack(tmp_path: pathlib.Path) -> Iterator[tuple[str, int, str]]:
    pool = harness.ProcessPool(tmp_path)
    try:
        up = fleet.start_simulated(pool, tmp_path, time_scale=0,
                                   fairness={"prices": {fleet.MODEL: PRICE}})
        yield up.base, up.grpc_port, up.sim_url
    finally:
        pool.stop_all()


def read_then_close(base: str, events: int) -> int:
    """Stream a long answer as tenant team over a raw socket, read ``events`` SSE events
    and close the socket; the content deltas read."""
    body = json.dumps({"model": "llama", "messages": MSGS, "max_tokens": 250,
                       "ignore_eos": True, "stream": True}).encode()
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {fleet.TENANT_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    got = b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body)
        while got.count(b"data: ") < events:
            piece = s.recv(65536)
            assert piece, got[-500:]
            got += piece
    assert b" 200 " in got.split(b"\r\n", 1)[0]
    return got.count(b'"content":"') - got.count(b'"content":""')


def usage_rows(grpc: int, tenant: str) -> list[dict[str, object]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ctl.main(["--server", f"127.0.0.1:{grpc}", "get", "usage", "--tenant", tenant,
                         "-o", "json"], {"SYNAPSE_ADMIN_TOKEN": fleet.ADMIN_KEY})
    assert code == 0, err.getvalue()
    rows: list[dict[str, object]] = json.loads(out.getvalue())
    return rows


def test_a_client_that_cuts_its_streams_is_billed_for_what_it_received(
        stack: tuple[str, int, str]) -> None:
    base, grpc, sim = stack
    # The prompt's tokens as the engine counts them: an uncut answer of another tenant.
    status, _, raw = harness.http(base + "/v1/chat/completions", json.dumps(
        {"model": "llama", "messages": MSGS, "max_tokens": 4}).encode(), fleet.OTHER_KEY,
        timeout=30)
    assert status == 200, raw
    prompt = json.loads(raw)["usage"]["prompt_tokens"]
    status, _, raw = harness.http(sim + "/sim/faults", json.dumps(
        {"stall_after_chunks": EVENTS, "stall_s": 3}).encode())
    assert status == 200, raw
    read = [read_then_close(base, EVENTS) for _ in range(CUTS)]
    assert all(EVENTS - 2 <= n <= EVENTS for n in read), read

    def billed() -> list[dict[str, object]]:
        return usage_rows(grpc, "team")

    harness.wait_until(lambda: bool(billed()) and billed()[0]["requests"] == CUTS, 30,
                       "the cut streams to be accounted")
    (row,) = billed()
    assert row["prompt_tokens"] == CUTS * prompt
    # every delta the client read was relayed; a few more may have been in flight
    assert sum(read) <= int(str(row["completion_tokens"])) <= CUTS * EVENTS
    expected = (CUTS * prompt * PRICE["prompt_per_million"]
                + int(str(row["completion_tokens"])) * PRICE["completion_per_million"]) / 1e6
    assert row["cost"] == pytest.approx(expected)

    def estimated() -> object:      # a pod's workers see each other's rows once flushed
        return fleet.stats(base)["fairness"]["usage_today"][f"team/{fleet.MODEL}"].get(
            "estimated")

    harness.wait_until(lambda: estimated() == CUTS, 30, "the rows to say they are estimated")
    # and synapsectl get usage says so too
    harness.wait_until(lambda: billed()[0].get("estimated") == CUTS, 30,
                       "synapsectl get usage to say the rows are estimated")
