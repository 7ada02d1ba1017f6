"""A Synapse container as the kubelet would start it: environment, config, Secret mounts.

Shared by the config tests (validate with the models) and the boot tests (run the real
process with the config).
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pydantic
import yaml

from agent import config as agent_config
from controlplane import config as cp_config
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


def container_environ(c: dict[str, Any]) -> dict[str, str]:
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
                value = FIELD_REFS[source["fieldRef"]["fieldPath"]]
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


def config_data(objects: list[dict[str, Any]], workload: dict[str, Any], c: dict[str, Any],
                 environ: dict[str, str]) -> dict[str, Any]:
    path = pathlib.PurePosixPath(environ["SYNAPSE_CONFIG_PATH"])
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
            stand_in.write_text("stand-in secret\n")
            return {"file": str(stand_in)}
        return {k: replace_file_secrets(v, dirs, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_file_secrets(v, dirs, tmp) for v in value]
    return value
