"""What each engine serves: defaults, config checks, and the paths it advertises."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from typing import Any

import pydantic
import pytest

from simulator import tasks
from simulator.config import SimulatorSettings
from tests import harness
from tests.simulator.conftest import Sim, start


def get(sim: Sim, path: str) -> Any:
    with urllib.request.urlopen(sim.url + path, timeout=10) as resp:
        return json.loads(resp.read())


def test_defaults_and_checks() -> None:
    assert tasks.resolve("vllm", []) == ("generate", "responses", "messages", "tokenize")
    assert tasks.resolve("tei", []) == ("embed",)
    assert tasks.resolve("vllm", ["rerank", "rerank", "score"]) == ("rerank", "score")
    with pytest.raises(pydantic.ValidationError) as err:
        SimulatorSettings(engine="tei", tasks=["speech"])
    assert err.value.errors()[0]["loc"] == ("tasks",)
    assert "speech not served by engine 'tei'" in str(err.value)


def test_a_wrong_task_flag_exits_2_naming_the_field() -> None:
    done = subprocess.run([harness.console_script("synapse"), "simulator", "--engine",
                           "speech", "--task", "generate"], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "SYNAPSE_CONFIG_PATH": ""})
    assert done.returncode == 2 and "tasks" in done.stderr and "generate" in done.stderr


@pytest.mark.parametrize(("args", "present", "absent"), [
    ((), {"/v1/chat/completions", "/v1/responses", "/v1/messages", "/tokenize"},
     {"/v1/rerank", "/v1/audio/transcriptions"}),
    (("--task", "generate"), {"/v1/chat/completions"}, {"/v1/responses", "/v1/messages"}),
    (("--task", "transcription"), {"/v1/audio/transcriptions", "/v1/audio/translations"},
     {"/v1/chat/completions", "/tokenize"}),
    (("--engine", "speech"), {"/v1/audio/speech", "/v1/models"}, {"/v1/chat/completions"}),
    (("--engine", "tei", "--task", "embed", "--task", "rerank"), {"/embed", "/rerank"},
     {"/v1/chat/completions"}),
])
def test_openapi_lists_the_routes_of_the_tasks(module_pool: harness.ProcessPool,
                                               args: tuple[str, ...], present: set[str],
                                               absent: set[str]) -> None:
    sim = start(module_pool, "--time-scale", "0", *args, name="sim-tasks")
    spec = get(sim, "/openapi.json")
    assert present <= set(spec["paths"]) and not absent & set(spec["paths"])
    assert spec["info"]["x-tasks"] == list(tasks.resolve(
        args[args.index("--engine") + 1] if "--engine" in args else "vllm",
        [a for i, a in enumerate(args) if i and args[i - 1] == "--task"]))
    sim.proc.stop()
