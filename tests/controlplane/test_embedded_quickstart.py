"""What ``synapse up`` waits for and prints, as the README's quick start uses it: the
backend it started itself (not one a persisted deploy brought back), the venv's own
python and synapsectl, the ports' defaults, and the ``client`` extra ``make up``
installs for the examples."""

from __future__ import annotations

import pathlib
import subprocess
import tomllib

from controlplane import embedded
from protos.synapse.v1 import admin_pb2

REPO = pathlib.Path(__file__).resolve().parents[2]


def models(*backends: tuple[str, str, bool]) -> admin_pb2.ListModelsResponse:
    """(model, backend, routable) rows as ListModels answers them."""
    out = admin_pb2.ListModelsResponse()
    for model, backend, routable in backends:
        info = next((m for m in out.models if m.name == model), None) or out.models.add(
            name=model)
        info.backends.add(node="local", backend=backend, routable=routable)
    return out


def test_a_persisted_deploy_ready_first_is_not_the_engine_ready() -> None:
    listed = models(("tiny", "tiny", True), ("smollm2-135m", "vllm", False))
    assert not embedded.serves(listed, "smollm2-135m", "vllm")
    assert embedded.serves(models(("smollm2-135m", "vllm", True)), "smollm2-135m", "vllm")
    assert not embedded.serves(models(("m", "other", True)), "m", "vllm")
    # behind --upstream, any routable backend of the model
    assert embedded.serves(models(("m", "upstream", True)), "m", None)


def test_the_banner_names_the_venvs_python_and_synapsectl(tmp_path: pathlib.Path) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    text = embedded._banner("http://127.0.0.1:8080", "k", "llama", tmp_path / "admin-key",
                            "127.0.0.1:50051", bin_dir)
    assert f"{bin_dir / 'python'} -c 'from openai import OpenAI" in text
    assert f"{bin_dir / 'synapsectl'} get nodes" in text


def test_up_help_shows_the_ports_defaults() -> None:
    text = embedded.build_parser("synapse up").format_help()
    assert "default: 8080" in text and "default: 50051" in text


def test_make_up_installs_the_clients_the_examples_import() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {r.split(">")[0] for r in extras["client"]} == {"openai", "anthropic"}
    plan = subprocess.run(["make", "-n", "-W", "pyproject.toml", "up"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    install = next(line for line in plan.splitlines() if "pip install" in line and "-e" in line)
    assert "client" in install.split("-e", 1)[1], install
