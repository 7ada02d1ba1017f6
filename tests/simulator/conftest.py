"""Starting real simulator processes for the simulator tests."""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from simulator import app as sim_app
from simulator import config
from simulator import main as sim_main
from synapse_common import clock as clocks
from synapse_common import settings
from tests import harness

MODEL = "sim-model"
ENGINE_KEY = "0123456789abcdef-engine-key"


def keyed_settings(engine: str = "vllm",
                   key: str | None = ENGINE_KEY) -> config.SimulatorSettings:
    """An in-process simulator's settings of ``engine`` that refuses callers without
    ``key`` (None: no key)."""
    return config.SimulatorSettings.model_validate({
        "engine": engine, "served_model_names": [MODEL], "time_scale": 0,
        **({"api_key": key} if key else {})})


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Sim:
    """A running ``synapse simulator`` and its base URL."""

    def __init__(self, proc: harness.ManagedProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


def start(pool: harness.ProcessPool, *args: str, name: str = "sim",
          wait_health: bool = True, timeout: float = 60) -> Sim:
    port = harness.free_port()
    argv = ["synapse", "simulator", "--port", str(port), "--served-model-name", MODEL,
            "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct", *args]
    if wait_health:
        proc = pool.start(name, argv, ready_url=f"http://127.0.0.1:{port}/health",
                          timeout=timeout)
    else:
        proc = pool.start(name, argv, ready=lambda: port_open(port), timeout=timeout)
    return Sim(proc, port)


def flags(*argv: str) -> config.SimulatorSettings:
    """The settings ``synapse simulator`` would run with these flags (no config file)."""
    args = sim_main.build_parser().parse_args(["--served-model-name", MODEL, *argv])
    return settings.override(config.SimulatorSettings(), sim_main.overrides_from(args))


@contextlib.asynccontextmanager
async def in_process(s: config.SimulatorSettings, timing: clocks.Time) -> AsyncIterator[str]:
    """The simulator's app in this process on a free port, on ``timing``'s clocks and
    sleep (for the timed faults: virtual time); yields its base URL."""
    runner = web.AppRunner(sim_app.build(s, timing), handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def json_call(url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """GET ``url`` (POST ``body`` as JSON when given): the status and the JSON answer, also
    for an error status; an empty answer reads as ``{}``."""
    data = json.dumps(body).encode() if body is not None else None
    status, _, raw = harness.http(url, data, timeout=timeout)
    return status, json.loads(raw) if raw else {}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse a Prometheus exposition with prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(parsed: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    for sample_labels, v in parsed.get(name, []):
        if all(sample_labels.get(k) == want for k, want in labels.items()):
            return v
    raise AssertionError(f"{name} {labels} not in the exposition")


@pytest.fixture(scope="module")
def module_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.ProcessPool]:
    pool = harness.ProcessPool(pathlib.Path(tmp_path_factory.mktemp("sim")))
    yield pool
    pool.stop_all()
