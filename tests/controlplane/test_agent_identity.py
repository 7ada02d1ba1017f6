"""Who may register as which node on ``ControlPlane.Connect``, which keys the control plane
then presents to the node, and the registry's defences against a registrant that lies:
a second stream for a live node, invented names past ``registry.max_nodes``, nonsense
telemetry, an oversized report. A real gRPC server; the test plays the agents, and a
stand-in plays the Kubernetes token review (its own tests: test_token_review.py)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest

from controlplane.adapters import agent_relay, token_review
from controlplane.api import agent_messages, grpc_server
from controlplane.api import services as services_mod
from controlplane.core import registry, types
from protos.synapse.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from synapse_common import call_metadata, engine_key
from tests import harness
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t
from tests.controlplane.test_grpc_server import Agent

SHARED = "identity-test-shared-agent-token"
SA_TOKEN = {"sa-token-of-gpu-1": "gpu-1", "sa-token-of-gpu-2": "gpu-2"}


class StandInReview:
    """Plays :class:`token_review.TokenReviewer`: a table of tokens and the nodes they
    are bound to; ``down`` makes every review fail as an unreachable API server would."""

    def __init__(self) -> None:
        self.down = False
        self.asked: list[str] = []
        self.gate: asyncio.Event | None = None      # set: reviews wait for it

    async def node_of(self, token: str) -> str | None:
        self.asked.append(token)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise token_review.ReviewUnavailable("the API server did not answer")
        return SA_TOKEN.get(token)


def register(name: str, address: str = "127.0.0.9:50052", engine: str = "",
             node: str = "") -> controlplane_pb2.AgentMessage:
    return controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
        node_name=name, agent_version="test", node_address=address, embed_models=["minilm"],
        engine_key=engine, node_key=node))


def report(seq: int, **fields: object) -> controlplane_pb2.AgentMessage:
    # at the agent's own address (the tests' agents connect from 127.0.0.1)
    backend = common_pb2.BackendState(
        name="sim", url="http://127.0.0.1:8000", models=[t.MODEL],
        phase=common_pb2.BACKEND_PHASE_READY, engine=common_pb2.ENGINE_KIND_VLLM)
    for name, value in fields.items():
        setattr(backend, name, value)
    return controlplane_pb2.AgentMessage(report=controlplane_pb2.Report(
        sequence=seq, backends=[backend]))


def reviewed(svc: services_mod.Services, relay: agent_relay.AgentRelay | None,
             review: StandInReview | None) -> grpc_server.Registration:
    """The Connect service of ``svc`` with the stand-in review (``control_plane`` builds
    a real reviewer from the settings)."""
    def add(server: grpc.aio.Server) -> str:
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(  # type: ignore[no-untyped-call]
            grpc_server.ControlPlaneServicer(svc, relay, review), server)  # type: ignore[arg-type]
        return "synapse.v1.ControlPlane"
    return add


@contextlib.asynccontextmanager
async def control_plane(review: StandInReview | None = None, *, listen: str = "127.0.0.1",
                        **registry_settings: object
                        ) -> AsyncIterator[tuple[services_mod.Services, int]]:
    """``listen``: the gRPC server's host (``[::1]`` for agents on IPv6 loopback)."""
    settings = t.settings(auth={"agent_token": SHARED, "allow_unauthenticated_agents": False},
                          registry=registry_settings)
    svc = services_mod.build(settings)

    server, port = await grpc_server.start(listen, 0, [reviewed(svc, None, review)])
    try:
        yield svc, port
    finally:
        await server.stop(0)


async def registered(svc: services_mod.Services, name: str) -> None:
    for _ in range(200):
        node = svc.registry.node(name)
        if node is not None and node.status != "down":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"node {name} never registered")


async def test_a_service_account_token_registers_its_own_node_and_no_other() -> None:
    review = StandInReview()
    async with control_plane(review) as (svc, port):
        impostor = Agent(port, "sa-token-of-gpu-2")
        await impostor.send(register("gpu-1"))
        assert await impostor.refused() == grpc.StatusCode.PERMISSION_DENIED
        await impostor.close()
        assert svc.registry.node("gpu-1") is None

        own = Agent(port, "sa-token-of-gpu-1")
        await own.send(register("gpu-1", engine="e" * 64, node="n" * 64))
        await own.send(report(1))
        assert (await own.receive()).ack.sequence == 1
        (backend,) = svc.registry.node("gpu-1").backends   # type: ignore[union-attr]
        assert backend.api_key == "e" * 64      # the node's own engine key, not the fleet's
        assert svc.registry.node_key_at("127.0.0.9:50052") == "n" * 64
        await own.close()

        unknown = Agent(port, "a-token-nobody-vouches-for")
        await unknown.send(register("gpu-3"))
        assert await unknown.refused() == grpc.StatusCode.UNAUTHENTICATED
        await unknown.close()
        assert review.asked.count("a-token-nobody-vouches-for") == 1


async def test_while_the_review_cannot_answer_agents_are_told_to_come_back() -> None:
    review = StandInReview()
    review.down = True
    async with control_plane(review) as (svc, port):
        agent = Agent(port, "sa-token-of-gpu-1")
        await agent.send(register("gpu-1"))
        assert await agent.refused() == grpc.StatusCode.UNAVAILABLE
        await agent.close()
        assert svc.registry.node("gpu-1") is None


async def test_an_agent_that_chose_no_keys_gets_the_shared_ones_only_with_the_shared_token(
        ) -> None:
    """An older agent sends no keys: with the shared token it holds everything they are
    derived from already; with a service-account token it gets nothing of the fleet's."""
    async with control_plane(StandInReview()) as (svc, port):
        shared = Agent(port, SHARED)
        await shared.send(register("gpu-old", address="127.0.0.7:50052"))
        await shared.send(report(1))
        await shared.receive()
        (backend,) = svc.registry.node("gpu-old").backends     # type: ignore[union-attr]
        assert backend.api_key == engine_key.derive(SHARED)
        assert svc.registry.node_key_at("127.0.0.7:50052") == SHARED

        bound = Agent(port, "sa-token-of-gpu-1")
        await bound.send(register("gpu-1"))
        await bound.send(report(1))
        await bound.receive()
        (backend,) = svc.registry.node("gpu-1").backends       # type: ignore[union-attr]
        assert backend.api_key is None
        assert svc.registry.node_key_at("127.0.0.9:50052") is None
        await shared.close()
        await bound.close()


async def test_a_live_node_cannot_be_taken_over_by_a_second_stream() -> None:
    async with control_plane() as (svc, port):
        owner = Agent(port, SHARED)
        await owner.send(register("gpu-1", address="127.0.0.9:50052", node="k" * 64))
        await owner.send(report(1))
        await owner.receive()
        thief = Agent(port, SHARED)       # holds the shared token: may be any node, not a live one
        await thief.send(register("gpu-1", address="127.6.6.6:50052", node="t" * 64))
        assert await thief.refused() == grpc.StatusCode.ALREADY_EXISTS
        await thief.close()
        node = svc.registry.node("gpu-1")
        assert node is not None and node.info.address == "127.0.0.9:50052"
        assert svc.registry.node_key_at("127.6.6.6:50052") is None
        # once the owner's stream is gone, its agent (reconnecting) gets the name back
        await owner.close()
        for _ in range(200):
            if svc.registry.node("gpu-1").status == "down":     # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        back = Agent(port, SHARED)
        await back.send(register("gpu-1", node="b" * 64))
        await back.send(report(1))
        assert (await back.receive()).ack.sequence == 1
        await back.close()


async def test_a_live_nodes_address_cannot_be_claimed_by_another_node() -> None:
    """Else the control plane would call the live node's agent with the other's key (and
    its embeddings would fail)."""
    async with control_plane() as (svc, port):
        owner = Agent(port, SHARED)
        await owner.send(register("gpu-1", address="127.0.0.9:50052", node="k" * 64))
        await owner.send(report(1))
        await owner.receive()
        squatter = Agent(port, SHARED)
        await squatter.send(register("gpu-2", address="127.0.0.9:50052", node="s" * 64))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await squatter.receive()
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # it learns that the address is taken, not which node runs there (the log says)
        assert "another node" in (err.value.details() or "")
        assert "gpu-1" not in (err.value.details() or "")
        await squatter.close()
        assert svc.registry.node_key_at("127.0.0.9:50052") == "k" * 64
        # nor by a Register on a stream of its own, later
        other = Agent(port, SHARED)
        await other.send(register("gpu-3", address="127.0.0.3:50052", node="o" * 64))
        await other.send(report(1))
        await other.receive()
        await other.send(register("gpu-3", address="127.0.0.9:50052", node="o" * 64))
        for _ in range(200):
            if svc.registry.node("gpu-3").status == "down":     # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        assert svc.registry.node_key_at("127.0.0.9:50052") == "k" * 64
        assert svc.registry.node("gpu-3").info.address == "127.0.0.3:50052"  # type: ignore[union-attr]
        await other.close()
        await owner.close()


async def test_invented_node_names_stop_at_max_nodes() -> None:
    async with control_plane(max_nodes=2) as (svc, port):
        agents = [Agent(port, SHARED) for _ in range(3)]
        for i, agent in enumerate(agents[:2]):
            await agent.send(register(f"n{i}", address=f"127.0.1.{i}:50052"))
            await agent.send(report(1))
            await agent.receive()
        await agents[2].send(register("n2", address="127.0.1.2:50052"))
        assert await agents[2].refused() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert {n.info.name for n in svc.registry.nodes()} == {"n0", "n1"}
        for agent in agents:
            await agent.close()


def test_the_registry_forgets_a_long_down_node_to_make_room_and_keeps_a_live_one() -> None:
    clock = ManualClock()
    reg = registry.Registry(clock, 15.0, max_nodes=2, forget_down_after_s=100.0)
    a = reg.register(t_info("a"))
    reg.register(t_info("b"))
    with pytest.raises(registry.NodeLive):
        reg.register(t_info("a"))
    assert reg.register(t_info("a", "10.0.0.1:1"), a) == a      # its own stream refreshes
    reg.report("a", [t_backend("a")])
    clock.now += 15.0
    reg.report("a", [t_backend("a")])      # a served: not forgotten merely to make room
    reg.report("b", [])
    reg.disconnect("a", a)
    with pytest.raises(registry.TooManyNodes):                  # down, but not for long
        reg.register(t_info("c"))
    clock.now += 101.0
    reg.report("b", [])                                         # b stays live
    reg.register(t_info("c"))
    assert {n.info.name for n in reg.nodes()} == {"b", "c"}


def t_info(name: str, address: str = "") -> types.NodeInfo:
    return types.NodeInfo(name=name, address=address)


def t_backend(node: str) -> types.BackendState:
    return types.BackendState(f"{node}/e", node, "e", "http://10.0.0.1:8000", ("m",))


async def test_nonsense_telemetry_is_clamped_and_cannot_win_routing() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1"))
        await agent.send(report(1, kv_cache_usage=math.nan, prefix_cache_hit_rate=math.inf,
                                kv_capacity_tokens=2**64 - 1, max_num_seqs=2**32 - 1))
        await agent.receive()
        (backend,) = svc.registry.node("gpu-1").backends       # type: ignore[union-attr]
        assert backend.kv_usage == 1.0           # a NaN counts as full
        assert backend.prefix_hit_rate == 1.0
        assert backend.kv_capacity_tokens == agent_messages.MAX_KV_TOKENS
        assert backend.max_num_seqs == agent_messages.MAX_SEQS
        msg = report(2, kv_cache_usage=-3.0, prefix_cache_hit_rate=math.nan)
        msg.report.gpus.add(index=0, utilization_percent=math.nan, power_watts=math.inf,
                            temperature_celsius=50.0)
        await agent.send(msg)
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None
        (backend,) = view.backends
        assert backend.kv_usage == 0.0 and backend.prefix_hit_rate == 0.0
        (gpu,) = view.report.gpus
        assert not gpu.HasField("utilization_percent") and not gpu.HasField("power_watts")
        assert gpu.temperature_celsius == 50.0
        await agent.close()


async def test_an_oversized_report_ends_the_stream() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1"))
        await agent.send(report(1))
        await agent.receive()
        huge = report(2)
        huge.report.backends[0].last_log_lines.extend(["x" * 1000] * 1100)
        assert huge.ByteSize() > agent_messages.MAX_MESSAGE_BYTES
        await agent.send(huge)
        with pytest.raises((grpc.aio.AioRpcError, StopAsyncIteration, EOFError)):
            while True:
                msg = await agent.receive()
                if msg == grpc.aio.EOF:
                    raise EOFError
        view = svc.registry.node("gpu-1")
        assert view is not None and view.status == "down"
        assert view.report.sequence == 1                       # the big one was not kept
        await agent.close()


@contextlib.asynccontextmanager
async def pod(tmp_path: pathlib.Path, review: StandInReview,
              ) -> AsyncIterator[tuple[services_mod.Services, services_mod.Services, int]]:
    """A primary (TCP, with ``review``) relaying to one serving worker (a unix socket, as
    in a pod): (primary's services, worker's services, the primary's port)."""
    settings = t.settings(auth={"agent_token": SHARED, "allow_unauthenticated_agents": False})
    sock = tmp_path / "worker.sock"
    worker = services_mod.build(settings, commands_agents=False)
    wserver, _ = await grpc_server.start(f"unix:{sock}", None,
                                         [grpc_server.control_plane(worker, relayed=True)])
    primary = services_mod.build(settings)
    relay = agent_relay.AgentRelay([str(sock)], SHARED)

    pserver, port = await grpc_server.start("127.0.0.1", 0,
                                            [reviewed(primary, relay, review)])
    try:
        yield primary, worker, port
    finally:
        await pserver.stop(0)
        await wserver.stop(0)


async def test_a_worker_applies_the_keys_its_primary_decided_and_no_fallback(
        tmp_path: pathlib.Path) -> None:
    """The primary relays with the shared token: were the worker to treat the copy as
    that token's, an agent that chose no keys would be handed the shared ones there."""
    async with pod(tmp_path, StandInReview()) as (primary, worker, port):
        bound = Agent(port, "sa-token-of-gpu-1")
        await bound.send(register("gpu-1", address="127.0.0.1:50052"))
        await bound.send(report(1))
        await bound.receive()
        shared = Agent(port, SHARED)
        await shared.send(register("gpu-old", address="127.0.0.7:50052"))
        await shared.send(report(1))
        await shared.receive()
        for svc in (primary, worker):
            await harness.until(lambda s=svc: all(  # type: ignore[misc]
                (n := s.registry.node(name)) is not None and n.backends
                for name in ("gpu-1", "gpu-old")), 10, "both nodes")
            (backend,) = svc.registry.node("gpu-1").backends   # type: ignore[union-attr]
            assert backend.api_key is None
            assert svc.registry.node_key_at("127.0.0.1:50052") is None
            (backend,) = svc.registry.node("gpu-old").backends  # type: ignore[union-attr]
            assert backend.api_key == engine_key.derive(SHARED)
            assert svc.registry.node_key_at("127.0.0.7:50052") == SHARED
        await bound.close()
        await shared.close()


async def test_a_register_for_another_node_ends_the_stream_and_never_reaches_a_worker(
        tmp_path: pathlib.Path) -> None:
    async with pod(tmp_path, StandInReview()) as (primary, worker, port):
        agent = Agent(port, "sa-token-of-gpu-2")
        await agent.send(register("gpu-2", address="127.0.0.2:50052"))
        await agent.send(report(1))
        await agent.receive()
        await harness.until(lambda: worker.registry.node("gpu-2") is not None, 10, "gpu-2")
        await agent.send(register("gpu-1", address="127.6.6.6:50052", node="x" * 64))
        await harness.until(lambda: primary.registry.node("gpu-2").status == "down",  # type: ignore[union-attr]
                            10, "the stream to end")
        await agent.send(report(2))
        await asyncio.sleep(0.3)        # what the relay would have delivered by now
        for svc in (primary, worker):
            assert svc.registry.node("gpu-1") is None
        await agent.close()


@pytest.mark.parametrize("change", ["bad-name", "spaced-name", "models", "labels", "size"])
async def test_a_register_that_cannot_be_a_node_is_invalid(change: str) -> None:
    msg = register("gpu-1")
    if change == "bad-name":
        msg.register.node_name = "gpu-1\u202e"
    elif change == "spaced-name":
        msg.register.node_name = "gpu 1"
    elif change == "models":
        msg.register.embed_models.extend(f"m{i}" for i in range(agent_messages.MAX_ITEMS))
    elif change == "labels":
        msg.register.labels.update({f"k{i}": "v" for i in range(agent_messages.MAX_ITEMS + 1)})
    else:
        msg.register.labels["big"] = "x" * agent_messages.MAX_MESSAGE_BYTES
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(msg)
        assert await agent.refused() == grpc.StatusCode.INVALID_ARGUMENT
        await agent.close()
        assert svc.registry.nodes() == []


async def test_what_an_agent_says_of_itself_reaches_terminals_printable() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        msg = register("gpu-1")
        msg.register.agent_version = "1.0\x1b]0;pwned\x07\r\nnode-a   Ready" + "v" * 500
        msg.register.labels["zone\x1b[31m"] = "a\nb"
        await agent.send(msg)
        await agent.send(report(1))
        await agent.receive()
        info = svc.registry.node("gpu-1").info      # type: ignore[union-attr]
        assert len(info.agent_version) == agent_messages.MAX_TEXT
        assert not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0
                       for c in info.agent_version + "".join(info.labels) +
                       "".join(info.labels.values()))
        await agent.close()


def test_a_report_from_a_stream_a_newer_one_replaced_is_not_applied() -> None:
    clock = ManualClock()
    reg = registry.Registry(clock, 15.0)
    old = reg.register(t_info("a"))
    new = reg.register(t_info("a"), decided=True)    # a worker's copy takes over at once
    assert reg.report("a", [], stream_id=new)
    assert not reg.report("a", [], draining=True, stream_id=old)
    assert reg.node("a").draining is False          # type: ignore[union-attr]


async def test_one_review_at_a_time_per_peer_address() -> None:
    """Whoever reaches the port can present tokens: those from one address wait their
    turn (UNAVAILABLE, the agent tries again), so one place cannot fill every review
    place and keep other agents out."""
    review = StandInReview()
    review.gate = asyncio.Event()
    async with control_plane(review) as (_svc, port):
        first = Agent(port, "sa-token-of-gpu-1")
        await first.send(register("gpu-1"))
        await harness.until(lambda: len(review.asked) == 1, 10, "the first review")
        second = Agent(port, "sa-token-of-gpu-2")
        await second.send(register("gpu-2", address="127.0.0.2:50052"))
        assert await second.refused() == grpc.StatusCode.UNAVAILABLE
        assert len(review.asked) == 1
        review.gate.set()
        await first.send(report(1))
        assert (await first.receive()).ack.sequence == 1
        again = Agent(port, "sa-token-of-gpu-2")       # its turn now
        await again.send(register("gpu-2", address="127.0.0.2:50052"))
        await again.send(report(1))
        assert (await again.receive()).ack.sequence == 1
        for agent in (first, second, again):
            await agent.close()


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.5:41234", "10.0.0.5"),
    ("ipv6:%5B::1%5D:41234", "::1"),                    # what grpc reports
    ("ipv6:[::1]:41234", "::1"),
    ("ipv6:%5Bfd00::5%5D:41234", "fd00::5"),
    ("ipv6:%5B::ffff:10.0.0.5%5D:41234", "::ffff:10.0.0.5"),
    ("ipv6:%5Bfe80::1%25eth0%5D:41234", "fe80::1%eth0"),  # a zone id, its % encoded
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
    ("unix:", "unix:"),
])
def test_a_peer_is_named_by_its_address_without_the_port(peer: str, host: str) -> None:
    assert grpc_server._peer_host(peer) == host


@pytest.mark.parametrize("spelling", [
    "localhost:50052", "127.0.0.1:050052", "[::ffff:127.0.0.1]:50052", "127.1:50052",
    "LOCALHOST.:50052"])
def test_one_socket_spelled_another_way_is_the_same_address(spelling: str) -> None:
    reg = registry.Registry(ManualClock(), 15.0)
    reg.register(types.NodeInfo(name="a", address="127.0.0.1:50052", node_key="k" * 64))
    with pytest.raises(registry.AddressTaken):
        reg.register(types.NodeInfo(name="b", address=spelling, node_key="s" * 64))
    assert reg.node_key_at(spelling) == "k" * 64


def test_a_silent_node_whose_address_was_taken_meanwhile_is_not_up_again() -> None:
    """Down by silence, its stream still open, a node's address was registered by another;
    its next report made both up at one address (their keys and pins mixed up). Now the
    report is refused, which ends its stream: registering again meets AddressTaken."""
    clock = ManualClock()
    reg = registry.Registry(clock, 10.0)
    x = reg.register(types.NodeInfo(name="x", address="10.0.0.5:50052", node_key="x" * 64))
    clock.now += 11
    reg.register(types.NodeInfo(name="y", address="10.0.0.5:50052", node_key="y" * 64))
    assert not reg.report("x", [], stream_id=x)
    assert [n.info.name for n in reg.nodes() if n.status != "down"] == ["y"]
    assert reg.node_key_at("10.0.0.5:50052") == "y" * 64


def test_ipv6_addresses_compare_with_or_without_brackets() -> None:
    assert registry.address_key("fd00::5:50052") == registry.address_key("[fd00:0::5]:50052")
    assert registry.address_key("gpu-1.example.:50052") == "gpu-1.example:50052"


@pytest.mark.parametrize("address", ["dns:///cp.example:50052", "ipv4:10.0.0.1:50052",
                                     "unix:/tmp/agent.sock", "10.0.0.1", "10.0.0.1:port"])
async def test_a_node_address_that_is_not_host_and_port_is_invalid(address: str) -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address=address))
        assert await agent.refused() == grpc.StatusCode.INVALID_ARGUMENT
        await agent.close()
        assert svc.registry.nodes() == []


async def test_a_command_goes_to_the_nodes_newest_stream_and_the_older_one_ends(
        tmp_path: pathlib.Path) -> None:
    """In a serving worker a newer copy of a node's stream takes over at once; a command
    queued then must not be taken (and lost) by the older stream's pump."""
    settings = t.settings(auth={"agent_token": SHARED, "allow_unauthenticated_agents": False})
    svc = services_mod.build(settings)
    sock = tmp_path / "worker.sock"
    server, _ = await grpc_server.start(f"unix:{sock}", None,
                                        [grpc_server.control_plane(svc, relayed=True)])
    try:
        channels = [grpc.aio.insecure_channel(f"unix:{sock}") for _ in range(2)]
        older, newer = (Agent.__new__(Agent) for _ in range(2))
        for agent, channel in zip((older, newer), channels, strict=True):
            agent.channel = channel
            agent.outgoing = asyncio.Queue()
            agent.call = controlplane_pb2_grpc.ControlPlaneStub(channel).Connect(
                agent._messages(), metadata=call_metadata.metadata(SHARED))
        await older.send(register("gpu-1"))
        await older.send(report(1))
        await older.receive()
        await newer.send(register("gpu-1"))
        await newer.send(report(1))
        await newer.receive()
        sent = asyncio.create_task(svc.registry.send_command(
            "gpu-1", types.Command("drain", grace_seconds=1)))
        command = await newer.receive()
        assert command.WhichOneof("body") == "drain"
        await newer.send(controlplane_pb2.AgentMessage(command_ack=controlplane_pb2.CommandAck(
            command_id=command.command_id, ok=True)))
        assert (await sent).ok
        assert await older.call.read() == grpc.aio.EOF           # the older stream ended
        for agent in (older, newer):
            await agent.close()
    finally:
        await server.stop(0)
