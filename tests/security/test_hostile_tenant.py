"""A hostile tenant's findings (issue 14), each reproduced against real processes.

One section per finding, each kept by the helper who fixed it; a section's fixtures are
its own (module-scoped: starting processes is the slow part). The shared security fleet
(``conftest.secure``: two replicas, an agent with simulators and the MiniLM embedder) is
used where a finding needs an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import json
import pathlib
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import yaml
from aiohttp import web

from protos.synapse.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from synapse_common import ports
from tests import fleet, harness, node_auth
from tests.security import test_agent_auth
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


@pytest.mark.parametrize("path", [CHAT, "/v1/messages"])
def test_a_body_of_more_messages_than_the_limit_is_a_400_before_any_work(
        plain: EdgeGateway, path: str) -> None:
    # A tenant's body of 110,000 one-letter messages (3 MiB) cost the control plane most
    # of a second of its one core (the cache key, the tokenizer and the block hashes walk
    # every message), stalling every other tenant's requests; refused after parsing now.
    body = json.dumps({"model": "llama", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "x"}] * 25_000}).encode()
    assert len(body) < 1024 * 1024     # under the fleet's http.max_body_bytes
    reply = _post(plain, path, body, key=fleet.TENANT_KEY)
    assert reply.status == 400, reply.body[:300]
    message = reply.json()["error"]["message"]     # OpenAI's envelope, or Anthropic's
    assert message.startswith("messages: array too long") and "http.max_messages" in message
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


# ======================================================================================
# Findings 1, 2, 3, 6 (helper "agent-embed"): Node.Embed without a credential, the shared
# embedding cache as a membership oracle, agent registration without a token, abandoned
# embedding work piling up. Real processes: a control plane, an agent embedding through
# TEI (the engine simulator in TEI mode, or a TEI stand-in the test holds), `synapse up`.
# ======================================================================================

EMBED_PATH = "/v1/embeddings"
AGENT_NODE = "embed-node"


@dataclasses.dataclass
class EmbedStack:
    url: str             # control plane HTTP
    grpc: str            # control plane gRPC
    node: str            # the agent's Node service
    agent_metrics: str   # the agent's /metrics
    bodies: list[bytes] = dataclasses.field(default_factory=list)


def _agent_metric(url: str, name: str) -> float:
    """A sample of the agent's /metrics (NaN when absent)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def _embed_agent_config(tmp: pathlib.Path, cp_grpc: list[str], tei_url: str,
                        **embedder: object) -> tuple[dict[str, object], str]:
    cfg = fleet.agent_config(AGENT_NODE, cp_grpc, {}, tmp / "engines", tei_url=tei_url)
    cfg["embedder"] = {**cfg["embedder"], **embedder}  # type: ignore[dict-item]
    metrics_port = ports.free_port()
    cfg["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    return cfg, f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def embed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbedStack]:
    """A control plane (tenants team and other, the agent token) and one agent whose
    embedder is TEI (the engine simulator in TEI mode, which the control plane does not
    know as a backend, so /v1/embeddings goes through the agent's Node.Embed)."""
    tmp = tmp_path_factory.mktemp("agent-embed")
    pool = harness.ProcessPool(tmp)
    http_port, grpc_port, tei_port = ports.free_port(), ports.free_port(), ports.free_port()
    cp = fleet.controlplane_config("embed-cp", http_port, grpc_port, tmp / "data",
                                   logging={"level": "debug"})
    agent, metrics = _embed_agent_config(tmp, [f"127.0.0.1:{grpc_port}"],
                                         f"http://127.0.0.1:{tei_port}")
    url = f"http://127.0.0.1:{http_port}"
    stack = EmbedStack(url, f"127.0.0.1:{grpc_port}", agent["grpc"]["advertise_address"],  # type: ignore[index]
                       metrics)
    try:
        pool.start("tei", fleet.tei_argv(tei_port), ready_url=f"http://127.0.0.1:{tei_port}/health")
        pool.start("controlplane", ["synapse", "controlplane", "--config",
                                    str(fleet.write_yaml(tmp / "cp.yaml", cp))],
                   ready_url=f"{url}/health", timeout=60)
        proc = pool.start("agent", ["synapse", "agent", "--config",
                                    str(fleet.write_yaml(tmp / "agent.yaml", agent))])
        harness.wait_until(lambda: fleet.node_embeds(stack.node), 60, "the agent's Node.Embed",
                           proc=proc, interval=0.2)
        harness.wait_until(lambda: _embeds_over_http(url), 60,
                           "/v1/embeddings through the agent", proc=proc, interval=0.2)
        yield stack
    finally:
        pool.stop_all()
    leaks = fleet.scan_for_secrets(fleet.log_files(tmp), stack.bodies)
    assert not leaks, f"configured secrets found in logs or error bodies: {leaks}"


def _embeddings(url: str, texts: list[str], key: str = fleet.TENANT_KEY) -> fleet.Reply:
    body = json.dumps({"model": fleet.EMBED, "input": texts}).encode()
    return fleet.request(url, "POST", EMBED_PATH, body, key=key)


def _embeds_over_http(url: str) -> bool:
    try:
        return _embeddings(url, ["ready?"]).status == 200
    except OSError:
        return False


def _node_embed(address: str, texts: list[str], metadata: list[tuple[str, str | bytes]],
                ) -> node_pb2.EmbedResponse:
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        return node_pb2_grpc.NodeStub(channel).Embed(
            node_pb2.EmbedRequest(model=fleet.EMBED, texts=texts), metadata=metadata,
            timeout=60)


# -- finding 1: Node.Embed needs the control plane's credential; per-call limits -----------


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong-token")],
                                      [("authorization", fleet.AGENT_TOKEN)],
                                      [("authorization", f"Bearer {fleet.ADMIN_KEY}")]],
                         ids=["none", "wrong", "no-scheme", "admin-key"])
def test_node_embed_without_the_agent_token_is_unauthenticated(
        embed_stack: EmbedStack, metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _node_embed(embed_stack.node, ["Is Acme about to be acquired by Initech?"], metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert fleet.AGENT_TOKEN not in (info.value.details() or "")


def test_one_huge_call_is_refused_before_it_reaches_the_model(embed_stack: EmbedStack) -> None:
    # the probe that blocked the embedder for everyone: 256 texts of 32,000 characters
    with pytest.raises(grpc.RpcError) as info:
        _node_embed(embed_stack.node, ["x" * 32_000] * 256, node_auth.metadata(tenant="team"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "characters" in (info.value.details() or "")
    assert fleet.node_embeds(embed_stack.node)  # and the embedder is free for the next call


def test_embeddings_over_a_text_limit_are_413_naming_no_address(embed_stack: EmbedStack) -> None:
    reply = _embeddings(embed_stack.url, ["fine", "y" * 33_000])  # the agent takes 32,768
    embed_stack.bodies.append(reply.body)
    assert reply.status == 413 and reply.is_envelope(), reply.body[:300]
    err = reply.json()["error"]
    assert err["param"] == "input" and "texts[1]" in err["message"]
    assert "127.0.0.1" not in reply.body.decode() and embed_stack.node not in reply.body.decode()


def test_the_cached_flags_never_leave_the_control_plane(embed_stack: EmbedStack) -> None:
    text = "a sentence only this test sends, twice"
    first, again = (_embeddings(embed_stack.url, [text]) for _ in range(2))
    assert first.status == again.status == 200
    assert first.json() == again.json()  # nothing in the body tells a repeat from a first
    volatile = {"x-request-id", "date"}
    assert {k: v for k, v in first.headers.items() if k not in volatile} == \
        {k: v for k, v in again.headers.items() if k not in volatile}
    assert "cached" not in first.body.decode()


# -- finding 2: one tenant's embeddings tell another nothing --------------------------------


def test_another_tenants_prompt_is_not_a_hit_in_the_agents_cache(embed_stack: EmbedStack,
                                                                  ) -> None:
    secret = "Is Acme about to be acquired by Initech? (finding 2)"
    hits = "synapse_agent_embedding_cache_hits_total"
    assert _embeddings(embed_stack.url, [secret], fleet.TENANT_KEY).status == 200
    before = _agent_metric(embed_stack.agent_metrics, hits)
    assert _embeddings(embed_stack.url, [secret], fleet.OTHER_KEY).status == 200
    assert _agent_metric(embed_stack.agent_metrics, hits) == before, \
        "tenant other's request for tenant team's prompt was answered from team's entry"
    assert _embeddings(embed_stack.url, [secret], fleet.TENANT_KEY).status == 200
    assert _agent_metric(embed_stack.agent_metrics, hits) == before + 1  # team's own repeat


def test_node_embed_partitions_its_cache_by_the_tenant_the_control_plane_names(
        embed_stack: EmbedStack) -> None:
    text = "Q3 numbers before the earnings call (finding 2)"

    def cached(tenant: str) -> list[bool]:
        reply = _node_embed(embed_stack.node, [text], node_auth.metadata(tenant=tenant))
        return list(reply.cached)

    assert (cached("team"), cached("other"), cached("team"), cached("other")) == \
        ([False], [False], [True], [True])


# -- finding 3: agent registration needs the token ------------------------------------------


def _nodes(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListNodes(
            admin_pb2.ListNodesRequest(), timeout=10,
            metadata=[("authorization", f"Bearer {fleet.ADMIN_KEY}")])
    return sorted(n.name for n in reply.nodes)


@pytest.fixture(scope="module")
def agent_doors(tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[tuple[harness.ProcessPool, pathlib.Path]]:
    tmp = tmp_path_factory.mktemp("agent-doors")
    pool = harness.ProcessPool(tmp)
    try:
        yield pool, tmp
    finally:
        pool.stop_all()


def _tokenless_pair(pool: harness.ProcessPool, tmp: pathlib.Path, name: str,
                    **auth: object) -> tuple[str, harness.ManagedProcess]:
    """A control plane on loopback with no agent token (and ``auth`` extra), and an agent
    without one dialling it; returns the control plane's gRPC address and the agent."""
    http_port, grpc_port = ports.free_port(), ports.free_port()
    cp = fleet.controlplane_config(name, http_port, grpc_port, tmp / f"data-{name}",
                                   cache={"enabled": False})
    del cp["auth"]["agent_token"]
    cp["auth"].update(auth)
    pool.start(f"cp-{name}", ["synapse", "controlplane", "--config",
                              str(fleet.write_yaml(tmp / f"{name}.yaml", cp))],
               ready_url=f"http://127.0.0.1:{http_port}/health", timeout=60)
    agent = fleet.agent_config(f"{name}-agent", [f"127.0.0.1:{grpc_port}"], {},
                               tmp / f"engines-{name}")
    del agent["control_plane"]["token"]
    proc = pool.start(f"agent-{name}", ["synapse", "agent", "--config",
                                        str(fleet.write_yaml(tmp / f"{name}-agent.yaml", agent))])
    return f"127.0.0.1:{grpc_port}", proc


def test_without_a_token_no_agent_registers(agent_doors: tuple[harness.ProcessPool,
                                                               pathlib.Path]) -> None:
    pool, tmp = agent_doors
    address, agent = _tokenless_pair(pool, tmp, "closed")
    # the agent keeps dialling; the control plane says why it refuses, and lists no node
    # (a refusal lost under load is dialled again after reporter.ANSWER_TIMEOUT_S, plus
    # the reconnect backoff: room for two rounds on a loaded machine)
    harness.wait_until(lambda: "UNAUTHENTICATED" in agent.output(), 60,
                       "the agent to be refused", proc=agent, interval=0.2)
    assert "no auth.agent_token" in agent.output()
    err = test_agent_auth._register(address, ())  # a Connect as the agent would send it
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert _nodes(address) == []


def test_allow_unauthenticated_agents_is_the_explicit_way_to_open_the_door(
        agent_doors: tuple[harness.ProcessPool, pathlib.Path]) -> None:
    pool, tmp = agent_doors
    address, agent = _tokenless_pair(pool, tmp, "open", allow_unauthenticated_agents=True)
    harness.wait_until(lambda: _nodes(address) == ["open-agent"], 30,
                       "the tokenless agent to register", proc=agent, interval=0.2)


def test_a_control_plane_reachable_from_other_machines_without_a_token_does_not_start(
        tmp_path: pathlib.Path) -> None:
    cp = fleet.controlplane_config("wide", ports.free_port(), ports.free_port(), tmp_path,
                                   grpc={"host": "0.0.0.0", "port": ports.free_port()})
    del cp["auth"]["agent_token"]
    run = subprocess.run([harness.console_script("synapse"), "controlplane", "--config",
                          str(fleet.write_yaml(tmp_path / "cp.yaml", cp))],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr[-500:]
    assert "auth.agent_token" in run.stderr and "0.0.0.0" in run.stderr
    assert "allow_unauthenticated_agents" in run.stderr and "Traceback" not in run.stderr


def test_synapse_up_generates_an_agent_token_and_its_agent_registers_with_it(
        tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    up = harness.ManagedProcess(
        "synapse-up", [harness.console_script("synapse"), "up", "--data-dir", str(data),
                       "--http-port", "0", "--grpc-port", "0", "--upstream",
                       "http://127.0.0.1:9"], tmp_path / "up.log")
    try:
        harness.wait_until(lambda: (data / "agent.yaml").exists(), 60, "the configs", proc=up)
        cp = yaml.safe_load((data / "controlplane.yaml").read_text())
        admin = (data / "secrets" / "admin-key").read_text().strip()
        address = f"127.0.0.1:{cp['grpc']['port']}"

        def registered() -> bool:
            try:
                with grpc.insecure_channel(address) as channel:
                    nodes = admin_pb2_grpc.AdminStub(channel).ListNodes(
                        admin_pb2.ListNodesRequest(), timeout=5,
                        metadata=[("authorization", f"Bearer {admin}")]).nodes
                return [n.name for n in nodes] == ["local"]
            except grpc.RpcError:
                return False

        harness.wait_until(registered, 120, "the embedded agent to register", proc=up,
                           interval=0.5)
    finally:
        up.stop(timeout=30)
    token_file = data / "secrets" / "agent-token"
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token_file.stat().st_mode & 0o777 == 0o600
    agent = yaml.safe_load((data / "agent.yaml").read_text())
    assert cp["auth"]["agent_token"] == agent["control_plane"]["token"] == \
        {"file": str(token_file)}
    assert not fleet.scan_for_secrets(fleet.log_files(tmp_path), [], [token])


# -- finding 6: abandoned embedding work leaves the queue; the queue is bounded -------------


class GatedTei:
    """A TEI stand-in whose /embed answers only once the test opens the gate; it records
    every batch it was asked to embed."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.port = ports.free_port()
        app = web.Application()
        app.router.add_get("/info", self._info)
        app.router.add_get("/health", self._health)
        app.router.add_post("/embed", self._embed)
        self.runner = web.AppRunner(app)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_id": fleet.EMBED, "model_sha": "gated",
                                  "max_client_batch_size": 64})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _embed(self, request: web.Request) -> web.Response:
        texts = (await request.json())["inputs"]
        self.batches.append(texts)
        await self.gate.wait()
        return web.json_response([[float(len(t)), 1.0] for t in texts])

    async def __aenter__(self) -> GatedTei:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.gate.set()
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def _gated_agent(tmp: pathlib.Path, **embedder: object,
                       ) -> AsyncIterator[tuple[GatedTei, node_pb2_grpc.NodeStub, str]]:
    """An agent (no control plane needed) embedding through a gated TEI; yields the TEI,
    an authenticated Node stub and the agent's /metrics URL."""
    async with GatedTei() as tei:
        tei.gate.set()  # open until the agent is up (its readiness probe embeds a text)
        cfg, metrics = _embed_agent_config(tmp, [], f"http://127.0.0.1:{tei.port}", **embedder)
        pool = harness.ProcessPool(tmp)
        try:
            proc = pool.start("agent", ["synapse", "agent", "--config",
                                        str(fleet.write_yaml(tmp / "agent.yaml", cfg))])
            address = cfg["grpc"]["advertise_address"]  # type: ignore[index]
            await asyncio.to_thread(harness.wait_until, lambda: fleet.node_embeds(address), 60,
                                    "the agent's Node.Embed", proc=proc)
            tei.gate.clear()
            tei.batches.clear()
            async with node_auth.aio_channel(address, tenant="team") as channel:
                yield tei, node_pb2_grpc.NodeStub(channel), metrics
        finally:
            tei.gate.set()
            await asyncio.to_thread(pool.stop_all)


async def _queued(metrics: str, texts: int) -> None:
    name = "synapse_agent_embed_queue_texts"
    await harness.until(lambda: _agent_metric(metrics, name) == texts, 30,
                        f"{texts} texts queued at the agent")


def _embed_call(stub: node_pb2_grpc.NodeStub, texts: list[str],
                timeout: float = 60) -> Any:
    return stub.Embed(node_pb2.EmbedRequest(texts=texts), timeout=timeout)


async def test_embed_calls_given_up_on_leave_the_queue_and_are_never_computed(
        tmp_path: pathlib.Path) -> None:
    async with _gated_agent(tmp_path, request_timeout_s=60) as (tei, stub, metrics):
        running = _embed_call(stub, ["on the model"])
        await harness.until(lambda: tei.batches == [["on the model"]], 30, "the first batch")
        cancelled = _embed_call(stub, ["cancelled by its caller"])
        expired = _embed_call(stub, ["past the caller's budget"], timeout=4.0)
        await _queued(metrics, 2)
        cancelled.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await expired  # the control plane's budget: the deadline ends the call
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _queued(metrics, 0)  # both left the queue while the model was still busy
        kept = _embed_call(stub, ["still wanted"])
        await _queued(metrics, 1)
        tei.gate.set()
        assert len((await running).vectors) and len((await kept).vectors)
    assert tei.batches == [["on the model"], ["still wanted"]]


async def test_a_full_embed_queue_sheds_load_with_resource_exhausted(
        tmp_path: pathlib.Path) -> None:
    async with _gated_agent(tmp_path, queue_max_texts=4, request_timeout_s=60) as (
            tei, stub, metrics):
        running = _embed_call(stub, ["on the model"])
        await harness.until(lambda: bool(tei.batches), 30, "the first batch")
        waiting = [_embed_call(stub, [f"q{i}a", f"q{i}b"]) for i in range(2)]
        await _queued(metrics, 4)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _embed_call(stub, ["one more"], timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in (info.value.details() or "")
        assert _agent_metric(metrics, "synapse_agent_embed_queue_texts") == 4
        tei.gate.set()
        for call in (running, *waiting):
            assert len((await call).vectors)
    assert sorted(t for batch in tei.batches for t in batch) == \
        ["on the model", "q0a", "q0b", "q1a", "q1b"]
