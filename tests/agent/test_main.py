"""``synapse agent`` as a real subprocess supervising a real engine process.

The stand-in control plane (a real gRPC server) sees what the agent reports; the tests
act on real processes (SIGKILL, SIGTERM) and check what an operator would see: reports,
``/metrics`` and the process table.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import grpc
import openai
import psutil
import pytest
import yaml

from protos.synapse.v1 import common_pb2, controlplane_pb2
from synapse_common import pair_scorer as pair_scorer_file
from tests import harness, node_auth
from tests.agent.conftest import STAND_IN, agent_config

# These tests play the control plane, which presents the key the agent's engines require.

READY = common_pb2.BACKEND_PHASE_READY
SIM = {"name": "sim", "engine": "simulator", "model": "test-model",
       "served_model_names": ["test-model"], "extra_args": ["--time-scale", "0.01"]}


def _backend(cp, name="sim"):
    return cp.recorder.last_backend(name)


def _wait_ready(cp, proc, name="sim", timeout=60):
    harness.wait_until(lambda: (b := _backend(cp, name)) is not None and b.phase == READY,
                       timeout, f"backend {name} ready", proc=proc)
    return _backend(cp, name)


def _metric(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_sigkilled_engine_is_restarted_and_nvml_failure_is_reported(
        tmp_path, control_plane, start_agent):
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[SIM]))
    first = _wait_ready(control_plane, agent.proc)
    assert first.restarts == 0 and first.pid > 0 and first.url.startswith("http://127.0.0.1:")

    # Engine metrics scraped from the simulator: KV capacity and prefix-cache hit rate.
    client = openai.OpenAI(base_url=first.url + "/v1", api_key=harness.engine_key_at(first.url),
                           timeout=30)
    prompt = "Summarise the history of the printing press in a few sentences, please. " * 3
    for _ in range(2):
        client.chat.completions.create(model="test-model", max_tokens=4,
                                       messages=[{"role": "user", "content": prompt}])
    harness.wait_until(lambda: _backend(control_plane).prefix_cache_hit_rate > 0, 20,
                       "a prefix-cache hit rate in the reports", proc=agent.proc)
    scraped = _backend(control_plane)
    assert scraped.metrics_ok and scraped.kv_block_size > 0
    assert scraped.kv_capacity_tokens > 0 and scraped.kv_capacity_tokens % scraped.kv_block_size == 0
    assert 0 < scraped.prefix_cache_hit_rate <= 1

    os.kill(first.pid, signal.SIGKILL)
    harness.wait_until(lambda: _backend(control_plane).restarts == 1
                       and _backend(control_plane).phase == READY, 60,
                       "the engine to be restarted", proc=agent.proc)
    again = _backend(control_plane)
    assert again.pid != first.pid and again.url == first.url  # same port after restart
    reasons = [b.phase_reason for r in control_plane.recorder.reports() for b in r.backends]
    assert any("exited with code -9" in r and "restart in" in r for r in reasons)
    text = agent.metrics_text()
    assert _metric(text, 'synapse_agent_backend_restarts_total{backend="sim"') == 1.0

    # NVML on this GPU-less machine: an error state everywhere, never fake GPUs.
    register = control_plane.recorder.registers()[0]
    assert register.telemetry.source == "nvml" and not register.telemetry.ok
    assert "nvml" in register.telemetry.error.lower() and not register.gpus
    report = control_plane.recorder.reports()[-1]
    assert not report.telemetry.ok and not report.gpus
    assert _metric(text, 'synapse_agent_telemetry_ok{node="test-node",source="nvml"}') == 0.0
    assert "synapse_agent_gpu_utilization_percent{" not in text


def test_engine_that_exits_at_once_ends_in_crashloop(tmp_path, control_plane, start_agent):
    crashing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    cfg = agent_config(tmp_path, control_plane, backends=[SIM], supervisor={
        "simulator_command": crashing, "backoff_initial_s": 0.05, "crashloop_restarts": 3,
        "crashloop_window_s": 60, "backoff_max_s": 0.5, "crashloop_retry_s": 0.5})
    agent = start_agent(cfg)
    crashloop = common_pb2.BACKEND_PHASE_CRASHLOOP

    def first_crashloop() -> common_pb2.BackendState | None:
        # the first report of it, not the last: the crash loop's retry may have come and
        # gone (restarts 4) before a loaded machine let this test look
        return next((b for r in control_plane.recorder.reports() for b in r.backends
                     if b.name == "sim" and b.phase == crashloop), None)

    harness.wait_until(lambda: first_crashloop() is not None, 30, "crashloop", proc=agent.proc)
    backend = first_crashloop()
    assert backend is not None
    assert backend.restarts == 3 and "3 restarts within 60s; retry in" in backend.phase_reason
    assert any("exited with code 3" in line for line in backend.last_log_lines)
    # Still retried every crashloop_retry_s (the cause may go away), and reported crashloop.
    harness.wait_until(lambda: _backend(control_plane).restarts >= 5, 30, "retries",
                       proc=agent.proc)
    assert all(b.phase == crashloop for r in control_plane.recorder.reports()
               for b in r.backends if b.restarts > 3)
    text = agent.metrics_text()
    assert _metric(text, 'synapse_agent_backend_state{backend="sim",node="test-node",'
                         'state="crashloop"}') == 1.0


def test_a_desired_backends_command_naming_a_crashlooping_backend_to_retry_retries_it(
        tmp_path, control_plane, start_agent):
    """An operator's deploy of an engine again reaches the agent as its name in
    DesiredBackends.retry: the crash loop's own retry is minutes away, the retry is now."""
    crashing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[], supervisor={
        "simulator_command": crashing, "backoff_initial_s": 0.05, "crashloop_restarts": 1,
        "backoff_max_s": 300}))
    recorder = control_plane.recorder
    managed = common_pb2.BackendSpec(name="managed", engine=common_pb2.ENGINE_KIND_SIMULATOR,
                                     model="m")

    def command(cid: str, retry: list[str]) -> controlplane_pb2.CommandAck:
        recorder.send(controlplane_pb2.ControlMessage(
            command_id=cid, desired_backends=controlplane_pb2.DesiredBackends(
                backends=[managed], retry=retry)))
        harness.wait_until(lambda: any(a.command_id == cid for a in recorder.acks()), 30,
                           f"ack of {cid}", proc=agent.proc)
        return next(a for a in recorder.acks() if a.command_id == cid)

    harness.wait_until(lambda: recorder.reports(), 30, "a report (its stream open)",
                       proc=agent.proc)
    assert command("deploy", []).ok
    harness.wait_until(lambda: (b := _backend(control_plane, "managed")) is not None
                       and b.phase == common_pb2.BACKEND_PHASE_CRASHLOOP, 30, "crashloop",
                       proc=agent.proc)
    restarts = _backend(control_plane, "managed").restarts
    assert command("deploy-again", ["managed"]).ok
    harness.wait_until(lambda: _backend(control_plane, "managed").restarts > restarts, 30,
                       "a retry at once", proc=agent.proc)


def test_sigterm_drains_then_stops_every_engine(tmp_path, control_plane, start_agent):
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[SIM]))
    backend = _wait_ready(control_plane, agent.proc)
    descendants = psutil.Process(agent.proc.pid).children(recursive=True)
    assert backend.pid in {p.pid for p in descendants}

    agent.proc.signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=30) == 0
    assert not [p.pid for p in descendants if harness.alive(p.pid)], "engine processes survived"
    reports = control_plane.recorder.reports()
    assert any(r.draining and r.backends[0].phase == common_pb2.BACKEND_PHASE_DRAINING
               for r in reports)
    assert reports[-1].backends[0].phase == common_pb2.BACKEND_PHASE_STOPPED
    assert "drain complete" in agent.proc.output()


def test_drain_lets_an_in_flight_request_finish(tmp_path, control_plane, start_agent):
    import concurrent.futures

    slow = {**SIM, "extra_args": ["--time-scale", "1"]}  # ~13 ms per token
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[slow]))
    backend = _wait_ready(control_plane, agent.proc)
    client = openai.OpenAI(base_url=backend.url + "/v1",
                           api_key=harness.engine_key_at(backend.url), timeout=60)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(client.chat.completions.create, model="test-model",
                            max_tokens=150, messages=[{"role": "user", "content": "hi"}])
        harness.wait_until(lambda: _backend(control_plane).num_requests_running == 1, 20,
                           "the request to be running", proc=agent.proc)
        agent.proc.signal(signal.SIGTERM)
        assert reply.result(timeout=60).choices[0].finish_reason == "length"
    assert agent.proc.wait(timeout=30) == 0
    assert "drain complete" in agent.proc.output()
    # It reported the engine draining with the request still running, and kept it up.
    assert any(r.draining and r.backends[0].num_requests_running == 1
               and r.backends[0].phase == common_pb2.BACKEND_PHASE_DRAINING
               for r in control_plane.recorder.reports())


def test_sigkilled_agent_takes_its_engines_along(tmp_path, control_plane, start_agent):
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[SIM]))
    backend = _wait_ready(control_plane, agent.proc)
    os.kill(agent.proc.pid, signal.SIGKILL)  # no chance to clean up: PDEATHSIG must act
    agent.proc.wait(timeout=10)
    harness.wait_until(lambda: not harness.alive(backend.pid), 10, "the orphaned engine to die")


def test_sigkilled_agent_takes_its_engines_children_along(tmp_path, control_plane,
                                                          start_agent):
    """vLLM's engine core outlived a SIGKILLed agent (probe finding): PDEATHSIG reached
    the engine only. The stand-in starts a child as vLLM does."""
    pid_file = tmp_path / "grandchild.pid"
    spec = {**SIM, "extra_args": ["--grandchild-pid-file", str(pid_file)]}
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[spec],
                                     supervisor={"simulator_command": STAND_IN}))
    backend = _wait_ready(control_plane, agent.proc)
    grandchild = int(pid_file.read_text())
    assert grandchild in {p.pid for p in psutil.Process(backend.pid).children(recursive=True)}
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(timeout=10)
    harness.wait_until(lambda: not harness.alive(grandchild) and not harness.alive(backend.pid),
                       10, "the engine and its child to die with the agent")


def test_registers_with_its_name_and_address_then_reports_in_order(
        tmp_path, control_plane, start_agent):
    # The reconnect after a control-plane restart: test_reporter, on virtual time.
    agent = start_agent(agent_config(tmp_path, control_plane))
    recorder = control_plane.recorder
    harness.wait_until(lambda: len(recorder.reports()) >= 2, 20, "reports", proc=agent.proc)
    register = recorder.registers()[0]
    assert register.node_name == "test-node" and register.agent_version
    assert register.node_address == agent.grpc_address
    sequences = [r.sequence for r in recorder.reports()]
    assert sequences == sorted(sequences)


def test_commands_drain_desired_backends_and_ack(tmp_path, control_plane, start_agent):
    agent = start_agent(agent_config(tmp_path, control_plane, backends=[SIM]))
    _wait_ready(control_plane, agent.proc)
    recorder = control_plane.recorder

    def command(cid: str, **body) -> controlplane_pb2.CommandAck:
        recorder.send(controlplane_pb2.ControlMessage(command_id=cid, **body))
        harness.wait_until(lambda: any(a.command_id == cid for a in recorder.acks()), 30,
                           f"ack of {cid}", proc=agent.proc)
        return next(a for a in recorder.acks() if a.command_id == cid)

    assert command("c1", drain=controlplane_pb2.Drain(grace_seconds=5)).ok
    harness.wait_until(lambda: recorder.reports()[-1].draining, 10, "a draining report")
    assert command("c2", undrain=controlplane_pb2.Undrain()).ok
    harness.wait_until(lambda: not recorder.reports()[-1].draining, 10, "undrained")

    managed = common_pb2.BackendSpec(name="managed", engine=common_pb2.ENGINE_KIND_SIMULATOR,
                                     model="other-model", extra_args=["--time-scale", "0.01"])
    clash = common_pb2.BackendSpec(name="sim", engine=common_pb2.ENGINE_KIND_SIMULATOR,
                                   model="x")
    ack = command("c3", desired_backends=controlplane_pb2.DesiredBackends(
        backends=[managed, clash]))
    assert not ack.ok and "sim: defined in the agent's own config" in ack.error
    _wait_ready(control_plane, agent.proc, name="managed")

    assert command("c4", desired_backends=controlplane_pb2.DesiredBackends()).ok
    harness.wait_until(lambda: {b.name for b in recorder.reports()[-1].backends} == {"sim"},
                       30, "the managed backend to go", proc=agent.proc)
    assert _backend(control_plane).phase == READY  # the config-defined one is untouched
    ack = command("c5", evict_embeddings=controlplane_pb2.EvictEmbeddings())
    assert not ack.ok and "no embedder" in ack.error
    text = agent.metrics_text()
    assert _metric(text, 'synapse_agent_commands_total{kind="desired_backends",'
                         'node="test-node",ok="false"}') == 1.0
    assert _metric(text, 'synapse_agent_commands_total{kind="drain",node="test-node",'
                         'ok="true"}') == 1.0


def test_invalid_config_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"supervisor": {"backoff_initial_s": -1}}))
    result = subprocess.run([harness.console_script("synapse"), "agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "supervisor.backoff_initial_s" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_engine_binary_is_failed_not_crashlooping(tmp_path, control_plane, start_agent):
    vllm = {"name": "gpu", "engine": "vllm", "model": "m"}
    cfg = agent_config(tmp_path, control_plane, backends=[vllm], supervisor={
        "vllm_command": [str(pathlib.Path(tmp_path) / "no-such-vllm"), "serve"]})
    agent = start_agent(cfg)
    harness.wait_until(lambda: (b := _backend(control_plane, "gpu")) is not None
                       and b.phase == common_pb2.BACKEND_PHASE_FAILED, 20, "failed",
                       proc=agent.proc)
    assert "no-such-vllm" in _backend(control_plane, "gpu").phase_reason


def test_agent_serves_node_embed_from_its_cache_and_reports_fake_gpus(
        tmp_path, control_plane, start_agent):
    import numpy as np

    from protos.synapse.v1 import node_pb2, node_pb2_grpc

    cfg = agent_config(tmp_path, control_plane, embedder={"kind": "minilm"},
                       telemetry={"source": "fake", "interval_s": 0.2,
                                  "fake_gpus": [{"name": "Sim 24GB", "memory_total_gb": 24}]})
    agent = start_agent(cfg)
    harness.wait_until(lambda: control_plane.recorder.registers(), 20, "Register",
                       proc=agent.proc)
    register = control_plane.recorder.registers()[0]
    assert register.telemetry.source == "fake" and register.telemetry.ok
    assert [g.name for g in register.gpus] == ["Sim 24GB"]
    assert list(register.embed_models) == ["sentence-transformers/all-MiniLM-L6-v2"]

    with node_auth.channel(agent.grpc_address) as channel:
        _wait_node_serving(channel, 120, "the embedder to load", agent.proc)
        stub = node_pb2_grpc.NodeStub(channel)
        first = stub.Embed(node_pb2.EmbedRequest(texts=["hello world"]), timeout=30)
        again = stub.Embed(node_pb2.EmbedRequest(texts=["hello world"]), timeout=30)
        scored = _scored_once_loaded(stub, agent.proc)     # the shipped pair scorer
    same, unrelated = scored.scores     # logits: a paraphrase, another question
    assert same > 0 > unrelated
    assert scored.scorer_id == pair_scorer_file.peek_id(pair_scorer_file.SHIPPED)
    assert list(first.cached) == [False] and list(again.cached) == [True]
    assert first.vectors == again.vectors and first.dim == 384
    assert np.linalg.norm(np.frombuffer(first.vectors, "<f4")) == pytest.approx(1, abs=1e-4)

    harness.wait_until(lambda: control_plane.recorder.reports()[-1].embedding_cache.hits == 1,
                       10, "cache stats in a report")
    text = agent.metrics_text()
    assert _metric(text, 'synapse_agent_embedding_cache_hits_total{node="test-node"}') == 1.0
    assert _metric(text, 'synapse_agent_embed_requests_total{code="OK",node="test-node"}') == 2.0
    assert _metric(text, 'synapse_agent_score_pairs_requests_total'
                         '{code="OK",node="test-node"}') == 1.0
    assert _metric(text, 'synapse_agent_embedding_cache_entries{node="test-node"}') == 1.0
    assert _metric(text, 'synapse_agent_telemetry_ok{node="test-node",source="fake"}') == 1.0
    assert _metric(text, 'synapse_agent_gpu_memory_total_bytes{gpu="0"') == 24 * 2**30


def test_a_taken_port_is_a_clear_start_up_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(agent_config(tmp_path, None)))
        result = subprocess.run([harness.console_script("synapse"), "agent", "--config",
                                 str(path), "--grpc-port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot bind the Node gRPC server to 127.0.0.1:{port}" in result.stderr


def test_node_embed_through_a_supervised_tei_engine(tmp_path, control_plane, start_agent):
    import json
    import urllib.request

    import numpy as np

    from protos.synapse.v1 import node_pb2, node_pb2_grpc

    port = harness.free_port()
    tei = {"name": "embed", "engine": "simulator", "model": "BAAI/bge-small-en",
           "task": "embed", "port": port}
    cfg = agent_config(tmp_path, control_plane, backends=[tei],
                       telemetry={"interval_s": 0.2},
                       embedder={"kind": "tei", "tei_url": f"http://127.0.0.1:{port}",
                                 "model": "BAAI/bge-small-en"})
    agent = start_agent(cfg)
    backend = _wait_ready(control_plane, agent.proc, name="embed")
    assert backend.task == common_pb2.BACKEND_TASK_EMBED
    texts = [f"sentence number {i}" for i in range(40)]  # more than TEI's client batch (32)
    with node_auth.channel(agent.grpc_address) as channel:
        _wait_node_serving(channel, 30, "the TEI embedder", agent.proc)
        reply = node_pb2_grpc.NodeStub(channel).Embed(
            node_pb2.EmbedRequest(model="BAAI/bge-small-en", texts=texts), timeout=30)
    assert reply.embedder_id.startswith("BAAI/bge-small-en@") and not any(reply.cached)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/embed", headers={"Content-Type": "application/json",
                                                   "Authorization": "Bearer " + harness.engine_key_at(
                                                       f"http://127.0.0.1:{port}")},
        data=json.dumps({"inputs": texts[:32], "normalize": False}).encode())
    with urllib.request.urlopen(request, timeout=10) as resp:
        direct = np.array(json.loads(resp.read()), dtype=np.float32)
    got = np.frombuffer(reply.vectors, "<f4").reshape(40, reply.dim)
    np.testing.assert_allclose(got[:32], direct, rtol=1e-6)


def _wait_node_serving(channel, within: float, what: str, proc) -> None:
    """Until the agent's gRPC health says ``synapse.v1.Node`` is SERVING (its embedder
    loaded)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    harness.wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(
        service="synapse.v1.Node"), timeout=5).status == serving, within, what, proc=proc)


def _scored_once_loaded(stub, proc):
    """ScorePairs of a question, a paraphrase and another question once the scorer has
    loaded in the background (FAILED_PRECONDITION "loading" until then; a first start
    exports it to ONNX)."""
    from protos.synapse.v1 import node_pb2

    request = node_pb2.ScorePairsRequest(
        query="How do I reset my password?",
        candidates=["How can I reset my password?", "What is the capital of France?"])
    answers = []

    def answered() -> bool:
        try:
            answers.append(stub.ScorePairs(request, timeout=30))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or "loading" not in (
                    exc.details() or ""):
                raise
        return bool(answers)

    harness.wait_until(answered, 120, "the pair scorer to load", proc=proc)
    return answers[0]
