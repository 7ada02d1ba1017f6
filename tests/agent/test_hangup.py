"""SIGHUP, as when the operator's terminal or ssh session closes, stops the agent as
SIGTERM does (a clean stop, exit 0) instead of killing it mid-report."""

from __future__ import annotations

import signal

from tests.agent.conftest import agent_config


def test_sighup_stops_the_agent_cleanly(tmp_path, control_plane, start_agent):
    agent = start_agent(agent_config(tmp_path, control_plane))
    agent.proc.signal(signal.SIGHUP)
    assert agent.proc.wait(timeout=30) == 0, agent.proc.output_tail()
