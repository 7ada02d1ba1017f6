"""`synapse up` end to end: one command brings up the control plane, an agent, the
simulator and the embedder; the official openai client and synapsectl drive it; Ctrl-C
leaves no process behind."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import openai
import psutil
import pytest

from tests import harness

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


class Embedded:
    def __init__(self, proc: harness.ManagedProcess, data_dir: pathlib.Path) -> None:
        self.proc = proc
        self.data_dir = data_dir
        out = proc.output()
        self.base = re.search(r"Endpoint:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        self.api_key = re.search(r"API key:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        self.admin_addr = re.search(r"SYNAPSE_ADMIN_ADDR=(\S+)", out).group(1)  # type: ignore[union-attr]
        self.client = openai.OpenAI(base_url=self.base, api_key=self.api_key, max_retries=0,
                                    timeout=60)

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SYNAPSE_ADMIN_ADDR": self.admin_addr,
               "SYNAPSE_ADMIN_TOKEN_FILE": str(self.data_dir / "secrets" / "admin-key")}
        return subprocess.run([harness.console_script("synapsectl"), *argv], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    def chat(self, content: str, model: str = MODEL) -> openai.types.chat.ChatCompletion:
        return self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=16)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    workdir = tmp_path_factory.mktemp("embedded")
    data_dir = workdir / "data"
    proc = harness.ManagedProcess(
        "synapse-up", [harness.console_script("synapse"), "up", "--data-dir", str(data_dir),
                       "--http-port", "0", "--grpc-port", "0", "--time-scale", "0"],
        workdir / "synapse-up.log")
    try:
        harness.wait_until(lambda: "Synapse is ready" in proc.output(), 240,
                           "synapse up to print that it is ready", interval=0.5, proc=proc)
        yield Embedded(proc, data_dir)
    finally:
        proc.stop(timeout=30)


def test_the_wait_for_the_embedder_is_not_the_dev_tenants_usage(embedded: Embedded) -> None:
    # first in the module: nothing but synapse up's own start has been asked of the API
    log = (embedded.data_dir / "logs" / "controlplane.log").read_text()
    assert "/v1/embeddings" not in log, "synapse up asked /v1/embeddings with the dev key"


def test_completion_stream_embedding_and_cache_hit(embedded: Embedded) -> None:
    # cached answers and prompts land under it with the umask's modes: only its owner enters
    assert embedded.data_dir.stat().st_mode & 0o777 == 0o700
    first = embedded.client.chat.completions.with_raw_response.create(
        model="llama", messages=[{"role": "user", "content": "What is a GPU?"}], temperature=0)
    assert first.headers["x-synapse-cache"] == "miss"
    assert first.parse().choices[0].message.content
    chunks = list(embedded.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream me a haiku"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    vectors = embedded.client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2",
                                                input=["hello world"])
    assert len(vectors.data[0].embedding) == 384
    # the agents' embedders take text: token ids were embedded as the words of their numbers
    with pytest.raises(openai.BadRequestError, match="not token ids"):
        embedded.client.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2",
                                          input=[[101, 7592, 102]])
    deadline = time.monotonic() + 10  # the miss is stored off the hot path
    while True:
        again = embedded.client.chat.completions.with_raw_response.create(
            model="llama", messages=[{"role": "user", "content": "What is a GPU?"}], temperature=0)
        if again.headers["x-synapse-cache"] == "hit-exact" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.headers["x-synapse-cache"] == "hit-exact"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content


def test_synapsectl_sees_the_node_with_fake_gpu_and_ready_backend(embedded: Embedded) -> None:
    nodes = embedded.ctl("get", "nodes", "-o", "json")
    assert nodes.returncode == 0, nodes.stderr
    [node] = json.loads(nodes.stdout)
    assert node["name"] == "local" and node["status"] == "NODE_STATUS_READY"
    assert node["backends_ready"] >= 1 and node["telemetry"]["source"] == "fake"
    described = embedded.ctl("describe", "node", "local")
    assert "Simulated GPU" in described.stdout and "ready" in described.stdout
    explained = embedded.ctl("explain", "--model", "llama", "--prompt", "hello there")
    assert explained.returncode == 0 and "chosen: local/simulator" in explained.stdout


def test_drain_makes_the_node_unroutable_and_uncordon_restores(embedded: Embedded) -> None:
    drained = embedded.ctl("drain", "local", "--wait", "--timeout-seconds", "10")
    assert drained.returncode == 0, drained.stderr
    with pytest.raises(openai.APIStatusError) as err:
        embedded.chat("Are you there after the drain?")
    assert err.value.status_code == 503
    assert err.value.body and err.value.body.get("type") == "service_unavailable"
    assert embedded.ctl("uncordon", "local").returncode == 0
    deadline = time.monotonic() + 30  # the agent leaves its draining state on undrain
    while True:
        try:
            assert embedded.chat("Are you back?").choices[0].message.content
            break
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_deploying_a_second_model_serves_it(embedded: Embedded) -> None:
    deployed = embedded.ctl("deploy", "tiny-sim", "--node", "local", "--engine", "simulator",
                            "--extra-arg=--time-scale", "--extra-arg=0")
    assert deployed.returncode == 0, deployed.stderr
    deadline = time.monotonic() + 90
    while "tiny-sim" not in [m.id for m in embedded.client.models.list().data]:
        assert time.monotonic() < deadline, "tiny-sim never appeared in /v1/models"
        time.sleep(0.5)
    while True:
        try:
            assert embedded.chat("hello tiny", model="tiny-sim").choices[0].message.content
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "tiny-sim never served a request"
            time.sleep(0.5)
    models = embedded.ctl("get", "models")
    assert "tiny-sim" in models.stdout
    assert embedded.ctl("undeploy", "tiny-sim").returncode == 0


def test_ctrl_c_leaves_no_process_behind(tmp_path: pathlib.Path) -> None:
    proc = harness.ManagedProcess(
        "synapse-up-2", [harness.console_script("synapse"), "up", "--data-dir",
                         str(tmp_path / "data"), "--http-port", "0", "--grpc-port", "0",
                         "--time-scale", "0"], tmp_path / "up.log")
    try:
        harness.wait_until(lambda: "Synapse is ready" in proc.output(), 240, "ready",
                           interval=0.5, proc=proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 3  # control plane, agent, simulator
        proc.signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], f"left behind: {[p.pid for p in alive]}"
        assert "Stopped." in proc.output()
    finally:
        proc.stop()


def test_upstream_mode_puts_a_real_openai_server_behind_synapse(
        tmp_path: pathlib.Path, processes: harness.ProcessPool) -> None:
    port = harness.free_port()
    processes.start("upstream", ["synapse", "simulator", "--port", str(port), "--model", MODEL,
                                 "--time-scale", "0"],
                    ready_url=f"http://127.0.0.1:{port}/health", timeout=60)
    proc = harness.ManagedProcess(
        "synapse-up-upstream", [harness.console_script("synapse"), "up", "--data-dir",
                                str(tmp_path / "data"), "--http-port", "0", "--grpc-port", "0",
                                "--upstream", f"http://127.0.0.1:{port}"], tmp_path / "up.log")
    try:
        harness.wait_until(lambda: "Synapse is ready" in proc.output(), 240, "ready",
                           interval=0.5, proc=proc)
        up = Embedded(proc, tmp_path / "data")
        reply = up.client.chat.completions.with_raw_response.create(
            model="llama", messages=[{"role": "user", "content": "Who serves this?"}])
        assert reply.headers["x-synapse-backend"] == "static/upstream"
        assert reply.parse().choices[0].message.content
    finally:
        proc.stop(timeout=30)
