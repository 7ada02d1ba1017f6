"""The Admin gRPC service on a real gRPC server, with test agents speaking the wire
contract (Register, Report, CommandAck) on real Connect streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import stat
import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane import config, errors
from controlplane.api import admin_grpc, fleet_wiring, grpc_server
from controlplane.api import services as services_mod
from controlplane.core import fleet as fleet_mod
from controlplane.core import router as router_mod
from protos.synapse.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    controlplane_pb2,
    controlplane_pb2_grpc,
)
from tests import grpc_wire, harness
from tests.clock import ManualClock, SteppedSleep

ADMIN_KEY = "admin-key-for-admin-tests"
TENANT_KEY = "tenant-key-for-admin-tests"
MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
GIB = 1024**3


def settings(redis_url: str | None = None, data_dir: pathlib.Path | None = None,
             **extra: Any) -> config.ControlPlaneSettings:
    data: dict[str, Any] = {
        "replica_id": "test", "grpc": {"host": "127.0.0.1", "port": 0},
        # the test plays the agents (agent tokens: tests/security/test_agent_auth.py)
        "auth": {"admin_key": ADMIN_KEY, "tenants": [{"name": "t", "keys": [TENANT_KEY]}],
                 "allow_unauthenticated_agents": True},
        "models": [{"name": MODEL, "aliases": ["llama"]}],
        "cache": {"enabled": False},
    }
    if redis_url:
        data["redis"] = {"url": redis_url}
    if data_dir:
        data["data_dir"] = str(data_dir)
    return config.ControlPlaneSettings.model_validate({**data, **extra})


class Replica:
    """One control-plane replica's gRPC side: Connect + Admin on a free port, and the fleet
    service's reconcile loop (the app's cleanup context runs it in a real process). The
    fleet's time is stepped: its waits (drain timeouts, the pause between reconcile
    passes) move a manual clock and last a twentieth of that in real time."""

    def __init__(self, s: config.ControlPlaneSettings) -> None:
        self.services = services_mod.build(s)
        self.time = SteppedSleep(ManualClock(), scale=0.05)
        svc = self.services
        svc.fleet = fleet_wiring.build(s, svc.registry, svc.ledger, svc.metrics,
                                       clock=self.time.clock, sleep=self.time)
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> Replica:
        self.server, port = await grpc_server.start(
            "127.0.0.1", 0, [grpc_server.control_plane(self.services),
                             admin_grpc.admin(self.services)])
        self.address = f"127.0.0.1:{port}"
        self.fleet.start()
        return self

    @property
    def fleet(self) -> fleet_mod.FleetService:
        return self.services.fleet

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.fleet.stop(), 10)
        if self.server:
            # Bounded: a teardown must never be what hangs a run.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.stop(None), 10)


def _node_port(name: str) -> int:
    """The stand-in's Node-service port: on loopback, where the control plane takes an
    agent on its own host's, and one per node name (two nodes cannot hold one address)."""
    return 1 + zlib.crc32(name.encode()) % 60000


class AgentStandIn:
    """Speaks the agent side of ControlPlane.Connect; records and acknowledges commands."""

    def __init__(self, name: str, free_gb: float = 60.0, backends: int = 1) -> None:
        self.name = name
        self.free_gb = free_gb
        self.backend_count = backends
        self.commands: list[controlplane_pb2.ControlMessage] = []
        self.outgoing: asyncio.Queue[controlplane_pb2.AgentMessage | None] = asyncio.Queue()
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None

    def report(self, running: int = 0) -> controlplane_pb2.AgentMessage:
        gpu = common_pb2.GpuSample(index=0, uuid=f"GPU-{self.name}", name="Simulated GPU 80GB",
                                   memory_total_bytes=80 * GIB,
                                   memory_used_bytes=int((80 - self.free_gb) * GIB),
                                   memory_free_bytes=int(self.free_gb * GIB))
        backends = [common_pb2.BackendState(
            name=f"sim-{i}", url=f"http://127.0.0.1:{9000 + i}", models=[MODEL],
            engine=common_pb2.ENGINE_KIND_SIMULATOR, task=common_pb2.BACKEND_TASK_GENERATE,
            phase=common_pb2.BACKEND_PHASE_READY, num_requests_running=running,
            kv_capacity_tokens=448_000, kv_block_size=16, last_log_lines=["engine ready"])
            for i in range(self.backend_count)]
        return controlplane_pb2.AgentMessage(report=controlplane_pb2.Report(
            sequence=1, gpus=[gpu], backends=backends,
            telemetry=common_pb2.TelemetryStatus(source="fake", ok=True)))

    async def connect(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        stub = controlplane_pb2_grpc.ControlPlaneStub(self.channel)
        register = controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
            node_name=self.name, agent_version="test", node_address=f"127.0.0.1:{_node_port(self.name)}"))
        self.outgoing.put_nowait(register)
        self.outgoing.put_nowait(self.report())

        async def messages() -> AsyncIterator[controlplane_pb2.AgentMessage]:
            while (msg := await self.outgoing.get()) is not None:
                yield msg

        call = stub.Connect(messages())

        async def read() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for msg in call:
                    if msg.command_id:
                        self.commands.append(msg)
                        self.outgoing.put_nowait(controlplane_pb2.AgentMessage(
                            command_ack=controlplane_pb2.CommandAck(command_id=msg.command_id,
                                                                    ok=True)))
        self.task = asyncio.create_task(read())

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("body")) for m in self.commands]

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.task, 10)
        if self.channel:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.channel.close(), 10)


async def eventually(predicate: Any, what: str, limit_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Admin:
    def __init__(self, address: str, key: str | None = ADMIN_KEY) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()

    async def __call__(self, method: str, request: Any) -> Any:
        return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=20)


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[Replica, list[AgentStandIn], Admin]]:
    replica = await Replica(settings()).start()
    agents = [AgentStandIn("gpu-a", free_gb=30), AgentStandIn("gpu-b", free_gb=70)]
    for agent in agents:
        await agent.connect(replica.address)
    await eventually(lambda: len(replica.services.registry.routable(MODEL)) == 2, "two nodes")
    admin = Admin(replica.address)
    yield replica, agents, admin
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(admin.channel.close(), 10)
    for agent in agents:
        await agent.close()
    await replica.stop()


async def test_every_call_needs_the_admin_key(fleet) -> None:
    replica, _, _ = fleet
    for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                      (TENANT_KEY, grpc.StatusCode.PERMISSION_DENIED),
                      ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
        client = Admin(replica.address, key)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client("ListNodes", admin_pb2.ListNodesRequest())
        assert err.value.code() == code
        await client.channel.close()


async def test_a_call_without_the_admin_key_is_refused_on_its_headers(fleet) -> None:
    """A check that waited for the request message let whoever reaches the port make the
    control plane hold up to the receive limit per call, sent slowly or never finished
    (probe finding): a call that sends only its headers gets the same refusal at once."""
    replica, _, _ = fleet
    methods = admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods
    for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                      ("wrong", grpc.StatusCode.UNAUTHENTICATED),
                      (TENANT_KEY, grpc.StatusCode.PERMISSION_DENIED)):
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        for method in methods:
            got = await grpc_wire.headers_only(replica.address,
                                               f"/synapse.v1.Admin/{method.name}", metadata)
            assert got == code, (method.name, key, got)
    # the admin key lets the call in: it then waits for its message
    got = await grpc_wire.headers_only(replica.address, "/synapse.v1.Admin/ListNodes",
                                       (("authorization", f"Bearer {ADMIN_KEY}"),), 0.5)
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    # and the details are what callers were told before
    client = Admin(replica.address, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client("GetStats", admin_pb2.GetStatsRequest())
    assert "missing admin key" in (err.value.details() or "")
    await client.channel.close()


async def test_the_grpc_port_limits_streams_and_message_size(fleet) -> None:
    """Each connection of the port caps its open calls; the receive limit is the largest
    legitimate request's (an ExplainRoute prompt of MAX_PROMPT_CHARS four-byte
    characters), not the 8 MiB of grpc.max_message_bytes."""
    replica, _, admin = fleet
    host, port = replica.address.rsplit(":", 1)
    settings_ = await asyncio.to_thread(grpc_wire.server_settings, host, int(port))
    assert settings_[grpc_wire.MAX_CONCURRENT_STREAMS] == grpc_server.MAX_CONCURRENT_STREAMS
    widest = "\U0001F600" * admin_grpc.MAX_PROMPT_CHARS
    with pytest.raises(grpc.aio.AioRpcError) as err:    # taken, refused by the servicer
        await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(model="nope", prompt=widest))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(
            model="nope", prompt="x" * (grpc_server.MAX_RECEIVE_BYTES + 1)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_list_and_get_nodes_show_telemetry_backends_and_logs(fleet) -> None:
    _, _, admin = fleet
    nodes = await admin("ListNodes", admin_pb2.ListNodesRequest())
    assert [n.name for n in nodes.nodes] == ["gpu-a", "gpu-b"]
    assert all(n.status == admin_pb2.NODE_STATUS_READY and n.telemetry.ok for n in nodes.nodes)
    detail = await admin("GetNode", admin_pb2.GetNodeRequest(name="gpu-b"))
    assert detail.gpus[0].memory_free_bytes == 70 * GIB
    assert detail.backends[0].last_log_lines == ["engine ready"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin("GetNode", admin_pb2.GetNodeRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()


async def test_cordon_stops_routing_and_uncordon_restores_it(fleet) -> None:
    replica, _, admin = fleet
    reg = replica.services.registry
    detail = await admin("CordonNode", admin_pb2.CordonNodeRequest(name="gpu-a", reason="maint"))
    assert detail.summary.status == admin_pb2.NODE_STATUS_CORDONED
    assert [b.node for b in reg.routable(MODEL)] == ["gpu-b"]
    await admin("UncordonNode", admin_pb2.UncordonNodeRequest(name="gpu-a"))
    assert len(reg.routable(MODEL)) == 2


async def test_drain_sends_the_command_and_waits_for_in_flight(fleet) -> None:
    replica, agents, admin = fleet
    resp = await admin("DrainNode", admin_pb2.DrainNodeRequest(name="gpu-a", wait=True,
                                                               timeout_seconds=5,
                                                               grace_seconds=3))
    assert resp.drained and resp.in_flight == 0
    assert resp.node.summary.status == admin_pb2.NODE_STATUS_DRAINING
    assert agents[0].kinds() == ["drain"] and agents[0].commands[0].drain.grace_seconds == 3
    assert [b.node for b in replica.services.registry.routable(MODEL)] == ["gpu-b"]
    await admin("UncordonNode", admin_pb2.UncordonNodeRequest(name="gpu-a"))
    assert agents[0].kinds() == ["drain", "undrain"]
    assert len(replica.services.registry.routable(MODEL)) == 2


async def test_drain_wait_reports_engines_still_busy(fleet) -> None:
    replica, agents, admin = fleet
    agents[0].outgoing.put_nowait(agents[0].report(running=3))
    await eventually(lambda: replica.services.registry.node("gpu-a").backends[0].running == 3,
                     "busy report")
    resp = await admin("DrainNode", admin_pb2.DrainNodeRequest(name="gpu-a", wait=True,
                                                               timeout_seconds=0.5))
    assert not resp.drained and resp.in_flight == 3


async def test_deploy_to_named_node_sends_desired_backends_and_undeploy_removes(fleet) -> None:
    _, agents, admin = fleet
    resp = await admin("DeployModel", admin_pb2.DeployModelRequest(
        model="tiny-sim", engine=common_pb2.ENGINE_KIND_SIMULATOR, nodes=["gpu-a"],
        extra_args=["--time-scale", "0"]))
    assert [(p.node, p.backend, p.reason) for p in resp.placements] == [
        ("gpu-a", "tiny-sim-simulator", "deployed")]
    desired = agents[0].commands[-1].desired_backends.backends
    assert [(b.name, b.model, b.engine, list(b.extra_args)) for b in desired] == [
        ("tiny-sim-simulator", "tiny-sim", common_pb2.ENGINE_KIND_SIMULATOR,
         ["--time-scale", "0"])]
    assert list(agents[0].commands[-1].desired_backends.retry) == []
    again = await admin("DeployModel", admin_pb2.DeployModelRequest(
        model="tiny-sim", engine=common_pb2.ENGINE_KIND_SIMULATOR, nodes=["gpu-a"],
        extra_args=["--time-scale", "0"]))
    assert [p.reason for p in again.placements] == ["already deployed"]
    # deployed again: the agent is asked to retry it at once (were it crash-looping)
    assert list(agents[0].commands[-1].desired_backends.retry) == ["tiny-sim-simulator"]
    models = await admin("ListModels", admin_pb2.ListModelsRequest())
    assert {m.name: m.state for m in models.models}["tiny-sim"] == "deploying"
    removed = await admin("UndeployModel", admin_pb2.UndeployModelRequest(model="tiny-sim"))
    assert [p.backend for p in removed.removed] == ["tiny-sim-simulator"]
    assert list(agents[0].commands[-1].desired_backends.backends) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin("UndeployModel", admin_pb2.UndeployModelRequest(model="tiny-sim"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_placement_picks_most_headroom_and_refuses_when_nothing_fits(fleet) -> None:
    _, agents, admin = fleet
    resp = await admin("DeployModel", admin_pb2.DeployModelRequest(
        model="m-40g", engine=common_pb2.ENGINE_KIND_VLLM, memory_required_bytes=40 * GIB))
    assert [p.node for p in resp.placements] == ["gpu-b"]   # 70 GiB free beats 30
    assert agents[1].kinds() == ["desired_backends"] and agents[0].kinds() == []
    # gpu-b now has 40 GiB pending for an engine it has not reported: 30 left.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin("DeployModel", admin_pb2.DeployModelRequest(
            model="m-35g", engine=common_pb2.ENGINE_KIND_VLLM, memory_required_bytes=35 * GIB))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no node fits" in err.value.details() and "gpu-a: 30.0 GiB" in err.value.details()


async def test_bad_requests_name_the_field(fleet) -> None:
    _, _, admin = fleet
    cases = [
        ("DeployModel", admin_pb2.DeployModelRequest(model="x"), "engine"),
        ("DeployModel", admin_pb2.DeployModelRequest(engine=common_pb2.ENGINE_KIND_VLLM), "model"),
        ("DeployModel", admin_pb2.DeployModelRequest(model="x", engine=common_pb2.ENGINE_KIND_VLLM),
         "memory_required_bytes"),
        ("CordonNode", admin_pb2.CordonNodeRequest(name="n" * 300), "longer than"),
        # control characters would break engine command lines and synapsectl's tables
        ("DeployModel", admin_pb2.DeployModelRequest(
            model="../../etc\n\x00", engine=common_pb2.ENGINE_KIND_VLLM), "model holds"),
        ("DeployModel", admin_pb2.DeployModelRequest(
            model="m", engine=common_pb2.ENGINE_KIND_VLLM, served_model_names=["a\rb"]),
         "served_model_names holds"),
        ("DeployModel", admin_pb2.DeployModelRequest(
            model="m", engine=common_pb2.ENGINE_KIND_VLLM, extra_args=["--x\n--y"]),
         "extra_args holds"),
        ("InvalidateCache", admin_pb2.InvalidateCacheRequest(), "tenant, model or all"),
        ("ExplainRoute", admin_pb2.ExplainRouteRequest(model=MODEL), "prompt"),
        ("ExplainRoute", admin_pb2.ExplainRouteRequest(model=MODEL, messages_json="{"), "JSON"),
    ]
    for method, request, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin(method, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert text in err.value.details(), (method, err.value.details())


async def test_explain_lists_every_backend_with_its_verdict(fleet) -> None:
    _, _, admin = fleet
    await admin("CordonNode", admin_pb2.CordonNodeRequest(name="gpu-a"))
    resp = await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(
        model="llama", prompt="What is the capital of France?"))
    assert resp.model == MODEL and resp.policy == "predicted_ttft"
    by_node = {b.node: b for b in resp.backends}
    assert not by_node["gpu-a"].eligible and "cordoned" in by_node["gpu-a"].filter_reason
    assert by_node["gpu-b"].eligible and by_node["gpu-b"].rank == 1
    assert by_node["gpu-b"].predicted_ttft_seconds > 0 and by_node["gpu-b"].prompt_tokens > 0
    # no models[].tokenizer configured: the approximation, the configured costs
    assert resp.tokenizer == "approximate" and by_node["gpu-b"].cost_samples == 0
    assert by_node["gpu-b"].prefill_seconds_per_token > 0 and by_node["gpu-b"].block_size > 0
    assert resp.chosen_backend == "gpu-b/sim-0"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(model="nope", prompt="x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_explain_shows_a_session_only_as_its_tenants(fleet) -> None:
    replica, _, admin = fleet
    router = replica.services.router
    prompt = router_mod.Prompt.from_messages([{"role": "user", "content": "hi"}], 0,
                                             router_mod.session_key("t", "user-42"))
    decision = router.route(MODEL, prompt)
    assert decision is not None
    router.dispatched(decision, decision.candidates[0], prompt)
    pinned = decision.candidates[0].backend.name

    async def affine(**request: str) -> list[str]:
        resp = await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(
            model="llama", prompt="hi", session_id="user-42", **request))
        return [b.backend for b in resp.backends if b.session_affinity]

    assert await affine(tenant="t") == [pinned]
    with pytest.raises(grpc.aio.AioRpcError) as err:     # whose session is it?
        await affine()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant" in err.value.details()


async def test_explain_as_a_tenant_counts_its_cached_prefix(fleet) -> None:
    replica, _, admin = fleet
    text = " ".join(f"clause {i} binds party {i % 5}." for i in range(100))
    router = replica.services.router
    prompt = router_mod.Prompt.from_messages([{"role": "user", "content": text}])
    prompt.partition(replica.services.salt_for("t"))    # as tenant t's request is routed
    decision = router.route(MODEL, prompt)
    assert decision is not None
    router.dispatched(decision, decision.candidates[0], prompt)

    async def cached(**request: str) -> int:
        resp = await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(
            model="llama", prompt=text, **request))
        return max(b.cached_tokens for b in resp.backends)

    # Engines' caches are partitioned per tenant: a prompt explained for no tenant is in
    # no partition any request is in; as tenant t's, its cached prefix counts.
    assert await cached() == 0
    assert await cached(tenant="t") > 0
    assert await cached(tenant="t", cache_salt="another") == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cached(tenant="nobody")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "tenant" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cached(cache_salt="lonely")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant" in err.value.details()


async def test_stats_count_nodes_and_backends(fleet) -> None:
    _, _, admin = fleet
    stats = await admin("GetStats", admin_pb2.GetStatsRequest())
    assert stats.nodes_ready == 2 and stats.backends_ready == 2 and stats.replica == "test"


async def test_cordon_is_durable_across_replicas_with_redis(redis_server: harness.RedisServer) -> None:
    first = await Replica(settings(redis_server.url)).start()
    second = await Replica(settings(redis_server.url)).start()
    agents = [AgentStandIn("gpu-a"), AgentStandIn("gpu-a")]
    try:
        await agents[0].connect(first.address)
        await agents[1].connect(second.address)
        for r in (first, second):
            await eventually(lambda r=r: len(r.services.registry.routable(MODEL)) == 1, "node")
        admin = Admin(first.address)
        await admin("CordonNode", admin_pb2.CordonNodeRequest(name="gpu-a"))
        await admin.channel.close()
        # The other replica applies it on its next sync; a new replica at its first one.
        await eventually(lambda: second.services.registry.routable(MODEL) == [], "cordon on 2nd")
        third = await Replica(settings(redis_server.url)).start()
        try:
            await third.fleet.reconcile()
            assert third.fleet.intent.get("gpu-a").cordoned
        finally:
            await third.stop()
        deploy = Admin(second.address)
        await deploy("DeployModel", admin_pb2.DeployModelRequest(
            model="tiny", engine=common_pb2.ENGINE_KIND_SIMULATOR, nodes=["gpu-a"]))
        await deploy.channel.close()
        # The agent connected to the first replica hears of the deploy made on the second.
        await eventually(lambda: "desired_backends" in agents[0].kinds(), "desired via sync")
        spec = agents[0].commands[-1].desired_backends.backends[0]
        assert json.loads(json.dumps(spec.model)) == "tiny"
    finally:
        for agent in agents:
            await agent.close()
        await first.stop()
        await second.stop()


async def test_a_cordon_and_a_deploy_outlive_a_restart_without_redis(
        tmp_path: pathlib.Path) -> None:
    """Probe 82 F7: without Redis the intent lived in the process's memory, so any restart
    of the control plane silently put a cordoned node back into routing."""
    s = settings(data_dir=tmp_path / "data")
    first = await Replica(s).start()
    agent = AgentStandIn("gpu-a")
    try:
        await agent.connect(first.address)
        await eventually(lambda: len(first.services.registry.routable(MODEL)) == 1, "node")
        admin = Admin(first.address)
        await admin("CordonNode", admin_pb2.CordonNodeRequest(name="gpu-a", reason="bad GPU"))
        await admin("DeployModel", admin_pb2.DeployModelRequest(
            model="tiny", engine=common_pb2.ENGINE_KIND_SIMULATOR, nodes=["gpu-a"]))
        await admin.channel.close()
    finally:
        await agent.close()
        await first.stop()
    stored = tmp_path / "data" / "fleet_intent.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    second = await Replica(s).start()         # the restart: same config, same data_dir
    agent = AgentStandIn("gpu-a")
    try:
        await agent.connect(second.address)
        await eventually(lambda: second.services.registry.node("gpu-a") is not None, "node")
        await eventually(lambda: second.services.registry.node("gpu-a").cordoned, "cordon")
        assert second.services.registry.routable(MODEL) == []
        assert second.fleet.intent.get("gpu-a").reason == "bad GPU"
        await eventually(lambda: "desired_backends" in agent.kinds(), "desired engines")
        desired = [m for m in agent.commands if m.WhichOneof("body") == "desired_backends"]
        assert [b.model for b in desired[-1].desired_backends.backends] == ["tiny"]
    finally:
        await agent.close()
        await second.stop()


async def test_a_cordon_made_without_redis_holds_once_redis_is_configured(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path) -> None:
    """Review 91 F4: the first load from the new, empty Redis wrote {} over
    fleet_intent.json: the cordoned node was routed again and the cordon gone from disk."""
    first = await Replica(settings(data_dir=tmp_path / "data")).start()
    try:
        admin = Admin(first.address)
        await admin("CordonNode", admin_pb2.CordonNodeRequest(name="gpu-a", reason="bad GPU"))
        await admin.channel.close()
    finally:
        await first.stop()
    second = await Replica(settings(redis_server.url, data_dir=tmp_path / "data")).start()
    third = await Replica(settings(redis_server.url)).start()     # shares only Redis
    agent = AgentStandIn("gpu-a")
    try:
        await agent.connect(second.address)
        await eventually(lambda: second.services.registry.node("gpu-a") is not None, "node")
        await eventually(lambda: second.services.registry.node("gpu-a").cordoned, "cordon")
        assert second.services.registry.routable(MODEL) == []
        await third.fleet.reconcile()
        assert third.fleet.intent.get("gpu-a").reason == "bad GPU"
    finally:
        await agent.close()
        await second.stop()
        await third.stop()


async def test_an_upstreams_url_credentials_are_masked_in_admin_answers_and_the_repr(
        ) -> None:
    """Probe 82 F5: ``synapsectl get backends`` (and ``-o json``, ``get models -o yaml``)
    printed ``http://bob:hunter2url@…`` in clear, and so did the settings' repr."""
    s = settings(upstreams=[{"name": "cred", "url": "http://bob:hunter2url@127.0.0.1:9",
                             "models": [MODEL]}])
    assert "hunter2url" not in repr(s) + str(s) and "http://***@127.0.0.1:9" in repr(s)
    replica = await Replica(s).start()
    admin = Admin(replica.address)
    try:
        models = await admin("ListModels", admin_pb2.ListModelsRequest())
        explained = await admin("ExplainRoute", admin_pb2.ExplainRouteRequest(
            model=MODEL, prompt="hello"))
    finally:
        await admin.channel.close()
        await replica.stop()
    urls = [b.url for m in models.models for b in m.backends] + [
        b.url for b in explained.backends]
    assert urls == ["http://***@127.0.0.1:9"] * 2


@pytest.mark.parametrize("messages_json", ["[" * 100_000, "[" * 2000 + "]" * 2000,
                                           '[{"role": "user", "content": ' + "[" * 5000])
def test_explain_messages_nested_past_the_parsers_depth_are_invalid_argument(
        messages_json: str) -> None:
    """``messages_json`` nested deeper than the JSON parser recurses raised RecursionError:
    INTERNAL, logged with a traceback, instead of the bad request it is."""
    request = admin_pb2.ExplainRouteRequest(model="m", messages_json=messages_json)
    with pytest.raises(errors.BadRequest) as err:
        admin_grpc._messages(request)
    assert err.value.param == "messages_json"
