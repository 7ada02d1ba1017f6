"""The engine key: one derivation for the agent and the control plane."""

from __future__ import annotations

import hashlib
import hmac
import pathlib

from agent import config as agent_config
from controlplane import config as cp_config
from synapse_common import engine_key

TOKEN = "engine-key-test-agent-token-5b7d"


def test_the_key_is_the_hmac_of_the_context_under_the_agent_token() -> None:
    want = hmac.new(TOKEN.encode(), b"synapse/engine-key/v1", hashlib.sha256).hexdigest()
    assert engine_key.derive(TOKEN) == want
    assert engine_key.derive(TOKEN + "x") != want and TOKEN not in want


def test_no_agent_token_no_key() -> None:
    assert engine_key.derive(None) is None and engine_key.derive("") is None
    assert engine_key.headers(None) == {}


def test_both_sides_derive_the_same_key_from_one_token_file(tmp_path: pathlib.Path) -> None:
    """The agent reads ``control_plane.token``, the control plane ``auth.agent_token``;
    from the same file they get the same key."""
    path = tmp_path / "agent-token"
    path.write_text(TOKEN + "\n")
    agent = agent_config.AgentSettings.model_validate(
        {"control_plane": {"token": {"file": str(path)}}})
    cp = cp_config.ControlPlaneSettings.model_validate(
        {"auth": {"agent_token": {"file": str(path)}}})
    token = agent.control_plane.token
    assert token is not None
    on_agent = engine_key.derive(token.get_secret_value())
    on_cp = engine_key.derive(cp.auth.agent_token_value)
    assert on_agent is not None and on_agent == on_cp
    assert engine_key.headers(on_cp) == {"Authorization": f"Bearer {on_agent}"}
