"""A node's Node-service address (``Register.node_address``), where the control plane
sends tenants' texts (``Node.Embed``, ``ScorePairs``), must be where its backends may be
(``engine_hosts.address_refusal``): a Register naming another node's address, the
metadata service or an unlisted name is refused. A real gRPC server; the test plays the
agent (it connects from 127.0.0.1 and holds the shared token every node holds)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos.synapse.v1 import controlplane_pb2_grpc
from synapse_common import call_metadata
from tests.controlplane.test_agent_identity import SHARED, control_plane, register
from tests.controlplane.test_agent_reports import backend, ended_with, report
from tests.controlplane.test_grpc_server import Agent


class Ipv6Agent(Agent):
    """An agent that reaches the control plane over IPv6 loopback (``[::1]``)."""

    def __init__(self, port: int, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"[::1]:{port}")
        self.outgoing = asyncio.Queue()
        stub = controlplane_pb2_grpc.ControlPlaneStub(self.channel)
        self.call = stub.Connect(self._messages(), metadata=call_metadata.metadata(token))


@pytest.mark.parametrize(("address", "shown"), [
    ("10.0.0.9:50052", "10.0.0.9"),             # another node's Node service
    ("169.254.169.254:80", "169.254.169.254"),  # the metadata service
    ("embed.default.svc:50052", "embed.default.svc"),
])
async def test_a_register_naming_a_node_service_elsewhere_is_refused(address: str,
                                                                     shown: str) -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address=address))
        err = await ended_with(agent)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node_address" in (err.details() or "") and shown in (err.details() or "")
        assert SHARED not in (err.details() or "")
        assert svc.registry.node("gpu-1") is None
        assert not svc.registry.ready_embed_nodes()
        await agent.close()


async def test_the_nodes_own_address_or_one_the_operator_allows_registers() -> None:
    async with control_plane(engine_hosts=["10.0.0.0/8"]) as (svc, port):
        local = Agent(port, SHARED)
        await local.send(register("gpu-1", address="127.0.0.1:50052"))
        behind_nat = Agent(port, SHARED)
        await behind_nat.send(register("gpu-2", address="10.0.0.9:50052"))
        for _ in range(200):
            if len(svc.registry.ready_embed_nodes()) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(n.address for n in svc.registry.ready_embed_nodes()) == [
            "10.0.0.9:50052", "127.0.0.1:50052"]
        await local.close()
        await behind_nat.close()


async def test_a_later_register_cannot_move_the_node_service_elsewhere() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(register("gpu-1", address="10.0.0.9:50052"))
        while await agent.receive() is not grpc.aio.EOF:   # the stream ends
            pass
        node = svc.registry.node("gpu-1")
        assert node is not None and node.info.address == "127.0.0.1:50052"
        assert svc.registry.node_key_at("10.0.0.9:50052") is None
        await agent.close()


async def test_an_agent_on_ipv6_loopback_registers_and_reports_its_own_engines() -> None:
    """grpc names an IPv6 peer with its brackets percent-encoded
    (``ipv6:%5B::1%5D:port``): read as meant, an agent on ``[::1]`` is on this host, so
    its Node service and its engines on loopback are its own (the machine needs IPv6
    loopback: ``sysctl net.ipv6.conf.lo.disable_ipv6=0``)."""
    async with control_plane(listen="[::1]") as (svc, port):
        agent = Ipv6Agent(port, SHARED)
        await agent.send(register("gpu-1", address="[::1]:50052"))
        await agent.send(report(1, backend("b6", url="http://[::1]:8000"),
                                backend("b4", url="http://127.0.0.1:8001")))
        assert (await agent.receive()).ack.sequence == 1
        node = svc.registry.node("gpu-1")
        assert node is not None and node.info.address == "[::1]:50052"
        assert sorted(b.name for b in node.backends) == ["b4", "b6"]
        await agent.close()
