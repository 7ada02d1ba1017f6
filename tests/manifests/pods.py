"""A Synapse container as the kubelet would start it: environment, config, Secret mounts.

Shared by the config tests (validate with the models) and the boot tests (run the real
process with the config).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import pydantic
import pytest
import yaml

from agent import config as agent_config
from controlplane import config as cp_config
from synapse_common import settings
from tests.manifests import render

MODELS: dict[str, type[pydantic.BaseModel]] = {
    "controlplane": cp_config.ControlPlaneSettings,
    "agent": agent_config.AgentSettings,
}
FIELD_REFS = {"spec.nodeName": "gpu-node-1", "status.podIP": "10.1.2.3",
              "metadata.name": "synapse-pod-0", "metadata.namespace": "synapse"}


def synapse_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    found = []
    for workload in render.workloads(objects):
        for c in render.pod_spec(workload)["containers"]:
            if c.get("args") and c["args"][0] in MODELS:
                found.append((workload, c))
    return found


def container_environ(c: dict[str, Any],
                      field_refs: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet would build it."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                           str(item["value"]))
            assert "$(" not in value, f"{item['name']} refers to a variable not set before it"
        else:
            source = item["valueFrom"]
            if "fieldRef" in source:
                value = (field_refs or FIELD_REFS)[source["fieldRef"]["fieldPath"]]
            else:
                ref = source["secretKeyRef"]
                value = f"from-secret-{ref['name']}-{ref['key']}"
        env[item["name"]] = value
    return env


def mounted_volume(workload: dict[str, Any], c: dict[str, Any], directory: str) -> dict[str, Any]:
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory]
    assert mounts, f"{c['name']}: nothing is mounted at {directory}"
    volumes = {v["name"]: v for v in render.pod_spec(workload)["volumes"]}
    volume: dict[str, Any] = volumes[mounts[0]["name"]]
    return volume


def projected_token(workload: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The projected ServiceAccount token source the container reads at ``path`` (an
    agent's ``control_plane.token_file``, the control plane's ``auth.agent_review``
    token_file); a path no projected token volume puts there fails."""
    file = pathlib.PurePosixPath(path)
    volume = mounted_volume(workload, c, str(file.parent))
    assert "projected" in volume, f"{path} is not in a projected volume: {volume}"
    tokens = [s["serviceAccountToken"] for s in volume["projected"]["sources"]
              if "serviceAccountToken" in s and s["serviceAccountToken"]["path"] == file.name]
    assert len(tokens) == 1, f"the projected volume at {file.parent} has no token {file.name}"
    token: dict[str, Any] = tokens[0]
    return token


def config_path(c: dict[str, Any], environ: dict[str, str]) -> str:
    """The file the process reads: --config, else $SYNAPSE_CONFIG_PATH, else the default."""
    args = list(c.get("args", []))
    for i, arg in enumerate(args):
        if arg == "--config":
            return str(args[i + 1])
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    explicit, _ = settings.resolve_config_path(None, environ)
    return explicit


def with_config(args: list[str], path: str) -> list[str]:
    """The container's args with its --config pointed at ``path``."""
    out = list(args)
    assert "--config" in out, f"{args} pass no --config"
    out[out.index("--config") + 1] = path
    return out


def config_data(objects: list[dict[str, Any]], workload: dict[str, Any], c: dict[str, Any],
                 environ: dict[str, str]) -> dict[str, Any]:
    path = pathlib.PurePosixPath(config_path(c, environ))
    volume = mounted_volume(workload, c, str(path.parent))
    cm = render.find(objects, "ConfigMap", volume["configMap"]["name"])
    data: dict[str, Any] = yaml.safe_load(cm["data"][path.name])
    return data


def secret_mount_dirs(workload: dict[str, Any], c: dict[str, Any]) -> list[str]:
    volumes = {v["name"]: v for v in render.pod_spec(workload).get("volumes", [])}
    return [m["mountPath"] for m in c.get("volumeMounts", [])
            if "secret" in volumes[m["name"]]]


def replace_file_secrets(value: Any, dirs: list[str], tmp: pathlib.Path) -> Any:
    """Swap each {file: P} for a temp file after checking P is inside a Secret mount."""
    if isinstance(value, dict):
        if set(value) == {"file"}:
            path = str(value["file"])
            assert any(path.startswith(d.rstrip("/") + "/") for d in dirs), \
                f"secret file {path} is not under a mounted Secret ({dirs})"
            stand_in = tmp / f"secret-{abs(hash(path))}"
            stand_in.write_text(f"stand-in-{pathlib.PurePosixPath(path).name}\n")
            return {"file": str(stand_in)}
        return {k: replace_file_secrets(v, dirs, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_file_secrets(v, dirs, tmp) for v in value]
    return value


def metrics_token_secret(objects: list[dict[str, Any]], process: str = "controlplane"
                         ) -> tuple[str, str] | None:
    """The Secret and key ``process`` (controlplane or agent) reads its
    ``metrics.bearer_token_file`` from, as its pod mounts them (None when /metrics needs
    no token). A path under no Secret mount, or naming a file the mount does not project,
    fails."""
    hits = [(w, c) for w, c in synapse_containers(objects) if c["args"][0] == process]
    assert len(hits) == 1, f"expected one {process} container, found {len(hits)}"
    workload, c = hits[0]
    data = config_data(objects, workload, c, container_environ(c))
    path = (data.get("metrics") or {}).get("bearer_token_file")
    if path is None:
        return None
    file = pathlib.PurePosixPath(path)
    volume = mounted_volume(workload, c, str(file.parent))
    assert "secret" in volume, f"metrics.bearer_token_file {path} is not in a Secret mount"
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    if volume["secret"].get("items"):
        assert file.name in items, f"the Secret mount at {file.parent} has no {file.name}"
    return volume["secret"]["secretName"], items.get(file.name, file.name)


def replace_metrics_token(data: dict[str, Any], dirs: list[str],
                          tmp: pathlib.Path) -> dict[str, Any]:
    """Swap ``metrics.bearer_token_file`` (a plain path, not {file: P}) for a temp file
    holding a stand-in token, after checking it is inside a Secret mount."""
    path = (data.get("metrics") or {}).get("bearer_token_file")
    if path is None:
        return data
    assert any(str(path).startswith(d.rstrip("/") + "/") for d in dirs), \
        f"metrics.bearer_token_file {path} is not under a mounted Secret ({dirs})"
    stand_in = tmp / "secret-metrics-token"
    stand_in.write_text("stand-in-metrics-token\n")
    return {**data, "metrics": {**data["metrics"], "bearer_token_file": str(stand_in)}}


@dataclasses.dataclass
class Prepared:
    """One Synapse container of an overlay as the kubelet would start it."""

    workload: dict[str, Any]
    container: dict[str, Any]
    environ: dict[str, str]  # the pod's env; secretKeyRef values are placeholders
    data: dict[str, Any]  # its config.yaml, secret files swapped for temp files


def prepare(overlay: str, process: str, tmp_path: pathlib.Path,
            field_refs: dict[str, str] | None = None) -> Prepared:
    return prepare_objects(render.render(overlay), process, tmp_path, field_refs, overlay)


def prepare_objects(objects: list[dict[str, Any]], process: str, tmp_path: pathlib.Path,
                    field_refs: dict[str, str] | None = None, source: str = "rendered",
                    ) -> Prepared:
    """The ``process`` container of rendered ``objects`` (an overlay's or the chart's)."""
    hits = [(w, c) for w, c in synapse_containers(objects) if c["args"][0] == process]
    assert len(hits) == 1, f"{source}: expected one {process} container, found {len(hits)}"
    workload, c = hits[0]
    environ = container_environ(c, field_refs)
    data = config_data(objects, workload, c, environ)
    dirs = secret_mount_dirs(workload, c)
    data = replace_metrics_token(replace_file_secrets(data, dirs, tmp_path), dirs, tmp_path)
    return Prepared(workload, c, environ, data)


def load_settings(overlay: str, process: str, tmp_path: pathlib.Path,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The settings the process would load, with its workload and container."""
    return settings_of(prepare(overlay, process, tmp_path), process, overlay, monkeypatch)


def settings_of(pod: Prepared, process: str, source: str, monkeypatch: pytest.MonkeyPatch,
                ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The settings ``pod``'s process would load (``source``: whose ConfigMap it is), with
    its workload and container; the pod's env becomes this process's."""
    model = MODELS[process]
    # {env: X} secrets are resolved from the process environment: exactly the pod's
    for name in [k for k in os.environ if k.startswith("SYNAPSE_")]:
        monkeypatch.delenv(name)
    for name, value in pod.environ.items():
        monkeypatch.setenv(name, value)
    data = settings.apply_env_overrides(model, pod.data, pod.environ)
    loaded = settings.validate(model, data, source=f"{source} {process} ConfigMap")
    return loaded, pod.workload, pod.container
