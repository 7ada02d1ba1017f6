"""vLLM's environment on a node without a GPU (and none on a GPU node)."""

from __future__ import annotations

from agent import engine_env
from agent.config import SupervisorSettings
from synapse_common import engines


def test_cpu_variables_and_the_venvs_openmp_runtime(tmp_path):
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    cfg = SupervisorSettings(vllm_device="cpu", vllm_cpu_kvcache_gib=2,
                             vllm_cpu_threads_bind="0-1")
    expected = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
                "VLLM_CPU_OMP_THREADS_BIND": "0-1", "HF_HUB_OFFLINE": "1"}
    assert engine_env.vllm_environment(cfg, [python, "-m", "vllm"]) == expected
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_bytes(b"")
    assert engine_env.vllm_environment(cfg, [python, "-m", "vllm"]) == {
        **expected, "LD_PRELOAD": str(tmp_path / "venv" / "lib" / "libiomp5.so")}


def test_a_gpu_node_adds_nothing_and_auto_follows_nvml():
    assert engine_env.vllm_environment(SupervisorSettings(vllm_device="cuda"), ["vllm"]) == {}
    auto = SupervisorSettings(vllm_device="auto")
    assert engine_env.on_cpu(auto, ["vllm"]) is not engine_env.gpu_present()


def test_auto_runs_the_engine_tiers_cpu_build_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(engines.ENV_DIR, str(tmp_path))
    (tmp_path / "vllm-cpu").mkdir()
    (tmp_path / "vllm-cpu" / engines.STAMP).write_text(engines.VLLM_RECIPE)
    auto = SupervisorSettings(vllm_device="auto")
    assert auto.vllm_command == engines.find().vllm_command()
    assert engine_env.on_cpu(auto, auto.vllm_command)
