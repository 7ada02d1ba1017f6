"""Bad input that reaches a backend: the engine simulator must refuse it like vLLM (a
400) and keep serving, otherwise one client's request takes an engine down for all.

Found here: an empty prompt used to crash the simulator's engine loop (a sequence of
zero tokens; IndexError in ``Scheduler._register_blocks``) and the process exited.
"""

from __future__ import annotations

import json

from tests import fleet, harness
from tests.badinput.conftest import Gateway

EMPTY = ["", [""], ["x", ""]]


def test_an_empty_prompt_is_refused_and_the_engine_survives(
        processes: harness.ProcessPool) -> None:
    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    processes.start("simulator", fleet.simulator_argv(port, time_scale=0),
                    ready_url=f"{url}/health")
    for prompt in EMPTY:
        reply = fleet.request(url, "POST", "/v1/completions",
                              json.dumps({"model": fleet.MODEL, "prompt": prompt}).encode(),
                              key=None, timeout=10)
        assert reply.status == 400 and reply.json()["error"]["param"] == "prompt", reply.body
        assert harness.http_ok(f"{url}/health", timeout=10)     # alive, though maybe slow
    ok = fleet.request(url, "POST", "/v1/completions", json.dumps(
        {"model": fleet.MODEL, "prompt": "still here", "max_tokens": 2}).encode(), key=None)
    assert ok.status == 200


def test_an_empty_prompt_through_the_gateway_is_a_client_error(gateway: Gateway) -> None:
    for prompt in EMPTY:
        reply = fleet.request(gateway.url, "POST", "/v1/completions",
                              json.dumps({"model": "llama", "prompt": prompt}).encode())
        gateway.bodies.append(reply.body)
        assert reply.status == 400 and reply.is_envelope(), reply.body
    fleet.still_serving(gateway.url)
