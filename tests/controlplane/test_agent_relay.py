"""The primary copies agent streams to its pod's serving workers (``api.agent_relay``).

A primary and a worker, each with its own services and a real gRPC server (the worker's
on a unix socket, as in a pod), in one event loop; the test plays the agent.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator

import pytest

from controlplane.adapters import agent_relay
from controlplane.api import grpc_server
from controlplane.api import services as services_mod
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane.test_grpc_server import Agent, register, report

TOKEN = "relay-agent-token-3e5a7c9b1d2f4068"


@contextlib.asynccontextmanager
async def worker(path: pathlib.Path, token: str | None = None,
                 ) -> AsyncIterator[services_mod.Services]:
    """A serving worker's Connect service on ``path``."""
    auth = {"agent_token": token, "allow_unauthenticated_agents": False} if token else {}
    svc = services_mod.build(t.settings(replica_id="test-w1", auth=auth),
                             commands_agents=False)
    server, _ = await grpc_server.start(f"unix:{path}", None,
                                        [grpc_server.control_plane(svc, relayed=True)])
    try:
        yield svc
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def primary(sockets: list[pathlib.Path], token: str | None = None,
                  ) -> AsyncIterator[int]:
    """The primary's Connect service (TCP), relaying to ``sockets``; its port."""
    svc = services_mod.build(t.settings())
    relay = agent_relay.AgentRelay([str(p) for p in sockets], token)
    server, port = await grpc_server.start("127.0.0.1", 0,
                                           [grpc_server.control_plane(svc, relay)])
    try:
        yield port
    finally:
        await server.stop(0)


def backend_waiting(svc: services_mod.Services, node: str = "gpu-1") -> int | None:
    view = svc.registry.node(node)
    if view is None or not view.connected or not view.backends:
        return None
    return view.backends[0].waiting


async def test_a_worker_sees_what_the_agent_reports_to_the_primary(tmp_path: pathlib.Path,
                                                                   ) -> None:
    sock = tmp_path / "grpc-1.sock"
    async with worker(sock, TOKEN) as w, primary([sock], TOKEN) as port:
        agent = Agent(port)
        await agent.send(register())
        await agent.send(report(1, "http://127.0.0.1:9"))
        assert (await agent.receive()).ack.sequence == 1       # the primary's ack
        await harness.until(lambda: backend_waiting(w) == 2, 10, "the worker's registry")
        view = w.registry.node("gpu-1")
        assert view is not None and view.backends[0].key == "gpu-1/sim"
        await agent.close()
        await harness.until(lambda: not w.registry.node("gpu-1").connected, 10,  # type: ignore[union-attr]
                            "the worker to see the agent's stream end")


async def test_a_worker_that_starts_late_or_restarts_gets_the_node_again(
        tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "grpc-1.sock"
    async with primary([sock]) as port:
        agent = Agent(port)
        await agent.send(register())
        await agent.send(report(1, "http://127.0.0.1:9"))
        await agent.receive()
        # The worker comes up after the agent registered: it is sent the node's Register
        # and its latest report, without waiting for the agent's next one.
        async with worker(sock) as w:
            await harness.until(lambda: backend_waiting(w) == 2, 10, "the late worker")
        async with worker(sock) as again:       # a restarted worker, same socket
            await harness.until(lambda: backend_waiting(again) == 2, 10,
                                "the restarted worker")
            await agent.send(report(2, "http://127.0.0.1:9"))
            await agent.receive()
        await agent.close()


async def test_a_worker_refuses_a_relay_without_the_agent_token(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="synapse.controlplane.relay")
    sock = tmp_path / "grpc-1.sock"
    async with worker(sock, TOKEN) as w, primary([sock], token=None) as port:
        agent = Agent(port)
        await agent.send(register())
        await agent.send(report(1, "http://127.0.0.1:9"))
        await agent.receive()
        await harness.until(lambda: "UNAUTHENTICATED" in caplog.text, 10,
                            "the worker to refuse the relay")
        assert w.registry.node("gpu-1") is None
        await agent.close()
