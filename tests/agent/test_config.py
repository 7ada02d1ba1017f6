"""The agent's settings refuse what it could not run as written."""

from __future__ import annotations

import pydantic
import pytest

from agent.config import AgentSettings


def _backend(name: str, port: int | None) -> dict[str, object]:
    return {"name": name, "engine": "simulator", "model": "m", "port": port}


def test_two_backends_on_one_port_are_refused_naming_them() -> None:
    """The second never bound its port, and its health probe, answered by the first,
    reported it ready for a model nobody served there (probe finding)."""
    with pytest.raises(pydantic.ValidationError, match=r"port 8191 is given to \['a', 'b'\]"):
        AgentSettings.model_validate({"backends": [_backend("a", 8191), _backend("b", 8191)]})
    AgentSettings.model_validate({"backends": [_backend("a", 8191), _backend("b", 8192),
                                               _backend("c", None), _backend("d", None)]})


def test_a_crashloop_retry_period_shorter_than_the_backoff_cap_is_refused_naming_both() -> None:
    with pytest.raises(pydantic.ValidationError,
                       match=r"crashloop_retry_s \(30\) must be at least backoff_max_s \(60\)"):
        AgentSettings.model_validate({"supervisor": {"crashloop_retry_s": 30}})
    settings = AgentSettings.model_validate({"supervisor": {"crashloop_retry_s": 60}})
    assert settings.supervisor.crashloop_retry == 60
    # A config that only raised backoff_max_s (it worked before the setting existed) still
    # starts: the default period follows it up.
    longer = AgentSettings.model_validate({"supervisor": {"backoff_max_s": 600}})
    assert longer.supervisor.crashloop_retry == 600
    assert AgentSettings.model_validate({}).supervisor.crashloop_retry == 300
