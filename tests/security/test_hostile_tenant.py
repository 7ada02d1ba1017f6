"""A hostile tenant's findings (issue 14), each reproduced against real processes.

One section per finding, each kept by the helper who fixed it; a section's fixtures are
its own (module-scoped: starting processes is the slow part). The shared security fleet
(``conftest.secure``: two replicas, an agent with simulators and the MiniLM embedder) is
used where a finding needs an agent.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from synapse_common import ports
from tests import fleet, harness
from tests.security.conftest import SecureFleet

CHAT = "/v1/chat/completions"


# ======================================================================================
# Findings 7, 8, 9 (helper "edge"): client input that yielded 5xx, slow clients never cut
# off, /metrics open to tenants and the admin key acting as a tenant.
# ======================================================================================

METRICS_TOKEN = "edge-metrics-token-3b5d7f9a1c2e4d60"
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEPALIVE_S = 1.0, 1.0, 2.0


@dataclasses.dataclass
class EdgeGateway:
    url: str                     # the API
    metrics_url: str = ""        # the metrics port (hardened gateway only)
    bodies: list[bytes] = dataclasses.field(default_factory=list)


class _OnceHealthy(http.server.BaseHTTPRequestHandler):
    """An upstream that passes its first health probe and then stops listening, so the
    control plane's next request to it is refused at connect time."""

    server: _OnceServer

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
        self.server.probed.set()

    def log_message(self, *args: object) -> None:
        return None


class _OnceServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OnceHealthy)
        self.probed = threading.Event()


@pytest.fixture(scope="module")
def edge_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[harness.ProcessPool,
                                                                          pathlib.Path, str]]:
    tmp = tmp_path_factory.mktemp("edge")
    pool = harness.ProcessPool(tmp)
    sim_port = ports.free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    try:
        pool.start("simulator", fleet.simulator_argv(sim_port, time_scale=0),
                   ready_url=f"{sim}/health")
        yield pool, tmp, sim
    finally:
        pool.stop_all()
    leaks = fleet.scan_for_secrets(fleet.log_files(tmp), [], (*fleet.SECRETS, METRICS_TOKEN))
    assert not leaks, f"configured secrets found in logs: {leaks}"


def _start_gateway(pool: harness.ProcessPool, tmp: pathlib.Path, name: str,
                   **sections: object) -> str:
    http_port, grpc_port = ports.free_port(), ports.free_port()
    cfg = fleet.controlplane_config(name, http_port, grpc_port, tmp / f"data-{name}",
                                    cache={"enabled": False}, logging={"level": "debug"},
                                    **sections)
    path = fleet.write_yaml(tmp / f"{name}.yaml", cfg)
    url = f"http://127.0.0.1:{http_port}"
    proc = pool.start(name, ["synapse", "controlplane", "--config", str(path)],
                      ready_url=f"{url}/health", timeout=60)
    harness.wait_until(lambda: harness.http_ok(f"{url}/ready"), 30, f"{name} routable",
                       proc=proc)
    return url


@pytest.fixture(scope="module")
def plain(edge_pool: tuple[harness.ProcessPool, pathlib.Path, str]) -> Iterator[EdgeGateway]:
    """A control plane with settings every version knows: the simulator, and an upstream
    that is gone after its first health probe (probed once an hour)."""
    pool, tmp, sim = edge_pool
    gone = _OnceServer()
    thread = threading.Thread(target=gone.serve_forever, daemon=True)
    thread.start()
    gone_url = f"http://127.0.0.1:{gone.server_address[1]}"
    try:
        url = _start_gateway(
            pool, tmp, "edge-plain",
            models=[{"name": fleet.MODEL, "aliases": ["llama"]}, {"name": "gone-model"}],
            upstreams=[{"name": "sim", "url": sim, "models": [fleet.MODEL]},
                       {"name": "gone", "url": gone_url, "models": ["gone-model"]}],
            registry={"upstream_probe_interval_s": 3600})
        assert gone.probed.wait(30), "the control plane never probed the upstream"
    finally:
        gone.shutdown()
        gone.server_close()         # connections to it are refused from now on
    gw = EdgeGateway(url)
    yield gw
    leaks = fleet.scan_for_secrets([], gw.bodies)
    assert not leaks, f"configured secrets in error bodies: {leaks}"


@pytest.fixture(scope="module")
def hardened(edge_pool: tuple[harness.ProcessPool, pathlib.Path, str]) -> EdgeGateway:
    """A control plane with short client time limits and /metrics on its own port behind
    a token."""
    pool, tmp, sim = edge_pool
    token_file = tmp / "metrics-token"
    token_file.write_text(METRICS_TOKEN + "\n")
    metrics_port = ports.free_port()
    url = _start_gateway(
        pool, tmp, "edge-hardened",
        upstreams=[{"name": "sim", "url": sim, "models": [fleet.MODEL]}],
        http={"host": "127.0.0.1", "header_timeout_s": HEADER_TIMEOUT_S,
              "body_timeout_s": BODY_TIMEOUT_S, "keepalive_timeout_s": KEEPALIVE_S},
        metrics={"port": metrics_port, "bearer_token_file": str(token_file)})
    return EdgeGateway(url, f"http://127.0.0.1:{metrics_port}")


def _post(gw: EdgeGateway, path: str, body: bytes, **kw: object) -> fleet.Reply:
    reply = fleet.request(gw.url, "POST", path, body, **kw)  # type: ignore[arg-type]
    if reply.status >= 400:
        gw.bodies.append(reply.body)
    return reply


def _raw_request(url: str, extra_headers: bytes, body: bytes | None = None) -> bytes:
    """A chat request whose extra header lines are sent as the given bytes."""
    body = fleet.chat_body() if body is None else body
    wire = (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer " + fleet.TENANT_KEY.encode() + b"\r\n" + extra_headers
            + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
            + body)
    return fleet.raw_exchange(url, wire)


def _status_and_headers(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# -- finding 7: client input that yielded 5xx ------------------------------------------


@pytest.mark.parametrize("value", ["日本", "café", "tab\there"])
def test_request_ids_outside_printable_ascii_are_replaced_not_a_500(plain: EdgeGateway,
                                                                     value: str) -> None:
    raw = _raw_request(plain.url, b"x-request-id: " + value.encode() + b"\r\n")
    status, headers, body = _status_and_headers(raw)
    assert status == 200, raw[:300]
    rid = headers[b"x-request-id"]
    assert rid.isascii() and rid != value.encode(), "a fresh id, not the client's"
    assert json.loads(body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("value", ["日本", "séance", "x" * 300])
def test_session_ids_outside_printable_ascii_are_a_400_naming_the_header(
        plain: EdgeGateway, value: str) -> None:
    raw = _raw_request(plain.url, b"x-session-id: " + value.encode() + b"\r\n")
    status, _, body = _status_and_headers(raw)
    assert status == 400, raw[:300]
    assert json.loads(body)["error"]["param"] == "x-session-id"


def test_deeply_nested_body_with_an_alias_is_a_400(plain: EdgeGateway) -> None:
    # The alias makes the control plane serialise the body again (orjson stops at 255).
    body = (b'{"model": "llama", "messages": [{"role": "user", "content": "x"}], '
            b'"metadata": ' + b"[" * 300 + b"]" * 300 + b"}")
    reply = _post(plain, CHAT, body)
    assert reply.status == 400 and reply.is_envelope(), reply.body[:300]
    assert "http.max_json_depth" in reply.json()["error"]["message"]
    fleet.still_serving(plain.url)


def test_a_refused_connection_to_an_upstream_never_names_its_address(plain: EdgeGateway,
                                                                      ) -> None:
    body = json.dumps({"model": "gone-model",
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = _post(plain, CHAT, body)
    assert reply.status == 502 and reply.is_envelope(), reply.body[:300]
    message = reply.json()["error"]["message"]
    assert "static/gone" in message and "cannot connect" in message
    assert "127.0.0.1" not in reply.body.decode(), message


def test_an_oversized_header_is_refused_in_the_envelope_without_echoing_it(
        plain: EdgeGateway) -> None:
    wire = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"secretish" * 8000
            + b"\r\nConnection: close\r\n\r\n")
    status, headers, body = _status_and_headers(fleet.raw_exchange(plain.url, wire))
    assert 400 <= status < 500
    assert headers[b"content-type"].startswith(b"application/json")
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_http" and "http.max_header_bytes" in err["message"]
    assert b"secretish" not in body
    fleet.still_serving(plain.url)


def test_max_tokens_beyond_every_backends_context_is_a_400_naming_it(secure: SecureFleet,
                                                                    ) -> None:
    body = fleet.chat_body(max_tokens=100_000_000)
    reply = fleet.request(secure.urls[0], "POST", CHAT, body)
    secure.bodies.append(reply.body)
    assert reply.status == 400 and reply.is_envelope(), reply.body[:300]
    err = reply.json()["error"]
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"


def test_embeddings_over_the_agents_limits_are_a_client_error_naming_no_address(
        secure: SecureFleet) -> None:
    body = json.dumps({"model": "sentence-transformers/all-MiniLM-L6-v2",
                       "input": ["x"] * 3000}).encode()   # the agent takes 2048 per call
    reply = fleet.request(secure.urls[0], "POST", "/v1/embeddings", body)
    secure.bodies.append(reply.body)
    assert reply.status in (400, 413) and reply.is_envelope(), reply.body[:300]
    assert reply.json()["error"]["param"] == "input"
    assert "127.0.0.1" not in reply.body.decode()


# -- finding 8: slow clients are cut off --------------------------------------------------


def _drip(url: str, first: bytes, byte: bytes, every_s: float, for_s: float) -> bytes | None:
    """Send ``first``, then ``byte`` every ``every_s`` for at most ``for_s``; return what
    the server answered once it closed the connection, or None if it never did."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=every_s) as s:
        s.sendall(first)
        got = b""
        end = time.monotonic() + for_s
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    return got
                got += chunk
            except TimeoutError:
                pass
            except ConnectionResetError:
                return got
            try:
                s.sendall(byte)
            except (BrokenPipeError, ConnectionResetError):
                return got
    return None


def test_a_request_head_sent_one_byte_at_a_time_is_cut_off(hardened: EdgeGateway) -> None:
    results: list[bytes | None] = []

    def slow_client() -> None:
        results.append(_drip(hardened.url, b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ",
                             b"a", 0.5, 10 * HEADER_TIMEOUT_S + 5))

    clients = [threading.Thread(target=slow_client) for _ in range(20)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    assert results == [b""] * 20, "every slow connection was closed by the server"
    fleet.still_serving(hardened.url)


def test_a_request_body_sent_one_byte_at_a_time_is_a_408(hardened: EdgeGateway) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer " + fleet.TENANT_KEY.encode()
            + b"\r\nContent-Length: 1000\r\n\r\n{")
    answer = _drip(hardened.url, head, b" ", 0.5, 10 * BODY_TIMEOUT_S + 5)
    assert answer is not None, "the server kept the connection"
    status, _, body = _status_and_headers(answer)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    fleet.still_serving(hardened.url)


def test_a_connection_that_sends_nothing_is_closed(hardened: EdgeGateway) -> None:
    assert _drip(hardened.url, b"", b"", 0.5, 10 * KEEPALIVE_S + 5) == b""


# -- finding 9: /metrics and the admin key ---------------------------------------------------


def test_metrics_on_their_own_port_behind_a_token(hardened: EdgeGateway) -> None:
    on_api = fleet.request(hardened.url, "GET", "/metrics", key=None)
    assert on_api.status == 404 and on_api.is_envelope()
    for key in (None, "not-the-token", fleet.TENANT_KEY, fleet.ADMIN_KEY):
        reply = fleet.request(hardened.metrics_url, "GET", "/metrics", key=key)
        assert reply.status == 401 and reply.is_envelope(), (key, reply.body[:200])
        assert b"synapse_requests_total" not in reply.body
    fleet.still_serving(hardened.url)
    ok = fleet.request(hardened.metrics_url, "GET", "/metrics", key=METRICS_TOKEN)
    assert ok.status == 200 and b'synapse_requests_total{model="' in ok.body


def test_the_admin_key_is_refused_on_v1(plain: EdgeGateway) -> None:
    for method, path, body in (("POST", CHAT, fleet.chat_body()),
                               ("GET", "/v1/models", None)):
        reply = fleet.request(plain.url, method, path, body, key=fleet.ADMIN_KEY)
        plain.bodies.append(reply.body)
        assert reply.status == 403 and reply.is_envelope(), reply.body[:200]
        assert reply.json()["error"]["code"] == "admin_key_not_a_tenant"
    assert fleet.request(plain.url, "GET", "/api/v1/stats", key=fleet.ADMIN_KEY).status == 200
