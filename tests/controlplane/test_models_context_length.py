"""``GET /v1/models`` lists a model's ``max_model_len`` as vLLM's own listing does, from
what the agents report of their engines: the smallest of its routable backends' (a
request may go to any of them), and nothing when one of them does not say. A real gRPC
server and the control plane's HTTP app; the test plays the agent, and reads the listing
with the official client."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.api import agent_messages
from protos.synapse.v1 import common_pb2, controlplane_pb2
from tests.controlplane import cp_testing as t
from tests.controlplane.test_grpc_server import Agent

ADDRESS = "127.0.0.1:50052"     # the tests' agents connect from loopback


def backend(name: str, port: int, max_model_len: int,
            phase: int = common_pb2.BACKEND_PHASE_READY) -> common_pb2.BackendState:
    return common_pb2.BackendState(
        name=name, url=f"http://127.0.0.1:{port}", models=[t.MODEL], phase=phase,
        engine=common_pb2.ENGINE_KIND_VLLM, task=common_pb2.BACKEND_TASK_GENERATE,
        max_model_len=max_model_len)


def report(seq: int, *backends: common_pb2.BackendState) -> controlplane_pb2.AgentMessage:
    return controlplane_pb2.AgentMessage(report=controlplane_pb2.Report(
        sequence=seq, backends=list(backends)))


async def listing(cp: t.RunningCP) -> dict[str, dict[str, Any]]:
    page = await cp.client().models.list()
    return {m.id: m.model_dump() for m in page.data}


async def listed_after(cp: t.RunningCP, agent: Agent, seq: int,
                       *backends: common_pb2.BackendState) -> dict[str, dict[str, Any]]:
    """The listing once the control plane has taken report ``seq`` (its ack)."""
    await agent.send(report(seq, *backends))
    while (await agent.receive()).ack.sequence != seq:
        pass
    return await listing(cp)


async def test_a_model_lists_the_smallest_length_its_routable_backends_report() -> None:
    async with t.running(t.settings(), with_grpc=True) as cp:
        agent = Agent(cp.grpc_port)
        try:
            await agent.send(controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
                node_name="gpu-1", agent_version="test", node_address=ADDRESS)))
            models = await listed_after(cp, agent, 1, backend("a", 8000, 8192),
                                        backend("b", 8001, 4096))
            assert models[t.MODEL]["max_model_len"] == 4096
            assert models["llama"]["max_model_len"] == 4096    # an alias: the same engines
            # a backend that is not routable does not count, whatever it says
            models = await listed_after(cp, agent, 2, backend("a", 8000, 8192), backend(
                "b", 8001, 0, phase=common_pb2.BACKEND_PHASE_STARTING))
            assert models[t.MODEL]["max_model_len"] == 8192
            # one routable backend that does not say: the model's length is not known
            models = await listed_after(cp, agent, 3, backend("a", 8000, 8192),
                                        backend("b", 8001, 0))
            assert "max_model_len" not in models[t.MODEL]
            assert models[t.MODEL]["id"] == t.MODEL    # still listed, as before
        finally:
            await agent.close()


async def test_a_model_without_backends_lists_no_length() -> None:
    """A configured model no backend serves (yet) has no length to list."""
    async with t.running(t.settings()) as cp:
        models = await listing(cp)
        assert t.MODEL in models and "max_model_len" not in models[t.MODEL]


@pytest.mark.parametrize(("reported", "taken"), [
    (0, 0), (1, 1), (131_072, 131_072), (2**31 - 1, 2**31 - 1), (2**31, 0), (2**32 - 1, 0)])
def test_a_reported_length_outside_a_sane_range_is_unknown(reported: int, taken: int) -> None:
    """A report is a registrant's word: a length a client would be shown must be one an
    engine could have (a whole number up to 2**31 - 1), else it is not shown."""
    state = agent_messages.backend_state("gpu-1", backend("a", 8000, reported))
    assert state.max_model_len == taken
