"""Offline schema validation of rendered objects.

Built-in kinds go through `kubernetes-validate` in strict mode (unknown fields are errors)
against the oldest Kubernetes release we support and the newest the package knows;
Prometheus Operator kinds go through the minimal CRD schemas in `crd_schemas`.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate

from tests.manifests import crd_schemas

# gRPC probes (1.27), HPA v2 and PDB v1 are all there by 1.29
OLDEST_SUPPORTED = "1.29.0"


def versions() -> tuple[str, ...]:
    return (OLDEST_SUPPORTED, kubernetes_validate.latest_version())


def _describe(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def errors(obj: dict[str, Any]) -> list[str]:
    """Every schema violation of one object, as readable lines (empty = valid)."""
    schema = crd_schemas.SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{_describe(obj)}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: "
                f"{e.message}" for e in validator.iter_errors(obj)]
    found: list[str] = []
    for version in versions():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path)) or "(top)"
            found.append(f"{_describe(obj)} (Kubernetes {version}): {path}: "
                         f"{exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            found.append(f"{_describe(obj)}: no schema for {obj.get('apiVersion')} "
                         f"{obj.get('kind')} in Kubernetes {version}")
    return found


def problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every schema violation of every object (empty = all valid)."""
    return [line for obj in objects for line in errors(obj)]
