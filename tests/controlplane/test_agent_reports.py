"""What a hostile agent's reports cannot do: name more backends or models than any agent
runs, smuggle control characters in through backend or model names, or leave the control
plane's sockets open to backends it reported and dropped. A real gRPC server; the test
plays the agent (it holds the shared token every node holds)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane.adapters import agent_relay
from controlplane.api import agent_messages, grpc_server
from controlplane.api import services as services_mod
from protos.synapse.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from tests.clock import ManualClock, SteppedSleep
from tests.controlplane import cp_testing as t
from tests.controlplane.test_agent_identity import (
    SHARED,
    StandInReview,
    control_plane,
    pod,
    register,
    registered,
)
from tests.controlplane.test_grpc_server import Agent


def backend(name: str, url: str = "http://127.0.0.1:8000",
            models: list[str] | None = None) -> common_pb2.BackendState:
    return common_pb2.BackendState(
        name=name, url=url, models=models or [t.MODEL], phase=common_pb2.BACKEND_PHASE_READY,
        engine=common_pb2.ENGINE_KIND_VLLM, task=common_pb2.BACKEND_TASK_GENERATE)


def report(seq: int, *backends: common_pb2.BackendState) -> controlplane_pb2.AgentMessage:
    return controlplane_pb2.AgentMessage(report=controlplane_pb2.Report(
        sequence=seq, backends=list(backends)))


async def ended_with(agent: Agent) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            await agent.receive()
    return err.value


async def test_a_report_naming_more_backends_than_any_agent_runs_is_refused() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("b0")))
        await agent.receive()
        many = [backend(f"b{i}", url=f"http://127.0.0.1:{20000 + i}")
                for i in range(agent_messages.MAX_BACKENDS + 1)]
        await agent.send(report(2, *many))
        err = await ended_with(agent)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {agent_messages.MAX_BACKENDS}" in (err.details() or "")
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["b0"]
        assert view.report.sequence == 1
        await agent.close()


async def test_a_backend_with_more_models_than_any_engine_serves_is_refused() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        models = [f"m{i}" for i in range(agent_messages.MAX_MODELS + 1)]
        await agent.send(report(1, backend("b0", models=models)))
        err = await ended_with(agent)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {agent_messages.MAX_MODELS}" in (err.details() or "")
        assert "m3" not in svc.registry.served_models()
        await agent.close()


async def test_as_many_backends_and_models_as_allowed_are_taken() -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        models = [f"m{i}" for i in range(agent_messages.MAX_MODELS)]
        many = [backend(f"b{i}", models=models) for i in range(agent_messages.MAX_BACKENDS)]
        await agent.send(report(1, *many))
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and len(view.backends) == agent_messages.MAX_BACKENDS
        await agent.close()


@pytest.mark.parametrize("name", ["b\r\nSet-Cookie: x=y", "\x1b[2Jansi", 'q"}\nfake{a="1',
                                  "", "-leading-dash", "a/b", "x" * 254])
async def test_a_backend_whose_name_cannot_be_a_label_or_header_is_left_out(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        for seq in (1, 2, 3):
            await agent.send(report(seq, backend(name), backend("good")))
            assert (await agent.receive()).ack.sequence == seq
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["good"]
        assert [b.name for b in view.report.backends] == ["good"]
        warnings = [r for r in caplog.records if "left out" in r.getMessage()]
        assert len(warnings) == 1                       # once per stream, not per report
        assert name not in warnings[0].getMessage() or not name
        await agent.close()


@pytest.mark.parametrize("model", ["evil\nmodel", "m\x1b[31m", "m\u202e", "", "m" * 257,
                                   "tab\there"])
async def test_a_backend_with_a_model_name_holding_controls_is_left_out(model: str) -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("evil", models=[t.MODEL, model]),
                                backend("good")))
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["good"]
        assert model not in svc.registry.served_models()
        await agent.close()


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct", "llama3.1:8b",
                                   "My Model", "modèle-ü"])
def test_real_model_names_are_taken(model: str) -> None:
    assert agent_messages.backend_problem(backend("vllm-0", models=[model])) is None


async def test_the_sockets_to_a_dropped_backend_are_closed() -> None:
    async with t.backends(("sim", "ok")) as (b,):
        settings = t.settings(auth={"agent_token": SHARED, "allow_unauthenticated_agents":
                                    False})
        async with t.running(settings, with_grpc=True) as cp:
            agent = Agent(cp.grpc_port, SHARED)
            await agent.send(register("gpu-1", address="127.0.0.1:50052"))
            await agent.send(report(1, backend("sim", url=b.url)))
            await agent.receive()
            client = cp.client()
            for _ in range(3):
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hi"}])
            upstream = cp.services.upstream
            assert upstream.open_connections >= 1
            await agent.send(report(2))                 # the backend is gone
            await agent.receive()
            assert upstream.open_connections == 0
            await agent.send(report(3, backend("sim", url=b.url)))
            await agent.receive()
            await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}])
            assert upstream.open_connections >= 1
            await agent.close()                          # the node leaves
            for _ in range(200):
                if upstream.open_connections == 0:
                    break
                await asyncio.sleep(0.02)
            assert upstream.open_connections == 0
            await client.close()


async def node_with_backends(services: services_mod.Services, node: str) -> Any:
    """``node``'s registry view once it holds backends (or what it holds after 4 s)."""
    for _ in range(200):
        view = services.registry.node(node)
        if view is not None and view.backends:
            break
        await asyncio.sleep(0.02)
    return view


async def test_a_worker_gets_the_report_without_the_backends_left_out(
        tmp_path: pathlib.Path) -> None:
    async with pod(tmp_path, StandInReview()) as (_primary, worker, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("bad\nname"), backend("good")))
        await agent.receive()
        await registered(worker, "gpu-1")
        view = await node_with_backends(worker, "gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["good"]
        await agent.close()



async def test_a_backend_away_from_the_nodes_own_address_is_not_taken(
        caplog: pytest.LogCaptureFixture) -> None:
    """The test's agent connects from 127.0.0.1: its engines are on loopback, and a
    backend it reports at another node's address or the metadata service is left out."""
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        for seq in (1, 2):
            await agent.send(report(seq, backend("other", url="http://10.0.0.9:8000"),
                                    backend("meta", url="http://169.254.169.254/latest"),
                                    backend("good", url="http://127.0.0.1:8000")))
            await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["good"]
        assert [b.name for b in view.report.backends] == ["good"]
        assert not [b for b, _ in svc.registry.all_backends() if "10.0.0.9" in b.url]
        warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
        assert len(warnings) == 1 and "10.0.0.9" in warnings[0]
        assert "registry.engine_hosts" in warnings[0]
        await agent.close()


async def test_the_operator_allows_more_hosts_but_not_the_metadata_service() -> None:
    async with control_plane(engine_hosts=["10.0.0.0/8", "0.0.0.0/0"]) as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("other", url="http://10.0.0.9:8000"),
                                backend("meta", url="http://169.254.169.254/latest")))
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["other"]
        await agent.close()


def test_an_engine_hosts_entry_that_is_no_host_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"(?s)engine_hosts.*not an IP address, a CIDR"):
        t.settings(registry={"engine_hosts": ["http://10.0.0.9:8000"]})


async def test_a_worker_takes_the_hosts_its_primary_allowed_and_no_others(
        tmp_path: pathlib.Path) -> None:
    """The worker's stream comes from its primary over a unix socket: it cannot judge the
    agent's address, so it takes what the primary took and nothing the primary left out."""
    settings = t.settings(auth={"agent_token": SHARED, "allow_unauthenticated_agents": False},
                          registry={"engine_hosts": ["10.0.0.0/24"]})
    sock = tmp_path / "worker.sock"
    worker = services_mod.build(settings, commands_agents=False)
    wserver, _ = await grpc_server.start(f"unix:{sock}", None,
                                         [grpc_server.control_plane(worker, relayed=True)])
    primary = services_mod.build(settings)
    relay = agent_relay.AgentRelay([str(sock)], SHARED)
    pserver, port = await grpc_server.start("127.0.0.1", 0,
                                            [grpc_server.control_plane(primary, relay)])
    try:
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("allowed", url="http://10.0.0.9:8000"),
                                backend("elsewhere", url="http://10.0.1.9:8000"),
                                backend("loop", url="http://127.0.0.1:8000")))
        await agent.receive()
        await registered(worker, "gpu-1")
        view = await node_with_backends(worker, "gpu-1")
        assert view is not None
        assert sorted(b.name for b in view.backends) == ["allowed", "loop"]
        await agent.close()
    finally:
        await pserver.stop(0)
        await wserver.stop(0)


@contextlib.asynccontextmanager
async def paced_control_plane(sleep: SteppedSleep) -> AsyncIterator[
        tuple[services_mod.Services, int]]:
    """A control plane on ``sleep``'s clock whose servicer waits through ``sleep``."""
    settings = t.settings(auth={"agent_token": SHARED, "allow_unauthenticated_agents": False})
    svc = services_mod.build(settings, clock=sleep.clock)

    def add(server: grpc.aio.Server) -> str:
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(  # type: ignore[no-untyped-call]
            grpc_server.ControlPlaneServicer(svc, sleep=sleep), server)
        return "synapse.v1.ControlPlane"

    server, port = await grpc_server.start("127.0.0.1", 0, [add])
    try:
        yield svc, port
    finally:
        await server.stop(0)


async def test_reports_sent_in_a_loop_are_applied_at_most_once_per_gap() -> None:
    """An agent writing reports as fast as it can is held to one report per
    ``MIN_REPORT_GAP_S`` (the control plane waits before the next, the stream's flow
    control holds the agent back); one that comes after the gap does not wait, and no
    report is lost."""
    clock = ManualClock(100.0)
    sleep = SteppedSleep(clock)
    async with paced_control_plane(sleep) as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        for seq in range(1, 6):
            await agent.send(report(seq, backend(f"b{seq}")))
        assert [(await agent.receive()).ack.sequence for _ in range(5)] == [1, 2, 3, 4, 5]
        assert sleep.calls == pytest.approx([grpc_server.MIN_REPORT_GAP_S] * 4)
        clock.now += grpc_server.MIN_REPORT_GAP_S
        await agent.send(report(6, backend("b6")))
        assert (await agent.receive()).ack.sequence == 6
        assert len(sleep.calls) == 4
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["b6"]
        await agent.close()


async def test_registers_sent_in_a_loop_are_paced_like_reports() -> None:
    """A later Register remakes the registry's views as a report does: an agent writing
    Registers in a loop is held to the same gap, shared with its reports, so it cannot
    have every view remade at the rate it writes."""
    clock = ManualClock(100.0)
    sleep = SteppedSleep(clock)
    async with paced_control_plane(sleep) as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        for _ in range(5):
            await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("b1")))
        assert (await agent.receive()).ack.sequence == 1
        assert sleep.calls == pytest.approx([grpc_server.MIN_REPORT_GAP_S] * 5)
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["b1"]
        await agent.close()
