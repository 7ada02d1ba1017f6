"""The real control plane starts with the pilot's ConfigMap and pod environment.

The production and bundled values render the overlays' configs (test_helm_equivalence),
which tests/manifests/test_boot already starts; the pilot's config (no Redis, a Milvus
Lite file in data_dir, keys from the Secret the chart creates) exists only here. As in
test_boot, only what cannot exist here is overridden: listen addresses, data_dir and the
Lite file's path under it (and the metrics port, to a free one).
"""

from __future__ import annotations

import pathlib

import yaml

from tests import harness
from tests.charts import helm
from tests.manifests import test_boot


def _status(url: str, key: str | None = None) -> int:
    return harness.http(url, key=key)[0]


def test_the_pilot_control_plane_starts_with_the_chart_config(
        tmp_path: pathlib.Path, processes: harness.ProcessPool) -> None:
    pod = helm.prepare(helm.render_chart("self-hosted-pilot"), "controlplane", tmp_path)
    assert "redis" not in pod.data and "SYNAPSE_REDIS_URL" not in pod.environ
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(pod.data))
    data = tmp_path / "data"
    data.mkdir()
    http, grpc, metrics = harness.free_port(), harness.free_port(), harness.free_port()
    env = {**pod.environ, "SYNAPSE_CONFIG_PATH": str(config), "SYNAPSE_DATA_DIR": str(data),
           "SYNAPSE_CACHE__MILVUS_URI": str(data / "l2.db"),
           "SYNAPSE_METRICS__PORT": str(metrics),
           "SYNAPSE_HTTP__HOST": "127.0.0.1", "SYNAPSE_HTTP__PORT": str(http),
           "SYNAPSE_GRPC__HOST": "127.0.0.1", "SYNAPSE_GRPC__PORT": str(grpc)}
    base = f"http://127.0.0.1:{http}"
    processes.start("controlplane-pilot", ["synapse", *pod.container["args"]], env=env,
                    ready_url=f"{base}/health", timeout=90, cwd=str(tmp_path))
    # no agent here: no routable backend, and /ready says so
    ready = harness.http(f"{base}/ready")[2]
    assert b"no routable backend" in ready, ready
    # the tenant key file the pod mounts from the chart's Secret opens the API
    key_file = pod.data["auth"]["tenants"][0]["keys"][0]["file"]
    key = pathlib.Path(key_file).read_text().strip()
    assert _status(f"{base}/v1/models", key) == 200
    assert _status(f"{base}/v1/models", key + "-wrong") == 401
    # the metrics port wants the token file the pod mounts from the same Secret
    token = pathlib.Path(pod.data["metrics"]["bearer_token_file"]).read_text().strip()
    test_boot.assert_metrics_need_the_token(f"http://127.0.0.1:{metrics}/metrics", token)


def test_the_pilot_agent_needs_its_metrics_token(tmp_path: pathlib.Path,
                                                 processes: harness.ProcessPool) -> None:
    """The chart's agent config (the pilot's, which no overlay has) in the real process:
    its metrics port wants the token the pod mounts beside agent-token."""
    pod = helm.prepare(helm.render_chart("self-hosted-pilot"), "agent", tmp_path)
    token = pathlib.Path(pod.data["metrics"]["bearer_token_file"]).read_text().strip()
    base = test_boot.start_agent_alone(pod, "agent-pilot", tmp_path, processes)
    test_boot.assert_metrics_need_the_token(f"{base}/metrics", token,
                                            b"synapse_agent_telemetry_ok")
