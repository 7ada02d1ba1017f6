"""``ControlPlane.Connect`` over a real gRPC server, with the test playing the agent."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.api import agent_messages, grpc_server
from controlplane.api import services as services_mod
from controlplane.core import types
from protos import enums
from protos.synapse.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from synapse_common import call_metadata, engine_key
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t


def register(name: str = "gpu-1") -> controlplane_pb2.AgentMessage:
    return controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
        node_name=name, agent_version="test", node_address="127.0.0.1:1",
        embed_models=["minilm"]))


def report(seq: int, url: str, phase: int = common_pb2.BACKEND_PHASE_READY,
           ) -> controlplane_pb2.AgentMessage:
    return controlplane_pb2.AgentMessage(report=controlplane_pb2.Report(
        sequence=seq, backends=[common_pb2.BackendState(
            name="sim", url=url + "/v1/", models=[t.MODEL], phase=phase,
            task=common_pb2.BACKEND_TASK_GENERATE, kv_capacity_tokens=100_000,
            kv_block_size=16, num_requests_waiting=2)]))


class Agent:
    """The agent's side of a Connect stream: a queue of messages to send (presenting
    ``token``, when given)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.outgoing: asyncio.Queue[controlplane_pb2.AgentMessage | None] = asyncio.Queue()
        stub = controlplane_pb2_grpc.ControlPlaneStub(self.channel)
        self.call = stub.Connect(self._messages(), metadata=call_metadata.metadata(token))

    async def _messages(self):  # type: ignore[no-untyped-def]
        while (msg := await self.outgoing.get()) is not None:
            yield msg

    async def send(self, msg: controlplane_pb2.AgentMessage) -> None:
        await self.outgoing.put(msg)

    async def receive(self) -> controlplane_pb2.ControlMessage:
        return await asyncio.wait_for(self.call.read(), 10)

    async def refused(self) -> grpc.StatusCode:
        """The status the stream ended with (it must end with one)."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await self.receive()
        return err.value.code()

    async def close(self) -> None:
        await self.outgoing.put(None)
        await self.channel.close()


async def test_agent_stream_feeds_the_registry_and_routing() -> None:
    async with t.backends(("sim", "ok")) as (b,):
        async with t.running(t.settings(), with_grpc=True) as cp:
            agent = Agent(cp.grpc_port)
            await agent.send(register())
            await agent.send(report(1, b.url))
            ack = await agent.receive()
            assert ack.ack.sequence == 1 and ack.ack.replica == "test"
            node = cp.services.registry.node("gpu-1")
            assert node is not None and node.status == "ready"
            (backend,) = node.backends
            assert backend.key == "gpu-1/sim" and backend.url == b.url
            assert backend.waiting == 2 and backend.block_size == 16
            assert cp.services.registry.ready_embed_nodes() == [
                types.EmbedNode("gpu-1", "127.0.0.1:1", ("minilm",))]
            client = cp.client()
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-synapse-backend"] == "gpu-1/sim"

            # A command to the agent is sent on the stream and its ack comes back.
            pending = asyncio.create_task(cp.services.registry.send_command(
                "gpu-1", types.Command("drain", grace_seconds=3)))
            cmd = await agent.receive()
            assert cmd.WhichOneof("body") == "drain" and cmd.drain.grace_seconds == 3
            await agent.send(controlplane_pb2.AgentMessage(
                command_ack=controlplane_pb2.CommandAck(command_id=cmd.command_id, ok=True)))
            assert (await pending).ok

            # The stream ends: the node is down and leaves the routing set.
            await agent.close()
            for _ in range(100):
                node = cp.services.registry.node("gpu-1")
                if node is not None and node.status == "down":
                    break
                await asyncio.sleep(0.05)
            assert node is not None and node.status == "down"
            with pytest.raises(Exception, match=r"503|no backend"):
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hi"}])
            await client.close()


async def test_first_message_must_be_register_and_health_reflection_work() -> None:
    async with t.running(t.settings(), with_grpc=True) as cp:
        agent = Agent(cp.grpc_port)
        await agent.send(report(1, "http://x"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await agent.receive()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await agent.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.grpc_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            reply = await health.Check(health_pb2.HealthCheckRequest(
                service="synapse.v1.ControlPlane"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask():  # type: ignore[no-untyped-def]
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for resp in refl.ServerReflectionInfo(ask()):
                names = {s.name for s in resp.list_services_response.service}
                assert "synapse.v1.ControlPlane" in names
                break


async def test_a_port_another_grpc_server_holds_is_a_bind_error() -> None:
    # grpc binds with SO_REUSEPORT by default: two servers that both keep that default
    # share a port silently, each taking some of the agents' connections. Ours refuses.

    other = grpc.aio.server()           # grpc's defaults, as another process would bind
    port = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    try:
        with pytest.raises(OSError, match=f"cannot bind the gRPC server to 127.0.0.1:{port}"):
            await grpc_server.start("127.0.0.1", port, [])
    finally:
        await other.stop(0)
    ours, port = await grpc_server.start("127.0.0.1", 0, [])
    try:
        with pytest.raises(OSError, match="address in use"):
            await grpc_server.start("127.0.0.1", port, [])
    finally:
        await ours.stop(0)


def test_an_agent_backend_carries_the_engine_key_to_its_requests_an_external_one_not() -> None:
    """The key the agent's engines require goes with every request the control plane
    sends them (the dispatcher's headers), hidden from ``repr``; an ``external`` backend
    is not the agent's to key, and without an agent token there is no key."""
    key = engine_key.derive("cp-test-agent-token")
    assert key is not None
    svc = services_mod.build(t.settings())
    for kind in ("vllm", "tei", "simulator"):
        msg = common_pb2.BackendState(name="e", url="http://10.0.0.5:8000", models=[t.MODEL],
                                      engine=enums.ENGINE_KIND.value(kind))
        backend = agent_messages.backend_state("gpu-1", msg, key)
        assert svc.dispatcher.headers(backend, "r1")["Authorization"] == f"Bearer {key}"
        assert key not in repr(backend)
        unkeyed = agent_messages.backend_state("gpu-1", msg, None)
        assert "Authorization" not in svc.dispatcher.headers(unkeyed, "r1")
    external = common_pb2.BackendState(name="x", url="http://api.example:80", models=[t.MODEL],
                                       engine=enums.ENGINE_KIND.value("external"))
    backend = agent_messages.backend_state("gpu-1", external, key)
    assert "Authorization" not in svc.dispatcher.headers(backend, "r1")


async def _flap(svc: services_mod.Services, port: int) -> None:
    """One stream of node gpu-1: registered, one report acked, closed, seen down."""
    agent = Agent(port)
    await agent.send(register())
    await agent.send(report(1, "http://127.0.0.1:9"))
    await agent.receive()
    await agent.close()
    for _ in range(200):
        node = svc.registry.node("gpu-1")
        if node is not None and node.status == "down":
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the stream never ended")


async def test_a_node_that_connects_in_a_loop_is_logged_once_a_minute(caplog) -> None:  # type: ignore[no-untyped-def]
    """A flapping agent (or a holder of the agent token connecting in a loop) writes the
    first connected and disconnected lines of its node, then one of each a minute saying
    how many were held back: not a line per stream."""
    clock = ManualClock()
    svc = services_mod.build(t.settings(), clock=clock)
    server, port = await grpc_server.start("127.0.0.1", 0, [grpc_server.control_plane(svc)])

    def said(what: str) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(f"node gpu-1 {what}")]

    caplog.set_level(logging.INFO, logger="synapse.controlplane.grpc")
    try:
        for _ in range(5):
            await _flap(svc, port)
        assert said("connected") == ["node gpu-1 connected (agent test)"]
        assert said("disconnected") == ["node gpu-1 disconnected"]
        clock.now += grpc_server.LOG_EVERY_S
        await _flap(svc, port)
        # The newest held disconnected line is due: said before the new connected line.
        assert said("connected")[1:] == ["node gpu-1 connected (agent test) (4 more held back)"]
        assert said("disconnected")[1:] == ["node gpu-1 disconnected (3 more held back)"]
    finally:
        await server.stop(0)


@pytest.mark.parametrize("flaps", [1, 2])
async def test_a_node_that_flapped_then_stays_up_shows_connected_once_the_minute_passes(
        caplog, flaps: int) -> None:  # type: ignore[no-untyped-def]
    """Its reconnection, held back within the minute, is said at a report once the minute
    has passed: the log does not leave "disconnected" as its last line while it is up,
    nor says a held "disconnected" line after it (two flaps: that one is due later)."""
    clock = ManualClock()
    svc = services_mod.build(t.settings(), clock=clock)
    server, port = await grpc_server.start("127.0.0.1", 0, [grpc_server.control_plane(svc)])

    def stream_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("node gpu-1 ")]

    caplog.set_level(logging.INFO, logger="synapse.controlplane.grpc")
    agent = Agent(port)
    try:
        for _ in range(flaps):
            await _flap(svc, port)
            clock.now += 5.0
        await agent.send(register())
        await agent.send(report(1, "http://127.0.0.1:9"))
        await agent.receive()
        assert stream_lines()[-1] == "node gpu-1 disconnected"     # reconnection held
        await agent.send(report(2, "http://127.0.0.1:9"))
        await agent.receive()
        assert stream_lines()[-1] == "node gpu-1 disconnected"     # not due yet
        for seq in range(3, 3 + 6):     # a minute of reports: every held line falls due
            clock.now += grpc_server.LOG_EVERY_S / 5
            await agent.send(report(seq, "http://127.0.0.1:9"))
            await agent.receive()
        assert stream_lines()[-1].startswith("node gpu-1 connected (agent test)")
    finally:
        await agent.close()
        await server.stop(0)


def test_registry_max_nodes_per_address_counts_a_peer_by_its_address_or_ipv6_64() -> None:
    """Nodes are counted per IPv4 address and per IPv6 /64 (one machine is commonly
    given a whole /64); an agent on this host (loopback, a unix socket) is not counted."""
    origin = grpc_server.peer_origin
    assert origin("10.0.0.5") == "10.0.0.5"
    assert origin("::ffff:10.0.0.5") == "10.0.0.5"
    assert origin("2001:db8:1:2::5") == origin("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert origin("2001:db8:1:3::5") != origin("2001:db8:1:2::5")
    assert origin("127.0.0.1") is origin("127.3.2.1") is origin("::1") is None
    assert origin("unix:/run/synapse/cp.sock") is None
    settings = t.settings()
    assert settings.registry.max_nodes_per_address is not None
    assert settings.registry.max_nodes_per_address < settings.registry.max_nodes


async def test_a_register_on_a_stream_a_newer_one_replaced_ends_it_and_revives_nothing() -> None:
    """A stream silent long enough for a newer one of its node to take over, which then
    closed, sends a Register: its stream ends, as a report's would, and the node stays
    disconnected. Before, the Register admitted the node again under a stream id no
    stream held: the node stayed connected for good, so making room never forgot it, and
    with no origin it was not counted in registry.max_nodes_per_address either."""
    clock = ManualClock()
    svc = services_mod.build(t.settings(), clock=clock)
    server, port = await grpc_server.start("127.0.0.1", 0, [grpc_server.control_plane(svc)])

    async def until_disconnected() -> None:
        for _ in range(200):
            node = svc.registry.node("gpu-1")
            if node is not None and not node.connected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the stream never ended")

    old = Agent(port)
    try:
        await old.send(register())
        await old.send(report(1, "http://127.0.0.1:9"))
        await old.receive()
        clock.now += svc.settings.registry.node_down_after_s + 1    # silent: down
        newer = Agent(port)
        await newer.send(register())
        await newer.send(report(1, "http://127.0.0.1:9"))
        await newer.receive()
        await newer.close()
        await until_disconnected()
        await old.send(register())
        await old.send(report(2, "http://127.0.0.1:9"))
        assert await old.receive() is grpc.aio.EOF      # its stream ended
        node = svc.registry.node("gpu-1")
        assert node is not None and not node.connected
    finally:
        await old.close()
        await server.stop(0)
