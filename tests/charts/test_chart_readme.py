"""The chart's README documents every value and is current with values.yaml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

from tests.charts import helm

SCRIPT = helm.CHART.parent / "gen_readme.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_readme", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_value_is_documented() -> None:
    missing = _generator().undocumented((helm.CHART / "values.yaml").read_text())
    assert not missing, f"values.yaml keys without a `# --` comment: {missing}"


def test_readme_is_current() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_table_follows_the_values() -> None:
    gen = _generator()
    values = (helm.CHART / "values.yaml").read_text()
    readme = (helm.CHART / "README.md").read_text()
    assert gen.render_readme(readme, values) == readme
    changed = values.replace("replicaCount: 2", "replicaCount: 5", 1)
    assert "| `controlPlane.replicaCount` | int | `5` |" in gen.render_readme(readme, changed)
    undocumented = values.replace("    # -- Replicas a node drain must leave running.\n", "", 1)
    assert gen.undocumented(undocumented) == ["controlPlane.podDisruptionBudget.minAvailable"]
