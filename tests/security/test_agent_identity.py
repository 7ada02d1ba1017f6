"""Agents that prove which node they are: a real control plane with ``auth.agent_review``
asks a stand-in Kubernetes API server about the service-account token each agent presents
(``control_plane.token_file``), and lets it register as the node the token is bound to
and no other. The agent holds no shared secret: the keys its engines and Node service
require are its own (agent.node_keys), and the control plane presents them, so serving
and the semantic cache's ``Node.Embed`` work through it."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, controlplane_pb2, controlplane_pb2_grpc
from tests import fleet, harness
from tests.controlplane.test_token_review import jwt

AGENT_SA = "system:serviceaccount:synapse:synapse-agent"
NODE_A = jwt("sa-token-bound-to-node-a-3f9c1e")
NODE_B = jwt("sa-token-bound-to-node-b-8d2e4a")
OTHER_ACCOUNT = jwt("sa-token-of-another-account-5b7")
UNKNOWN = jwt("a-token-nobody-issued")
TOKENS = {NODE_A: (AGENT_SA, "node-a"), NODE_B: (AGENT_SA, "node-b"),
          OTHER_ACCOUNT: ("system:serviceaccount:apps:web", "node-c")}
OWN_TOKEN = "control-plane-own-sa-token-1c4e6a"


class StandInApiServer(BaseHTTPRequestHandler):
    """Answers TokenReviews from :data:`TOKENS` (audience synapse-agent), as a real API
    server does for bound service-account tokens, to a caller presenting OWN_TOKEN."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {OWN_TOKEN}":
            self._answer(401, {"kind": "Status", "code": 401})
            return
        spec = body["spec"]
        found = TOKENS.get(spec["token"])
        if found is None or "synapse-agent" not in spec.get("audiences", []):
            status: dict[str, object] = {"authenticated": False, "error": "invalid token"}
        else:
            status = {"authenticated": True, "audiences": ["synapse-agent"], "user": {
                "username": found[0], "uid": "u",
                "extra": {"authentication.kubernetes.io/node-name": [found[1]]}}}
        self._answer(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "status": status})

    def _answer(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Fleet:
    def __init__(self, url: str, grpc_address: str, agent: harness.ManagedProcess,
                 metrics_url: str) -> None:
        self.url, self.grpc, self.agent, self.metrics_url = url, grpc_address, agent, metrics_url


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("agent-identity")
    api = ThreadingHTTPServer(("127.0.0.1", 0), StandInApiServer)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    own = tmp / "own-token"
    own.write_text(OWN_TOKEN)
    http, grpc_port = harness.free_port(), harness.free_port()
    cfg = fleet.controlplane_config(
        "reviewed", http, grpc_port, tmp / "data", logging={"level": "debug"},
        cache={"semantic_enabled": True, "semantic_budget_ms": 5000, "l1_budget_ms": 1000})
    cfg["auth"]["agent_review"] = {"service_accounts": [AGENT_SA],
                                   "api_server": f"http://127.0.0.1:{api.server_port}",
                                   "token_file": str(own)}
    token = tmp / "agent-token"
    token.write_text(NODE_A + "\n")
    agent = fleet.agent_config("node-a", [f"127.0.0.1:{grpc_port}"],
                               {"gen": harness.free_port()}, tmp / "engines", time_scale=0)
    agent["control_plane"].pop("token")
    agent["control_plane"]["token_file"] = str(token)
    agent["embedder"] = {"kind": "minilm"}
    pool = harness.ProcessPool(tmp)
    url = f"http://127.0.0.1:{http}"
    try:
        pool.start("controlplane", ["synapse", "controlplane", "--config",
                                    str(fleet.write_yaml(tmp / "cp.yaml", cfg))],
                   ready_url=f"{url}/health", timeout=60)
        proc = pool.start("agent", ["synapse", "agent", "--config",
                                    str(fleet.write_yaml(tmp / "agent.yaml", agent)),
                                    "--log-level", "debug"])
        harness.wait_until(lambda: fleet.backends_ready(url) == 1, 90,
                           "the agent's engine behind the control plane", proc=proc,
                           interval=0.3)
        match = re.search(r"agent metrics listening on (http://127\.0\.0\.1:\d+)",
                          proc.output())
        assert match, proc.output_tail()
        yield Fleet(url, f"127.0.0.1:{grpc_port}", proc, match.group(1) + "/metrics")
    finally:
        pool.stop_all()
        api.shutdown()
    leaks = fleet.scan_for_secrets(fleet.log_files(tmp), [], [*TOKENS, OWN_TOKEN])
    assert not leaks, leaks


def _nodes(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListNodes(
            admin_pb2.ListNodesRequest(), timeout=10,
            metadata=(("authorization", f"Bearer {fleet.ADMIN_KEY}"),))
    return [n.name for n in reply.nodes]


def _connect(address: str, token: str, node: str) -> grpc.RpcError:
    register = controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
        node_name=node, agent_version="0", node_address="127.0.0.1:1"))
    with grpc.insecure_channel(address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Connect(iter([register]), timeout=10,
                                  metadata=(("authorization", f"Bearer {token}"),)):
                pass
    return info.value


def test_the_agent_registered_as_its_node_and_serves_through_its_own_keys(
        reviewed: Fleet) -> None:
    reply = fleet.request(reviewed.url, "POST", "/v1/chat/completions", fleet.chat_body())
    assert reply.status == 200, reply.body[:300]     # the control plane presents the engine key
    assert _nodes(reviewed.grpc) == ["node-a"]


def test_the_semantic_cache_calls_the_agent_with_its_node_key(reviewed: Fleet) -> None:
    def embedded() -> bool:
        with urllib.request.urlopen(reviewed.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        return bool(re.search(r'synapse_agent_embed_requests_total\{[^}]*code="OK"[^}]*\} '
                              r'[1-9]', text))

    asked = iter(range(10_000))

    def one_more_then_embedded() -> bool:
        # MiniLM loads after start: cacheable requests until one is embedded
        body = fleet.chat_body(f"What is the capital of France, question {next(asked)}?",
                               temperature=0)
        assert fleet.request(reviewed.url, "POST", "/v1/chat/completions", body).status == 200
        return embedded()

    harness.wait_until(one_more_then_embedded, 120, "a Node.Embed call the agent let in",
                       proc=reviewed.agent, interval=1.0)


@pytest.mark.parametrize(("token", "node", "code"), [
    (NODE_B, "node-a", grpc.StatusCode.PERMISSION_DENIED),
    (OTHER_ACCOUNT, "node-c", grpc.StatusCode.UNAUTHENTICATED),
    (UNKNOWN, "node-d", grpc.StatusCode.UNAUTHENTICATED),
    ("not-even-a-jwt", "node-d", grpc.StatusCode.UNAUTHENTICATED),
    (NODE_A, "node-a", grpc.StatusCode.ALREADY_EXISTS),
], ids=["another-nodes-token", "not-an-agent-account", "unknown", "not-a-jwt",
        "node-a-is-live"])
def test_no_token_registers_a_node_it_is_not_bound_to(reviewed: Fleet, token: str, node: str,
                                                      code: grpc.StatusCode) -> None:
    err = _connect(reviewed.grpc, token, node)
    assert err.code() == code, (err.code(), err.details())
    assert token not in (err.details() or "")
    assert _nodes(reviewed.grpc) == ["node-a"]
    assert fleet.request(reviewed.url, "POST", "/v1/chat/completions",
                         fleet.chat_body()).status == 200
