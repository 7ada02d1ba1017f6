"""Only agents holding ``auth.agent_token`` may register with the control plane.

A registered node is sent every tenant's prompts, so an unauthenticated ``Connect``
would let anything that reaches the gRPC port pose as a GPU node and receive traffic.
Here a real agent with the token registers and serves; ``Connect`` calls without it, or
with a wrong one, end ``UNAUTHENTICATED`` and leave no node behind.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, controlplane_pb2, controlplane_pb2_grpc
from tests import fleet, harness

AUTH = (("authorization", f"Bearer {fleet.ADMIN_KEY}"),)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("agent-auth")
    http, grpc_port = harness.free_port(), harness.free_port()
    cfg = fleet.controlplane_config("guarded", http, grpc_port, tmp / "data",
                                    cache={"enabled": False}, logging={"level": "debug"})
    agent = fleet.agent_config("trusted", [f"127.0.0.1:{grpc_port}"],
                               {"gen": harness.free_port()}, tmp / "engines", time_scale=0)
    assert cfg["auth"]["agent_token"] == agent["control_plane"]["token"] == fleet.AGENT_TOKEN
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
                           "the trusted agent's engine", proc=proc, interval=0.3)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        pool.stop_all()
    assert not fleet.scan_for_secrets(fleet.log_files(tmp))


def _register(address: str, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError:
    register = controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
        node_name="intruder", agent_version="0", node_address="127.0.0.1:1"))
    with grpc.insecure_channel(address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Connect(iter([register]), metadata=metadata, timeout=10):
                pass
    return info.value


def test_the_trusted_agent_registered_and_serves(guarded: tuple[str, str]) -> None:
    url, _ = guarded
    assert fleet.request(url, "POST", "/v1/chat/completions", fleet.chat_body()).status == 200


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-token"),),
                                      (("authorization", fleet.AGENT_TOKEN),),
                                      (("authorization", f"Bearer {fleet.ADMIN_KEY}"),)],
                         ids=["none", "wrong", "no-scheme", "admin-key"])
def test_connect_without_the_agent_token_is_refused(guarded: tuple[str, str],
                                                    metadata: tuple[tuple[str, str], ...]) -> None:
    _, address = guarded
    err = _register(address, metadata)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
    assert fleet.AGENT_TOKEN not in (err.details() or "")
    with grpc.insecure_channel(address) as channel:
        nodes = admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(),
                                                            metadata=AUTH, timeout=10)
    assert [n.name for n in nodes.nodes] == ["trusted"]
