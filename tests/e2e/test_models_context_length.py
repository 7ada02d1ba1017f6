"""``GET /v1/models`` through the whole path: two simulated vLLM engines an agent
supervises, one told a short context, one left to settle on its own; each engine lists
its ``max_model_len`` in its own ``/v1/models``, the agent reports it, and the control
plane lists the model with the shorter (a request may go to either engine).

Real processes throughout: control plane, agent, engines; the official openai client.
"""

from __future__ import annotations

import openai
import pytest

from tests import fleet, harness

pytestmark = pytest.mark.timeout(300)

SHORT = 4096


def test_the_listing_carries_the_shortest_context_of_the_engines_serving_a_model(
        tmp_path) -> None:
    pool = harness.ProcessPool(tmp_path)
    http, grpc = harness.free_port(), harness.free_port()
    cp = fleet.controlplane_config("cp", http, grpc, tmp_path / "cp-data")
    agent = fleet.agent_config("ctx-node", [f"127.0.0.1:{grpc}"],
                               {"short": harness.free_port(), "long": harness.free_port()},
                               tmp_path / "logs")
    agent["backends"][0]["max_model_len"] = SHORT
    base = f"http://127.0.0.1:{http}"
    try:
        pool.start("cp", ["synapse", "controlplane", "--config",
                          str(fleet.write_yaml(tmp_path / "cp.yaml", cp))],
                   ready_url=base + "/health")
        proc = pool.start("agent", ["synapse", "agent", "--config",
                                    str(fleet.write_yaml(tmp_path / "agent.yaml", agent))])
        harness.wait_until(lambda: fleet.backends_ready(base) == 2, 60,
                           "the agent's two engines to be ready", proc=proc)
        client = openai.OpenAI(base_url=base + "/v1", api_key=fleet.TENANT_KEY,
                               max_retries=0, timeout=30)
        listed = {m.id: m.model_dump() for m in client.models.list()}
        assert listed[fleet.MODEL]["max_model_len"] == SHORT
        assert listed["llama"]["max_model_len"] == SHORT
    finally:
        pool.stop_all()
