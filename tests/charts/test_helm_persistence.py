"""controlPlane.persistence: the control plane's data_dir on a PersistentVolumeClaim, so the
operator intent kept there without Redis (cordons, drains, deployed engines) outlives the
pod's replacement, which an emptyDir does not; one replica only.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from tests.charts import helm
from tests.manifests import pods, render, validate

PILOT = "self-hosted-pilot"      # one replica, no Redis: where the intent is in data_dir
ON = "controlPlane.persistence.enabled=true"


def _data_dir(objects: list[dict[str, Any]], tmp_path: pathlib.Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """The control plane's Deployment and the volume mounted at its config's data_dir."""
    cp, deploy, container = pods.settings_of(
        helm.prepare(objects, "controlplane", tmp_path), "controlplane", "chart", monkeypatch)
    return deploy, pods.mounted_volume(deploy, container, cp.data_dir)


def test_data_dir_is_an_emptydir_unless_persistence_is_asked_for(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deploy, volume = _data_dir(helm.render_chart(PILOT), tmp_path, monkeypatch)
    assert "emptyDir" in volume and deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not [o for o in helm.render_chart(PILOT) if o["kind"] == "PersistentVolumeClaim"]

    objects = helm.render_chart(PILOT, ON, "controlPlane.persistence.storageClass=fast")
    assert not validate.problems(objects), validate.problems(objects)
    deploy, volume = _data_dir(objects, tmp_path, monkeypatch)
    claim = render.find(objects, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "4Gi"   # dataSizeLimit
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # the old pod lets go of the claim before the new one mounts it
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}


def test_an_existing_claim_is_mounted_and_none_created(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.render_chart(PILOT, ON, "controlPlane.persistence.existingClaim=intent")
    _, volume = _data_dir(objects, tmp_path, monkeypatch)
    assert volume["persistentVolumeClaim"]["claimName"] == "intent"
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]


@pytest.mark.parametrize("sets", [
    (ON, "autoscaling.controlPlane.enabled=false"),               # replicaCount 2
    (ON, "controlPlane.replicaCount=1", "controlPlane.podDisruptionBudget.enabled=false"),
], ids=["two replicas", "autoscaled"])
def test_more_than_one_replica_on_one_claim_is_refused(sets: tuple[str, ...]) -> None:
    """A ReadWriteOnce claim attaches to one node, and a data_dir is one process's."""
    error = helm.rejected(None, *sets)
    assert "controlPlane.persistence.enabled" in error and "replicaCount 1" in error


def test_the_notes_say_what_keeps_cordons() -> None:
    assert "Durable cordons need Redis" in helm.notes(PILOT)
    persisted = helm.notes(PILOT, ON)
    assert "Durable cordons" not in persisted and "synapse-controlplane-data" in persisted
    assert "Durable cordons" not in helm.notes()                 # Redis keeps them
