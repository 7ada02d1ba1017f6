"""Every overlay renders and every object in it validates offline, strictly.

Built-in kinds: kubernetes-validate --strict (unknown fields fail) for the oldest and the
newest Kubernetes we target; Prometheus Operator kinds: the minimal CRD schemas. The
misspelling tests prove that the check bites: they break a copy of the manifests and
expect the pipeline (render → validate) to name the bad field.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.manifests import render, validate

CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding",
                  "RuntimeClass"}


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_overlay_renders_and_every_object_validates_strictly(overlay: str) -> None:
    objects = render.render(overlay)
    assert len(objects) >= 4, f"{overlay} rendered only {len(objects)} objects"
    problems = validate.problems(objects)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_every_namespaced_object_lands_in_the_synapse_namespace(overlay: str) -> None:
    for obj in render.render(overlay):
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        assert obj["metadata"].get("namespace") == "synapse", \
            f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is not in namespace synapse"


def _broken_render(tmp_path: pathlib.Path, file: str, old: str, new: str,
                   overlay: str) -> list[dict[str, Any]]:
    """``overlay`` rendered from a copy of the manifests with ``old`` in ``file`` replaced
    by ``new``."""
    root = tmp_path / "manifests"
    shutil.copytree(render.MANIFESTS, root)
    path = root / file
    text = path.read_text()
    assert old in text, f"{file} no longer contains {old!r}: update this test"
    path.write_text(text.replace(old, new, 1))
    return render.render_dir(root / "overlays" / overlay)


def test_a_misspelled_field_in_a_manifest_fails_validation(tmp_path: pathlib.Path) -> None:
    objects = _broken_render(tmp_path, "base/controlplane-deployment.yaml",
                             "readinessProbe:", "readinesProbe:", "production")
    problems = validate.problems(objects)
    assert any("readinesProbe" in line and "Deployment/synapse-controlplane" in line
               for line in problems), problems


def test_a_misspelled_field_in_a_custom_resource_fails_validation(
        tmp_path: pathlib.Path) -> None:
    objects = _broken_render(tmp_path, "monitoring/podmonitor.yaml",
                             "podMetricsEndpoints:", "podMetricEndpoints:", "monitoring")
    problems = validate.problems(objects)
    assert any("podMetricEndpoints" in line and "PodMonitor/synapse-agent" in line
               for line in problems), problems


def test_a_scrape_token_written_inline_fails_validation(tmp_path: pathlib.Path) -> None:
    # the CRD takes the credentials only as a reference to a Secret's key
    objects = _broken_render(tmp_path, "monitoring/servicemonitor.yaml",
                             "credentials:\n          name: synapse-auth\n          key: "
                             "metrics-token", "credentials: stand-in-token", "monitoring")
    problems = validate.problems(objects)
    assert any("ServiceMonitor/synapse-controlplane" in line for line in problems), problems


def test_a_wrong_type_fails_validation(tmp_path: pathlib.Path) -> None:
    objects = _broken_render(tmp_path, "base/controlplane-pdb.yaml",
                             "minAvailable: 1", "minAvailable: [1]", "bundled")
    problems = validate.problems(objects)
    assert any("PodDisruptionBudget/synapse-controlplane" in line for line in problems), \
        problems


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_no_secret_value_is_written_into_the_manifests(overlay: str) -> None:
    objects = render.render(overlay)
    secrets = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
    assert not secrets, f"{overlay} ships Secret objects {secrets}: reference them instead"
    for workload in render.workloads(objects):
        for c in render.pod_spec(workload)["containers"]:
            for env in c.get("env", []):
                sensitive = any(w in env["name"].upper()
                                for w in ("KEY", "TOKEN", "PASSWORD", "SECRET"))
                if sensitive:
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, (f"{overlay}: {workload['metadata']['name']}/{c['name']} "
                                 f"sets {env['name']} without a secretKeyRef")


def _cli(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    cli = pathlib.Path(sys.executable).parent / "kubernetes-validate"
    assert cli.exists(), "kubernetes-validate is a dev dependency: run `make test`"
    return subprocess.run([str(cli), "--strict", "--quiet", "-k", validate.OLDEST_SUPPORTED,
                           str(path)], capture_output=True, text=True, timeout=120, check=False)


def test_the_kubernetes_validate_cli_agrees(tmp_path: pathlib.Path) -> None:
    # the command line the issue names, on a rendered overlay (built-in kinds only) and on
    # the same overlay with a misspelled field
    good = tmp_path / "production.yaml"
    good.write_text(yaml.safe_dump_all(render.render("production")))
    proc = _cli(good)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = _broken_render(tmp_path, "base/agent-daemonset.yaml", "      hostPID: true",
                            "      hostPid: true", "production")
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump_all(broken))
    proc = _cli(bad)
    assert proc.returncode != 0
    assert "hostPid" in proc.stdout + proc.stderr
