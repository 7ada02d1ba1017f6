"""What an agent on the control plane's own host may claim of this host's ports: with an
engine port range in its Register, a loopback backend at another port (the control
plane's Redis, its admin or metrics port) is left out; and where a node's Node service
may be (``engine_hosts.address_refusal``: the same rule as its backends' hosts). A real
gRPC server; the test plays the agent (it holds the shared token every node holds)."""

from __future__ import annotations

import logging

import pytest

from controlplane.core import engine_hosts
from protos.synapse.v1 import controlplane_pb2
from tests.controlplane.test_agent_identity import SHARED, control_plane
from tests.controlplane.test_agent_reports import backend, report
from tests.controlplane.test_grpc_server import Agent

NONE = engine_hosts.Allowed()
RANGE = (8000, 8099)


def register(name: str, ports: tuple[int, int] | None) -> controlplane_pb2.AgentMessage:
    msg = controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
        node_name=name, agent_version="test", node_address="127.0.0.1:50052"))
    if ports is not None:
        msg.register.engine_port_range.first, msg.register.engine_port_range.last = ports
    return msg


@pytest.mark.parametrize(("url", "peer"), [
    ("http://127.0.0.1:8000", "127.0.0.1"),
    ("http://localhost:8099/v1", "127.0.0.1"),
    ("http://[::1]:8050", "unix:/run/synapse/grpc.sock"),
    ("http://10.0.0.5:9999", "10.0.0.5"),      # a remote node's own address: not loopback
])
def test_a_local_agents_engines_in_its_port_range_are_taken(url: str, peer: str) -> None:
    assert engine_hosts.refusal(url, peer, NONE, RANGE) is None


@pytest.mark.parametrize(("url", "port"), [
    ("http://127.0.0.1:6379", 6379),            # the control plane's Redis
    ("http://localhost:8180/v1", 8180),         # its own HTTP port
    ("http://127.0.0.1", 80),
    ("https://127.0.0.1", 443),
    ("http://127.1:7999", 7999),
])
def test_a_local_agents_loopback_backend_outside_its_range_is_refused(url: str,
                                                                      port: int) -> None:
    why = engine_hosts.refusal(url, "127.0.0.1", NONE, RANGE)
    assert why is not None and f"port {port}" in why and "8000-8099" in why


def test_without_a_range_or_where_the_operator_lists_loopback_any_port_is_taken() -> None:
    assert engine_hosts.refusal("http://127.0.0.1:6379", "127.0.0.1", NONE) is None
    listed = engine_hosts.Allowed.parse(["127.0.0.1"])
    assert engine_hosts.refusal("http://127.0.0.1:6379", "127.0.0.1", listed, RANGE) is None


async def test_a_local_agent_cannot_report_a_backend_at_another_port_of_this_host(
        caplog: pytest.LogCaptureFixture) -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", RANGE))
        with caplog.at_level(logging.WARNING):
            for seq in (1, 2):
                await agent.send(report(seq, backend("engine", url="http://127.0.0.1:8000"),
                                        backend("redis", url="http://127.0.0.1:6379")))
                await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["engine"]
        assert not [b for b, _ in svc.registry.all_backends() if ":6379" in b.url]
        warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
        assert len(warnings) == 1 and "port 6379" in warnings[0]
        assert "8000-8099" in warnings[0]
        await agent.close()


async def test_a_later_register_on_the_stream_sets_the_range_its_reports_are_held_to() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", None))
        await agent.send(report(1, backend("a", url="http://127.0.0.1:9000")))
        await agent.receive()
        await agent.send(register("gpu-1", RANGE))
        await agent.send(report(2, backend("a", url="http://127.0.0.1:9000"),
                                backend("b", url="http://127.0.0.1:8001")))
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["b"]
        await agent.close()


@pytest.mark.parametrize(("address", "peer"), [
    ("10.0.0.5:50052", "10.0.0.5"),             # the chart's POD_IP
    ("[fd00::5]:50052", "fd00::5"),
    ("fd00::5:50052", "fd00::5"),
    ("127.0.0.1:50052", "127.0.0.1"),           # synapse up, make up
    ("localhost:50052", "unix:/run/synapse/grpc.sock"),
])
def test_a_nodes_own_node_service_address_is_taken(address: str, peer: str) -> None:
    assert engine_hosts.address_refusal(address, peer, NONE) is None


@pytest.mark.parametrize(("address", "shown"), [
    ("10.0.0.6:50052", "10.0.0.6"),             # another node's Node service
    ("127.0.0.1:50052", "127.0.0.1"),           # the control plane's own host
    ("169.254.169.254:80", "169.254.169.254"),  # the metadata service
    ("agent.default.svc:50052", "'agent.default.svc'"),
])
def test_a_node_service_address_elsewhere_is_refused(address: str, shown: str) -> None:
    why = engine_hosts.address_refusal(address, "10.0.0.5", NONE)
    assert why is not None and shown in why and "Node-service address" in why


def test_the_operator_allows_more_node_service_hosts() -> None:
    allowed = engine_hosts.Allowed.parse(["10.0.0.0/8", "agent.default.svc"])
    assert engine_hosts.address_refusal("10.9.9.9:50052", "10.0.0.5", allowed) is None
    assert engine_hosts.address_refusal("agent.default.svc:1", "10.0.0.5", allowed) is None
