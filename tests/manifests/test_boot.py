"""The real control plane starts with each overlay's ConfigMap and pod environment.

Validation with the model (test_configs) proves the YAML parses; this proves the process
accepts it: `synapse controlplane` runs with the overlay's config.yaml, the pod's env
(Secret values as placeholders, {file:} secrets as temp files), the overlay's Redis
replaced by a private redis-server and its Milvus by a Milvus Lite file. Only what cannot
exist here is overridden: listen addresses (loopback, free ports), data_dir, and static
upstreams (they name cluster DNS names). The tenant key from the Secret must then open
the API, and a wrong key must not. The agents start with their overlay's config too: the
embedded-dev one beside its control plane, the bundled/production one alone with what
needs a GPU node replaced, to show its metrics port wants the token of its Secret.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import openai
import pytest
import yaml

from synapse_common import ports
from tests import harness
from tests.manifests import pods, render, test_monitoring


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    status, _, body = harness.http(url, key=key)
    return status, body


def _start_control_plane(overlay: str, tmp_path: pathlib.Path,
                         processes: harness.ProcessPool, request: pytest.FixtureRequest,
                         monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, Any, str]:
    """Run the overlay's control plane; returns its base URL, gRPC port, settings and
    /metrics URL."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    pod = pods.prepare(overlay, "controlplane", tmp_path)
    cfg, _, _ = pods.load_settings(overlay, "controlplane", tmp_path, monkeypatch)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(pod.data))
    http, grpc, metrics = harness.free_port(), harness.free_port(), harness.free_port()
    assert cfg.metrics.port is not None, "/metrics should have a port of its own"
    env = {**pod.environ, "SYNAPSE_CONFIG_PATH": str(config),
           "SYNAPSE_METRICS__PORT": str(metrics),
           "SYNAPSE_DATA_DIR": str(tmp_path / "data"), "SYNAPSE_UPSTREAMS": "[]",
           "SYNAPSE_HTTP__HOST": "127.0.0.1", "SYNAPSE_HTTP__PORT": str(http),
           "SYNAPSE_GRPC__HOST": "127.0.0.1", "SYNAPSE_GRPC__PORT": str(grpc)}
    if cfg.redis.url is not None:
        redis = request.getfixturevalue("redis_server")
        assert "SYNAPSE_REDIS_URL" in env, "redis.url should come from SYNAPSE_REDIS_URL"
        env["SYNAPSE_REDIS_URL"] = redis.url
    if "SYNAPSE_MILVUS_URI" in env:
        env["SYNAPSE_MILVUS_URI"] = str(tmp_path / "l2.db")
    else:
        env["SYNAPSE_CACHE__MILVUS_URI"] = str(tmp_path / "l2.db")
    (tmp_path / "data").mkdir()
    base = f"http://127.0.0.1:{http}"
    processes.start(f"controlplane-{overlay}", ["synapse", *pod.container["args"]], env=env,
                    ready_url=f"{base}/health", timeout=90, cwd=str(tmp_path))
    # load_settings put the pod's env into this process for {env:} secrets; processes
    # started later inherit this environment, and must see only their own pod's
    for name in [k for k in os.environ if k.startswith("SYNAPSE_")]:
        monkeypatch.delenv(name)
    return base, grpc, cfg, f"http://127.0.0.1:{metrics}/metrics"


def assert_metrics_need_the_token(url: str, token: str,
                                  series: bytes = b"synapse_requests_total") -> None:
    """The metrics port refuses a scrape without the token or with another, in an error
    that names neither, and answers the token (a page with ``series``)."""
    for key in (None, "not-the-metrics-token", token + "x"):
        status, body = _get(url, key)
        assert status == 401, (key, status, body[:200])
        assert series not in body and b'tenant="' not in body and b'model="' not in body
        assert token.encode() not in body and (key is None or key.encode() not in body)
        assert json.loads(body)["error"]["code"] == "invalid_metrics_token"
    status, body = _get(url, token)
    assert status == 200 and series in body


@pytest.mark.parametrize("overlay", render.DEPLOY_OVERLAYS)
def test_control_plane_starts_with_the_overlay_config(
        overlay: str, tmp_path: pathlib.Path, processes: harness.ProcessPool,
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, cfg, metrics = _start_control_plane(overlay, tmp_path, processes, request,
                                                 monkeypatch)
    # no agent here: /ready says no backend is routable (not ready while the registry
    # syncs, ready after: an outage is no reason to leave the Service)
    status, body = _get(f"{base}/ready")
    assert b"no routable backend" in body, (status, body)
    # /metrics on its own port (the one the ServiceMonitor scrapes), not the API's, and
    # behind the token of the pod's Secret where the overlay sets one
    token_file = cfg.metrics.bearer_token_file
    if overlay in test_monitoring.TOKEN_OVERLAYS:
        assert token_file is not None, f"{overlay}: /metrics needs no token"
        token = pathlib.Path(token_file).read_text().strip()
        assert_metrics_need_the_token(metrics, token)
    else:
        assert token_file is None
        status, body = _get(metrics)
        assert status == 200 and b"synapse_requests_total" in body
    assert _get(f"{base}/metrics")[0] == 404
    # the tenant key the pod gets from its Secret opens the API; another key does not
    key = cfg.auth.tenants[0].keys[0].get_secret_value()
    status, body = _get(f"{base}/v1/models", key)
    assert status == 200, body
    assert json.loads(body)["object"] == "list"
    status, _ = _get(f"{base}/v1/models", key + "-wrong")
    assert status == 401


def test_embedded_dev_pair_serves_a_chat_completion(
        tmp_path: pathlib.Path, processes: harness.ProcessPool,
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded-dev overlay end to end: its control plane and its agent (fake GPU, the
    engine simulator, the MiniLM embedder), each with its own ConfigMap, on loopback."""
    base, cp_grpc, cfg, _ = _start_control_plane("embedded-dev", tmp_path / "cp", processes,
                                              request, monkeypatch)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    # the pod IP is loopback here; ports that are fixed in a pod are free ports here
    refs = {**pods.FIELD_REFS, "status.podIP": "127.0.0.1"}
    pod = pods.prepare("embedded-dev", "agent", agent_dir, refs)
    for backend in pod.data["backends"]:
        backend["port"] = harness.free_port()
    config = agent_dir / "config.yaml"
    config.write_text(yaml.safe_dump(pod.data))
    grpc, metrics = harness.free_port(), harness.free_port()
    env = {**pod.environ, "PATH": f"{harness.VENV_BIN}:{os.environ.get('PATH', '')}",
           # the headless Service's name, resolved here to the one replica
           "SYNAPSE_CONTROL_PLANE__DNS_NAME": f"127.0.0.1:{cp_grpc}",
           "SYNAPSE_GRPC__HOST": "127.0.0.1", "SYNAPSE_GRPC__PORT": str(grpc),
           "SYNAPSE_GRPC__ADVERTISE_ADDRESS": f"127.0.0.1:{grpc}",
           "SYNAPSE_METRICS__HOST": "127.0.0.1", "SYNAPSE_METRICS__PORT": str(metrics),
           "SYNAPSE_SUPERVISOR__LOG_DIR": str(agent_dir / "logs")}
    args = pods.with_config(pod.container["args"], str(config))
    agent = processes.start("agent-embedded-dev", ["synapse", *args],
                            env=env, ready_url=f"http://127.0.0.1:{metrics}/metrics",
                            timeout=120, cwd=str(agent_dir))
    harness.wait_until(lambda: b'"routable":true' in _get(f"{base}/ready")[1], 120,
                       "the control plane to see the agent's simulator backend", proc=agent)

    key = cfg.auth.tenants[0].keys[0].get_secret_value()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="llama", max_tokens=8,
        messages=[{"role": "user", "content": "Say hello to the cluster."}])
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert raw.headers["x-synapse-backend"]


def start_agent_alone(pod: pods.Prepared, name: str, tmp_path: pathlib.Path,
                      processes: harness.ProcessPool) -> str:
    """Run a GPU node's agent with its pod's config and env, with what needs a GPU node or
    a cluster replaced: NVML by the fake source, the vLLM backends (weights on the node)
    and the MiniLM embedder by none, the control plane's cluster DNS name by a loopback
    port nobody listens on, and the listen addresses by loopback and free ports. Returns
    its metrics port's base URL. A projected ServiceAccount token (production's
    control_plane.token_file) is a stand-in file."""
    grpc, metrics, nobody = ports.free_ports(3)
    link = {**pod.data["control_plane"], "dns_name": f"127.0.0.1:{nobody}"}
    if link.get("token_file"):
        # the pod's projected ServiceAccount token (read at start): a stand-in here, as
        # for the Secrets' files; nobody reviews it
        pods.projected_token(pod.workload, pod.container, link["token_file"])
        stand_in = tmp_path / "secret-service-account-token"
        stand_in.write_text("stand-in-service-account-token\n")
        link["token_file"] = str(stand_in)
    data = {**pod.data, "backends": [], "telemetry": {"source": "fake"},
            "embedder": {"kind": "none"}, "control_plane": link}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**pod.environ, "PATH": f"{harness.VENV_BIN}:{os.environ.get('PATH', '')}",
           "SYNAPSE_GRPC__HOST": "127.0.0.1", "SYNAPSE_GRPC__PORT": str(grpc),
           "SYNAPSE_GRPC__ADVERTISE_ADDRESS": f"127.0.0.1:{grpc}",
           "SYNAPSE_METRICS__HOST": "127.0.0.1", "SYNAPSE_METRICS__PORT": str(metrics),
           "SYNAPSE_SUPERVISOR__LOG_DIR": str(tmp_path / "logs")}
    args = pods.with_config(pod.container["args"], str(config))
    base = f"http://127.0.0.1:{metrics}"
    # /healthz: the probe-style check that needs no token
    processes.start(name, ["synapse", *args], env=env, ready_url=f"{base}/healthz",
                    timeout=60, cwd=str(tmp_path))
    return base


@pytest.mark.parametrize("overlay", test_monitoring.TOKEN_OVERLAYS)
def test_agent_metrics_need_the_token_of_its_secret(
        overlay: str, tmp_path: pathlib.Path, processes: harness.ProcessPool) -> None:
    """The bundled and production agent starts with its ConfigMap and pod env (see
    start_agent_alone for what is replaced), and its metrics port refuses a scrape
    without the token its Secret mount holds, while /healthz answers without one."""
    pod = pods.prepare(overlay, "agent", tmp_path, {**pods.FIELD_REFS,
                                                    "status.podIP": "127.0.0.1"})
    token_file = pod.data["metrics"].get("bearer_token_file")
    assert token_file, f"{overlay}: the agents' /metrics needs no token"
    token = pathlib.Path(token_file).read_text().strip()
    base = start_agent_alone(pod, f"agent-{overlay}", tmp_path, processes)
    assert_metrics_need_the_token(f"{base}/metrics", token, b"synapse_agent_telemetry_ok")
