"""Which models a node may claim (``registry.node_models``, :mod:`controlplane.core
.node_models`): off, a node is routed any model it reports; on, a backend claiming a
model not listed for its node nor placed on it by the control plane is left out of the
report (one warning naming node and model), and so is such an embedder of its Register.
A real gRPC server; the test plays the agent (it holds the shared token every node
holds)."""

from __future__ import annotations

import logging

import pytest

from controlplane.core import node_models
from tests.controlplane import cp_testing as t
from tests.controlplane.test_agent_identity import SHARED, control_plane, register
from tests.controlplane.test_agent_reports import backend, report
from tests.controlplane.test_grpc_server import Agent


def left_out(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "left out" in r.getMessage()]


async def test_without_the_setting_a_node_is_routed_any_model_it_reports(
        caplog: pytest.LogCaptureFixture) -> None:
    async with control_plane() as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("b0", models=["anything"])))
        await agent.receive()
        assert "anything" in svc.registry.served_models()
        assert not left_out(caplog)
        await agent.close()


async def test_a_node_claiming_a_model_not_listed_for_it_is_not_routed_that_model(
        caplog: pytest.LogCaptureFixture) -> None:
    async with control_plane(node_models={"gpu-1": [t.MODEL]}) as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        for seq in (1, 2):
            await agent.send(report(seq, backend("steal", url="http://127.0.0.1:8001",
                                                 models=["gpt-4o"]),
                                    backend("mixed", url="http://127.0.0.1:8002",
                                            models=[t.MODEL, "gpt-4o-mini"]),
                                    backend("own", url="http://127.0.0.1:8000")))
            assert (await agent.receive()).ack.sequence == seq
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["own"]
        assert [b.name for b in view.report.backends] == ["own"]
        served = svc.registry.served_models()
        assert t.MODEL in served and "gpt-4o" not in served and "gpt-4o-mini" not in served
        warnings = left_out(caplog)
        assert len(warnings) == 1               # once per stream, not per report
        assert "gpu-1" in warnings[0] and "'gpt-4o'" in warnings[0]
        assert "registry.node_models" in warnings[0] and SHARED not in warnings[0]
        await agent.close()


async def test_the_star_entry_holds_for_nodes_without_one_of_their_own() -> None:
    setting = {"*": ["shared-model"], "gpu-1": [t.MODEL]}
    async with control_plane(node_models=setting) as (svc, port):
        one, two = Agent(port, SHARED), Agent(port, SHARED)
        await one.send(register("gpu-1", address="127.0.0.1:50052"))
        await one.send(report(1, backend("a", models=["shared-model"]),
                              backend("b", url="http://127.0.0.1:8001")))
        await one.receive()
        await two.send(register("gpu-2", address="127.0.0.1:50053"))
        await two.send(report(1, backend("a", url="http://127.0.0.1:8002",
                                         models=["shared-model"]),
                              backend("b", url="http://127.0.0.1:8003")))
        await two.receive()
        # gpu-1's own entry replaces '*'; gpu-2 has none, so '*' is its list
        assert [b.name for b in svc.registry.node("gpu-1").backends] == ["b"]  # type: ignore[union-attr]
        assert [b.name for b in svc.registry.node("gpu-2").backends] == ["a"]  # type: ignore[union-attr]
        await one.close()
        await two.close()


async def test_a_model_the_control_plane_placed_on_the_node_needs_no_entry() -> None:
    """What ``DeployModel`` writes: the node's desired engines in the stored intent (the
    names the agent reports: servedModelNames, else the model)."""
    async with control_plane(node_models={"gpu-1": [t.MODEL]}) as (svc, port):
        await svc.fleet.intent.set_fields("gpu-1", desired={
            "placed-vllm": {"name": "placed-vllm", "model": "org/placed",
                            "servedModelNames": ["placed"]}})
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("placed-vllm", url="http://127.0.0.1:8001",
                                           models=["placed"]),
                                backend("elsewhere", url="http://127.0.0.1:8002",
                                        models=["org/placed"])))
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and [b.name for b in view.backends] == ["placed-vllm"]
        await agent.close()
    assert node_models.placed_models({"e": {"model": "m"}}) == {"m"}


async def test_an_embedder_the_node_may_not_serve_is_dropped_from_its_register(
        caplog: pytest.LogCaptureFixture) -> None:
    async with control_plane(node_models={"gpu-1": ["other"]}) as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))   # embeds minilm
        await agent.send(report(1, backend("b0", models=["other"])))
        await agent.receive()
        view = svc.registry.node("gpu-1")
        assert view is not None and view.info.embed_models == ()
        assert not [n for n in svc.registry.ready_embed_nodes() if "minilm" in n.embed_models]
        assert any("'minilm'" in r.getMessage() and "gpu-1" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
        await agent.close()
    async with control_plane(node_models={"*": ["minilm"]}) as (svc, port):
        agent = Agent(port, SHARED)
        await agent.send(register("gpu-1", address="127.0.0.1:50052"))
        await agent.send(report(1, backend("b0", models=["minilm"])))
        await agent.receive()
        assert svc.registry.node("gpu-1").info.embed_models == ("minilm",)  # type: ignore[union-attr]
        await agent.close()


@pytest.mark.parametrize(("setting", "field"), [
    ({"gpu-1": ["ok", "bad\nname"]}, r"registry\.node_models\.gpu-1\.1\b"),
    ({"gpu-1": [""]}, r"registry\.node_models\.gpu-1\.0\b"),
    ({"gpu/1": ["ok"]}, r"registry\.node_models\.gpu/1"),
    ({"gpu-1": "ok"}, r"registry\.node_models\.gpu-1\b"),
])
def test_a_bad_node_models_setting_is_a_config_error_naming_the_entry(
        setting: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        t.settings(registry={"node_models": setting})


def test_a_good_node_models_setting_is_taken() -> None:
    s = t.settings(registry={"node_models": {"*": ["a"], "gpu-1.zone_b": [], "g": ["m/x:1"]}})
    assert s.registry.node_models == {"*": ["a"], "gpu-1.zone_b": [], "g": ["m/x:1"]}
    assert t.settings().registry.node_models is None
