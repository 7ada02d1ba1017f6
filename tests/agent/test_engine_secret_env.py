"""Variables the agent's secrets are read from stay out of its engines: with
``control_plane.token: {env: NAME}`` the engine's environment carried NAME, the agent's
token, as only ``SYNAPSE_*`` variables were removed."""

from __future__ import annotations

import pathlib

import psutil
import pytest

from agent import config
from synapse_common import settings
from tests import fleet, harness

VARIABLE = "SECRET_SOURCE_AGENT_TOKEN"
TOKEN = "sk-agent-token-from-env-0123456789"


def test_the_loader_names_the_variables_secrets_were_read_from(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, TOKEN)
    path = fleet.write_yaml(tmp_path / "agent.yaml", {
        "node_name": "n", "control_plane": {"token": {"env": VARIABLE}}})
    read: set[str] = set()
    loaded = settings.load(config.AgentSettings, str(path), environ={}, secret_env=read)
    assert loaded.control_plane.token is not None
    assert loaded.control_plane.token.get_secret_value() == TOKEN
    assert read == {VARIABLE}


def test_an_engine_does_not_inherit_the_variable_the_agents_token_came_from(
        tmp_path: pathlib.Path) -> None:
    port = harness.free_port()
    agent = fleet.agent_config("n", [f"127.0.0.1:{harness.free_port()}"], {"sim": port},
                               tmp_path / "logs")
    agent["control_plane"]["token"] = {"env": VARIABLE}
    agent["backends"][0]["env"] = {"BACKENDS_OWN": "1"}
    pool = harness.ProcessPool(tmp_path)
    try:
        proc = pool.start("agent", ["synapse", "agent", "--config",
                                    str(fleet.write_yaml(tmp_path / "agent.yaml", agent))],
                          env={VARIABLE: TOKEN, "UNRELATED_VARIABLE": "kept"})
        url = f"http://127.0.0.1:{port}/health"
        harness.wait_until(lambda: harness.http_ok(url), 60, "the engine", proc=proc)
        environ = _listener_environ(port)
        assert environ.get("UNRELATED_VARIABLE") == "kept"
        assert environ.get("BACKENDS_OWN") == "1"
        assert VARIABLE not in environ
        assert TOKEN not in "\0".join(environ.values())
    finally:
        pool.stop_all()


def _listener_environ(port: int) -> dict[str, str]:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port \
                and conn.pid:
            return psutil.Process(conn.pid).environ()
    raise AssertionError(f"nothing listens on port {port}")
