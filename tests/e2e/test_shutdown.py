"""SIGTERM as an operator sees it, through the real processes: ``synapse controlplane``
in front of a ``synapse simulator`` that decodes slowly.

* From SIGTERM on, ``/ready`` answers 503 while the process still serves for
  ``http.drain_delay_s``: a request in flight, and one sent during the drain, finish whole.
* What still runs when ``http.shutdown_grace_s`` ends is ended cleanly: a stream gets its
  error event and the end of its body (not a connection cut mid-chunk), a request not yet
  answered gets 503 ``server_shutting_down``; the access log counts both as errors, not
  as clients gone (499).
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import fleet, harness

MSGS = [{"role": "user", "content": "Write a very long story about a lighthouse."}]
LONG = 4000         # tokens of an answer no grace in this module waits for
SHORT = 40          # tokens of an answer that finishes within the drain


Stack = Callable[..., tuple[str, harness.ManagedProcess]]


@pytest.fixture
def stack(tmp_path: pathlib.Path) -> Iterator[Stack]:
    """Starts a simulator and a control plane with the given ``http`` settings and drain
    delay; stops them at teardown."""
    pool = harness.ProcessPool(tmp_path)

    def start(drain_delay_s: float, **http: Any) -> tuple[str, harness.ManagedProcess]:
        up = fleet.start_simulated(
            pool, tmp_path, time_scale=1, cache={"enabled": False},
            http={**http, "upstream_first_byte_timeout_s": 60, "upstream_idle_timeout_s": 60},
            env={"SYNAPSE_HTTP__DRAIN_DELAY_S": str(drain_delay_s)})
        return up.base, up.cp

    try:
        yield start
    finally:
        pool.stop_all()


def _post(base: str, tokens: int, stream: bool,
          path: str = "/v1/chat/completions") -> socket.socket:
    """Send a chat request over a raw socket (HTTP/1.1, the connection closed after it)."""
    body = json.dumps({"model": "llama", "messages": MSGS, "max_tokens": tokens,
                       "ignore_eos": True, "stream": stream}).encode()
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {fleet.TENANT_KEY}\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(head + body)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        piece = sock.recv(65536)
        assert piece, got[-500:]
        got += piece
    return got


def _read_all(sock: socket.socket, got: bytes = b"") -> bytes:
    with sock:
        while piece := sock.recv(65536):
            got += piece
    return got


def _dechunk(raw: bytes) -> tuple[bytes, bool]:
    """A chunked body's bytes, and whether it ended with its last (empty) chunk."""
    body, rest = b"", raw
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            return body + rest[:size], False
        body, rest = body + rest[:size], rest[size + 2:]
    return body, False


def _access_lines(cp: harness.ManagedProcess,
                  path: str = "/v1/chat/completions") -> list[str]:
    return [line for line in cp.output().splitlines() if path in line and "status=" in line]


@pytest.mark.parametrize(("path", "fast_lane", "flowing"), [
    ("/v1/chat/completions", True, b'"content":"'),
    ("/v1/chat/completions", False, b'"content":"'),        # aiohttp's path
    ("/v1/messages", True, b"content_block_delta")])        # aiohttp's, Anthropic's shape
def test_a_stream_cut_by_the_end_of_the_grace_gets_its_error_event_and_its_end(
        stack: Stack, path: str, fast_lane: bool, flowing: bytes) -> None:
    base, cp = stack(0, shutdown_grace_s=1, fast_lane=fast_lane)
    sock = _post(base, LONG, stream=True, path=path)
    got = _read_until(sock, flowing)            # the stream is flowing
    cp.signal(signal.SIGTERM)
    raw = _read_all(sock, got)
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body, ended = _dechunk(chunked)
    assert ended, body[-300:]                   # the body's end, not a cut mid-transfer
    last_event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    name, _, data = last_event.rpartition(b"data: ")
    last = json.loads(data)
    assert "shutting down" in last["error"]["message"], last
    if path == "/v1/messages":                  # Anthropic's error event
        assert name.startswith(b"event: error") and last["type"] == "error", last_event
    assert cp.wait(timeout=30) == 0
    (line,) = _access_lines(cp, path)
    assert "status=499" not in line and "broken=True" in line, line


def test_a_request_not_answered_by_the_end_of_the_grace_gets_503(stack: Stack) -> None:
    base, cp = stack(0, shutdown_grace_s=1)
    sock = _post(base, LONG, stream=False)
    harness.wait_until(lambda: _in_flight(base), 10, "the request at the engine")
    cp.signal(signal.SIGTERM)
    head, _, body = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), head
    assert json.loads(body)["error"]["code"] == "server_shutting_down"
    assert cp.wait(timeout=30) == 0
    (line,) = _access_lines(cp)
    assert "status=503" in line, line


def _in_flight(base: str) -> bool:
    """Whether the control plane has a request at its backend (its /metrics)."""
    status, _, text = harness.http(base + "/metrics", key=fleet.ADMIN_KEY)
    return status == 200 and any(
        ln.startswith("synapse_backend_inflight_requests{") and not ln.endswith(" 0.0")
        for ln in text.decode().splitlines())


def test_after_sigterm_ready_is_503_while_requests_in_flight_finish_whole(
        stack: Stack) -> None:
    # the drain delay is the window for the second request (the listener closes after
    # it): seconds to spare for a loaded machine's /ready polls before that request
    base, cp = stack(10, shutdown_grace_s=60)
    # ready once the registry has synced (a while after the backend routes, on a busy host)
    harness.wait_until(lambda: harness.http(base + "/ready")[0] == 200, 30, "/ready 200",
                       proc=cp)
    answers: dict[str, bytes] = {}

    def ask(name: str) -> None:
        answers[name] = _read_all(_post(base, SHORT * 4, stream=True))
    first = threading.Thread(target=ask, args=("in flight",))
    first.start()
    harness.wait_until(lambda: _in_flight(base), 10, "the request at the engine")
    cp.signal(signal.SIGTERM)
    harness.wait_until(lambda: harness.http(base + "/ready")[0] == 503, 8,
                       "/ready to answer 503")
    ask("during the drain")                     # the listener is still open: served
    first.join(timeout=60)
    assert cp.wait(timeout=60) == 0
    for name, raw in answers.items():
        head, _, chunked = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (name, head)
        body, ended = _dechunk(chunked)
        assert ended and body.rstrip().endswith(b"data: [DONE]"), (name, body[-300:])
        assert b'"error"' not in body, name


def _pod_of_two(pool: harness.ProcessPool, redis: harness.RedisServer,
                tmp_path: pathlib.Path, shutdown_grace_s: float, drain_delay_s: float = 0.0
                ) -> tuple[str, harness.ManagedProcess]:
    """A control plane of ``http.workers: 2`` before a simulator at real timings, both
    workers taking connections: (its base URL, its process)."""
    up = fleet.start_simulated(
        pool, tmp_path, time_scale=1, name="pod", cache={"enabled": False},
        env={"SYNAPSE_HTTP__DRAIN_DELAY_S": str(drain_delay_s)},
        http={"workers": 2, "shutdown_grace_s": shutdown_grace_s,
              "upstream_first_byte_timeout_s": 60, "upstream_idle_timeout_s": 60},
        redis={"url": redis.url, "timeout_s": 1.0})
    harness.wait_until(lambda: "serving worker 1 of 2" in up.cp.output(), 60,
                       "the serving worker", proc=up.cp)
    return up.base, up.cp


def test_a_pod_of_two_processes_ends_every_stream_cleanly(tmp_path: pathlib.Path) -> None:
    """``http.workers: 2``: the primary passes SIGTERM to its worker, and each process cuts
    its own streams at the end of its grace with the error event (connections spread over
    both by the kernel)."""
    pool = harness.ProcessPool(tmp_path)
    redis = harness.RedisServer(tmp_path)
    try:
        base, cp = _pod_of_two(pool, redis, tmp_path, shutdown_grace_s=1)
        socks = [_post(base, LONG, stream=True) for _ in range(8)]
        started = [_read_until(sock, b'"content":"') for sock in socks]
        cp.signal(signal.SIGTERM)
        for sock, got in zip(socks, started, strict=True):
            body, ended = _dechunk(_read_all(sock, got).partition(b"\r\n\r\n")[2])
            assert ended, body[-300:]
            last = json.loads(body.rstrip(b"\n").rsplit(b"data: ", 1)[-1])
            assert "shutting down" in last["error"]["message"], last
        assert cp.wait(timeout=60) == 0
    finally:
        pool.stop_all()
        redis.stop()


def _ask_kept_alive(sock: socket.socket, tokens: int, stream: bool) -> bytes:
    """One chat request on a kept-alive connection; its answer's head (the body read
    by its length or chunks, the connection left as the server leaves it)."""
    body = json.dumps({"model": "llama", "messages": MSGS, "max_tokens": tokens,
                       "ignore_eos": True, "stream": stream}).encode()
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: cp\r\n"
                  f"Authorization: Bearer {fleet.TENANT_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  ).encode() + body)
    got = _read_until(sock, b"\r\n\r\n")
    head, _, rest = got.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    if "transfer-encoding: chunked" in lines:
        while not _dechunk(rest)[1]:
            piece = sock.recv(65536)
            assert piece, rest[-300:]
            rest += piece
    else:
        length = int(next(ln.split(":")[1] for ln in lines if ln.startswith("content-length")))
        while len(rest) < length:
            piece = sock.recv(65536)
            assert piece, rest[-300:]
            rest += piece
    return head


@pytest.mark.parametrize("fast_lane", [True, False])
@pytest.mark.parametrize("stream", [False, True])
def test_answers_during_the_drain_close_their_connection(
        stack: Stack, fast_lane: bool, stream: bool) -> None:
    """A client pooling its connections (kube-proxy's, an ingress's upstream keep-alive)
    is told to open a new one, which goes to another pod, rather than keep this one idle
    until the listener closes it under its next request."""
    base, cp = stack(60, shutdown_grace_s=60, fast_lane=fast_lane)
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    with sock:
        head = _ask_kept_alive(sock, 3, stream)
        assert b"connection: close" not in head.lower(), head        # kept alive before
        cp.signal(signal.SIGTERM)
        harness.wait_until(lambda: harness.http(base + "/ready")[0] == 503, 30,
                           "/ready to answer 503")
        head = _ask_kept_alive(sock, 3, stream)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"\r\nconnection: close" in head.lower(), head
        assert sock.recv(1) == b""                  # and closed after it
    cp.signal(signal.SIGTERM)                       # (a second signal: no 60 s drain)
    assert cp.wait(timeout=30) == 0


def test_a_second_signal_ends_the_drain_and_cuts_what_runs(stack: Stack) -> None:
    """Ctrl-C twice, or an operator's second SIGTERM: the process stops now, a stream in
    flight ended cleanly as at the end of the grace, not after the drain and the grace."""
    base, cp = stack(120, shutdown_grace_s=120)
    sock = _post(base, LONG, stream=True)
    got = _read_until(sock, b'"content":"')
    cp.signal(signal.SIGTERM)
    harness.wait_until(lambda: harness.http(base + "/ready")[0] == 503, 30,
                       "/ready to answer 503")
    cp.signal(signal.SIGTERM)
    assert cp.wait(timeout=30) == 0                 # far within the drain
    body, ended = _dechunk(_read_all(sock, got).partition(b"\r\n\r\n")[2])
    assert ended, body[-300:]
    last = json.loads(body.rstrip(b"\n").rsplit(b"data: ", 1)[-1])
    assert "shutting down" in last["error"]["message"], last


@pytest.mark.parametrize(("listener", "grace_s", "within_s"), [
    ("metrics.port", 1, 30),    # /metrics is not drained: aiohttp's 60 s were the bound
    ("http.port", 10, 20)])     # an answer being written is cut with the rest (not 2x)
def test_a_client_that_stops_reading_does_not_hold_the_stop(
        tmp_path: pathlib.Path, listener: str, grace_s: float, within_s: float) -> None:
    """A client that asked for answers and stopped reading them (its buffers full: a
    stalled scraper, a client gone without closing) does not keep the process from
    exiting within the pod's grace: what is still being written when the grace ends is
    cut with the requests in flight."""
    pool = harness.ProcessPool(tmp_path)
    port = harness.free_port()
    try:
        up = fleet.start_simulated(pool, tmp_path, cache={"enabled": False},
                                   http={"shutdown_grace_s": grace_s},
                                   metrics={"port": port})
        if listener == "http.port":
            port = int(up.base.rsplit(":", 1)[1])
            ask = b"GET /health HTTP/1.1\r\nHost: cp\r\n\r\n"
        else:
            ask = b"GET /metrics HTTP/1.1\r\nHost: cp\r\n\r\n"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        with sock:
            sock.setblocking(False)
            for _ in range(3_000_000):  # requests sent, their answers never read...
                try:
                    sock.send(ask)
                except BlockingIOError:     # ...until the server stops reading them too
                    if not select.select([], [sock], [], 1.0)[1]:
                        break
            else:
                pytest.fail("the server kept reading requests it could not answer")
            up.cp.signal(signal.SIGTERM)
            assert up.cp.wait(timeout=within_s) == 0
    finally:
        pool.stop_all()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signalled_process_group_gives_a_pods_requests_their_grace(
        tmp_path: pathlib.Path, sig: signal.Signals) -> None:
    """Ctrl-C at a terminal, or a SIGTERM to the pod's whole process group (systemd's
    KillMode=control-group, kill -- -PGID), signals the primary and its serving workers
    alike, and the primary then signals its workers: once is one stop in every process
    (requests in flight finish whole), not a first and a second signal in the workers,
    which cut them at once. Ctrl-C skips the drain in the workers too."""
    pool = harness.ProcessPool(tmp_path)
    redis = harness.RedisServer(tmp_path)
    try:
        base, cp = _pod_of_two(pool, redis, tmp_path, shutdown_grace_s=60, drain_delay_s=2)
        socks = [_post(base, SHORT * 4, stream=True) for _ in range(8)]
        started = [_read_until(sock, b'"content":"') for sock in socks]
        os.killpg(cp.popen.pid, sig)
        for sock, got in zip(socks, started, strict=True):
            body, ended = _dechunk(_read_all(sock, got).partition(b"\r\n\r\n")[2])
            assert ended and body.rstrip().endswith(b"data: [DONE]"), body[-300:]
            assert b'"error"' not in body
        assert cp.wait(timeout=60) == 0
        stops = [line for line in cp.output().splitlines() if "stopping: serving" in line]
        assert len(stops) == 2, stops                    # the primary and its worker
        drains = {"serving 0s more" in line for line in stops}
        assert drains == ({True} if sig == signal.SIGINT else {False}), stops
        assert "second SIGTERM" not in cp.output()
    finally:
        pool.stop_all()
        redis.stop()
