"""The keys an agent chooses for its own node (agent.node_keys) and the token it reads from
a file before every connection (control_plane.token_file): a real agent process, a
simulator engine, and the stand-in control plane that records what it was sent."""

from __future__ import annotations

import subprocess

import grpc
import pytest
import yaml

from agent.config import AgentSettings
from protos.synapse.v1 import common_pb2, node_pb2, node_pb2_grpc
from synapse_common import engine_key
from tests import harness, node_auth
from tests.agent.conftest import agent_config

SIM = {"name": "sim", "engine": "simulator", "model": "test-model"}


def _let_in(address: str, token: str | None) -> bool:
    """Whether a Node call presenting ``token`` gets past the token check (this agent has
    no embedder: a call let in is answered UNAVAILABLE)."""
    with node_auth.channel(address, token=token) as channel:
        try:
            node_pb2_grpc.NodeStub(channel).Embed(
                node_pb2.EmbedRequest(model="nothing-served", texts=["x"]), timeout=10)
        except grpc.RpcError as exc:
            return exc.code() != grpc.StatusCode.UNAUTHENTICATED  # type: ignore[no-any-return]
    return True


def test_the_agent_sends_keys_of_its_own_and_its_engine_and_node_service_use_them(
        tmp_path, control_plane, start_agent) -> None:
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[SIM]))
    harness.wait_until(lambda: (b := control_plane.recorder.last_backend("sim")) is not None
                       and b.phase == common_pb2.BACKEND_PHASE_READY, 60, "the engine ready",
                       proc=agent.proc)
    backend = control_plane.recorder.last_backend("sim")
    (register, *_) = control_plane.recorder.registers()
    assert len(register.engine_key) == 64 and len(register.node_key) == 64
    assert register.engine_key != register.node_key
    # the engine requires this node's key, not one every node holder could derive
    assert harness.engine_key_at(backend.url) == register.engine_key
    assert register.engine_key != engine_key.derive(node_auth.TOKEN)
    for key in (register.engine_key, register.node_key):
        assert key not in agent.proc.output()
    # the Node service takes the node's key (and the shared token it holds), nothing else
    assert _let_in(agent.grpc_address, register.node_key)
    assert _let_in(agent.grpc_address, node_auth.TOKEN)
    assert not _let_in(agent.grpc_address, register.engine_key)
    assert not _let_in(agent.grpc_address, None)


def test_a_token_file_is_read_again_for_every_connection(tmp_path, control_plane,
                                                         start_agent) -> None:
    token = tmp_path / "token"
    token.write_text("projected-token-one\n")
    cfg = agent_config(tmp_path, control_plane)
    cfg["control_plane"] = {**cfg["control_plane"], "token": None,
                            "token_file": str(token)}
    agent = start_agent(cfg)
    harness.wait_until(lambda: control_plane.recorder.bearers, 30, "a stream",
                       proc=agent.proc)
    assert control_plane.recorder.bearers[0] == "projected-token-one"
    token.write_text("projected-token-two")   # the kubelet rotated it
    control_plane.stop()
    control_plane.start()
    harness.wait_until(lambda: "projected-token-two" in control_plane.recorder.bearers, 30,
                       "a stream with the rotated token", proc=agent.proc)
    # the agent holds no shared token: its Node service takes its own key only
    (register, *_) = control_plane.recorder.registers()
    assert register.node_key
    assert _let_in(agent.grpc_address, register.node_key)
    assert not _let_in(agent.grpc_address, "projected-token-two")
    assert not _let_in(agent.grpc_address, node_auth.TOKEN)
    assert "projected-token" not in agent.proc.output()


def test_token_and_token_file_are_one_or_the_other(tmp_path) -> None:
    with pytest.raises(ValueError, match="token, token_file: set one of them"):
        AgentSettings.model_validate({"control_plane": {"token": "t" * 20,
                                                        "token_file": str(tmp_path / "t")}})


def test_an_unreadable_token_file_stops_the_start_naming_the_field(tmp_path,
                                                                  control_plane) -> None:
    cfg = agent_config(tmp_path, control_plane)
    cfg["control_plane"] = {**cfg["control_plane"], "token": None,
                            "token_file": str(tmp_path / "missing")}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([harness.console_script("synapse"), "agent", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "control_plane.token_file" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
