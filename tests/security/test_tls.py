"""Optional TLS on both listeners of the control plane — HTTPS for the API, TLS for gRPC
(agents and Admin) — with a self-signed certificate made in the test by the openssl CLI.
The agent dials the control plane over TLS, verifying it with ``tls_ca_file``.
"""

from __future__ import annotations

import http.client
import pathlib
import ssl
from collections.abc import Iterator

import grpc
import httpx2 as httpx
import openai
import pytest

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc
from tests import fleet, harness

AUTH = (("authorization", f"Bearer {fleet.ADMIN_KEY}"),)


class TlsFleet:
    def __init__(self, https: str, grpc_address: str, cert: str) -> None:
        self.https = https
        self.grpc = grpc_address
        self.cert = cert


def _https_ready(url: str, cert: str) -> bool:
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=2) as c:
            stats = c.get(f"{url}/api/v1/stats",
                          headers={"Authorization": f"Bearer {fleet.ADMIN_KEY}"}).json()
            return int(stats["backends_ready"]) >= 1
    except (httpx.HTTPError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFleet]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = fleet.self_signed_cert(tmp)
    http_port, grpc_port = harness.free_port(), harness.free_port()
    cfg = fleet.controlplane_config(
        "tls", http_port, grpc_port, tmp / "data",
        http={"tls_cert_file": cert, "tls_key_file": key},
        grpc={"host": "127.0.0.1", "port": grpc_port, "tls_cert_file": cert,
              "tls_key_file": key}, cache={"enabled": False})
    cp_path = fleet.write_yaml(tmp / "cp.yaml", cfg)
    agent = fleet.agent_config("tls-node", [f"127.0.0.1:{grpc_port}"],
                               {"gen": harness.free_port()}, tmp / "engines", time_scale=0)
    agent["control_plane"]["tls_ca_file"] = cert
    agent_path = fleet.write_yaml(tmp / "agent.yaml", agent)
    pool = harness.ProcessPool(tmp)
    url = f"https://127.0.0.1:{http_port}"
    try:
        pool.start("controlplane", ["synapse", "controlplane", "--config", str(cp_path)])
        proc = pool.start("agent", ["synapse", "agent", "--config", str(agent_path)])
        harness.wait_until(lambda: _https_ready(url, cert), 90,
                           "the agent's engine behind the TLS control plane", proc=proc,
                           interval=0.3)
        yield TlsFleet(url, f"127.0.0.1:{grpc_port}", cert)
    finally:
        pool.stop_all()
    assert not fleet.scan_for_secrets(fleet.log_files(tmp))


def test_openai_client_over_https_with_the_ca(tls: TlsFleet) -> None:
    http_client = httpx.Client(verify=ssl.create_default_context(cafile=tls.cert))
    client = openai.OpenAI(base_url=f"{tls.https}/v1", api_key=fleet.TENANT_KEY,
                           http_client=http_client, max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="llama", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    client.close()


def test_https_without_trusting_the_certificate_fails(tls: TlsFleet) -> None:
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=5) as client:
        client.get(f"{tls.https}/health")


def test_plain_http_to_the_tls_port_gets_no_answer(tls: TlsFleet) -> None:
    host, port = tls.https.removeprefix("https://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            conn.request("GET", "/health")
            resp = conn.getresponse()
            if resp.status >= 400:        # some stacks answer 400 in plain text
                raise ConnectionError(resp.status)
    finally:
        conn.close()


def test_admin_grpc_over_tls(tls: TlsFleet, tmp_path: pathlib.Path) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(tls.cert).read_bytes())
    with grpc.secure_channel(tls.grpc, creds) as channel:
        nodes = admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(),
                                                            metadata=AUTH, timeout=10)
        assert [n.name for n in nodes.nodes] == ["tls-node"]


def test_plaintext_grpc_to_the_tls_port_fails(tls: TlsFleet) -> None:
    with grpc.insecure_channel(tls.grpc) as channel:
        with pytest.raises(grpc.RpcError) as info:
            admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(),
                                                        metadata=AUTH, timeout=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)
