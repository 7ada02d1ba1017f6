"""GPU telemetry sources: NVML (nvidia-ml-py) and an explicitly chosen fake.

Decisions:

* :class:`NvmlSource` never invents data. If ``nvmlInit`` fails (no driver, no GPU, no
  library) the source stays in an error state: ``status()`` says ``ok=False`` with the
  NVML error, ``sample()`` returns no GPUs, and initialisation is retried every
  ``RETRY_INIT_S`` in case the driver appears later.
* ``NVMLError_NotSupported`` on one field leaves that field ``None``; any other error on
  a field is counted (``synapse_agent_nvml_errors_total``) and also leaves it ``None``.
  A device handle that cannot be obtained drops only that GPU from the sample.
* Memory: ``nvmlDeviceGetMemoryInfo(h, nvmlMemory_v2)`` where the driver supports it (it
  separates reserved memory, so ``used`` matches nvidia-smi), else v1.
* Per-process memory comes from compute and graphics process lists; PIDs are host PIDs
  (the DaemonSet runs with hostPID) and are mapped to backends by the caller.
* NVML calls are blocking ioctls: the agent runs ``sample()`` in ``asyncio.to_thread``.
* :class:`FakeSource` (config ``telemetry.source: fake``) gives N GPUs whose utilisation
  follows a slow wave with noise, with memory, temperature and power derived from it,
  driven by an injected clock so tests are deterministic. Memory in use is the wave's
  (or ``memory_used_gb`` when set) plus what the agent's engines hold on that GPU, as
  ``holding()`` reports them (GPU indices, fraction of the total): like NVML, a placed
  engine's memory shows as used once it runs, so placement sees it.
"""

from __future__ import annotations

import functools
import importlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from agent.config import FakeGpu, TelemetrySettings
from agent.core import types

RETRY_INIT_S = 30.0
GIB = 1024**3
Holding = tuple[tuple[int, ...], float]   # an engine's GPU indices, fraction of each held


class GpuSource(Protocol):
    name: str

    def sample(self) -> list[types.GpuSample]: ...

    def status(self) -> types.TelemetryStatus: ...

    def close(self) -> None: ...


class NvmlSource:
    name = "nvml"

    def __init__(self, on_error: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, library: Any = None) -> None:
        if library is None:
            library = importlib.import_module("pynvml")  # nvidia-ml-py; NVML source only
        self._nvml: Any = library  # a stand-in library in tests (this machine has no GPU)
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()
        self._ok = False
        self._error = "not initialised"
        self._last_try = -math.inf
        self._init()

    def _init(self) -> None:
        self._last_try = self._clock()
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            self._ok, self._error = False, f"nvmlInit failed: {exc}"
            self._on_error()
            return
        except OSError as exc:  # library present but unloadable
            self._ok, self._error = False, f"nvmlInit failed: {exc}"
            self._on_error()
            return
        self._ok, self._error = True, ""

    def status(self) -> types.TelemetryStatus:
        return types.TelemetryStatus("nvml", self._ok, self._error)

    def close(self) -> None:
        with self._lock:
            if self._ok:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass
                self._ok = False

    def sample(self) -> list[types.GpuSample]:
        with self._lock:
            if not self._ok:
                if self._clock() - self._last_try >= RETRY_INIT_S:
                    self._init()
                if not self._ok:
                    return []
            try:
                count = self._nvml.nvmlDeviceGetCount()
            except self._nvml.NVMLError as exc:
                self._ok, self._error = False, f"nvmlDeviceGetCount failed: {exc}"
                self._on_error()
                return []
            samples = []
            for index in range(count):
                sample = self._device(index)
                if sample is not None:
                    samples.append(sample)
            return samples

    def _field(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._nvml.NVMLError_NotSupported:
            return None
        except self._nvml.NVMLError:
            self._on_error()
            return None

    def _device(self, index: int) -> types.GpuSample | None:
        n = self._nvml
        handle = self._field(lambda: n.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            return None
        mem = self._memory(handle)
        util = self._field(lambda: n.nvmlDeviceGetUtilizationRates(handle))
        temp = self._field(lambda: n.nvmlDeviceGetTemperature(handle, n.NVML_TEMPERATURE_GPU))
        power = self._field(lambda: n.nvmlDeviceGetPowerUsage(handle))
        limit = self._field(lambda: n.nvmlDeviceGetEnforcedPowerLimit(handle))
        return types.GpuSample(
            index=index, uuid=_text(self._field(lambda: n.nvmlDeviceGetUUID(handle))),
            name=_text(self._field(lambda: n.nvmlDeviceGetName(handle))),
            memory_total_bytes=None if mem is None else int(mem.total),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_free_bytes=None if mem is None else int(mem.free),
            utilization_percent=None if util is None else float(util.gpu),
            memory_utilization_percent=None if util is None else float(util.memory),
            temperature_celsius=None if temp is None else float(temp),
            power_watts=None if power is None else power / 1000.0,  # NVML reports mW
            power_limit_watts=None if limit is None else limit / 1000.0,
            processes=self._processes(handle))

    def _memory(self, handle: Any) -> Any:
        n = self._nvml
        version = getattr(n, "nvmlMemory_v2", None)
        if version is not None:
            try:
                return n.nvmlDeviceGetMemoryInfo(handle, version=version)
            except (n.NVMLError, TypeError):
                pass  # older driver (NVML_ERROR_FUNCTION_NOT_FOUND) or binding: use v1
        return self._field(lambda: n.nvmlDeviceGetMemoryInfo(handle))

    def _processes(self, handle: Any) -> tuple[types.GpuProcess, ...]:
        n = self._nvml
        found: dict[int, int] = {}
        for getter in (n.nvmlDeviceGetComputeRunningProcesses,
                       n.nvmlDeviceGetGraphicsRunningProcesses):
            procs: Any = self._field(functools.partial(getter, handle))
            for proc in procs or []:
                used = proc.usedGpuMemory
                # NVML_VALUE_NOT_AVAILABLE (None in the binding) without per-process stats
                found[int(proc.pid)] = max(found.get(int(proc.pid), 0), int(used or 0))
        return tuple(types.GpuProcess(pid, used) for pid, used in sorted(found.items()))


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class FakeSource:
    """Plausible moving numbers for machines without GPUs; chosen only explicitly."""

    name = "fake"

    def __init__(self, cfg: TelemetrySettings, clock: Callable[[], float] = time.monotonic,
                 seed: int = 0, holding: Callable[[], Iterable[Holding]] = tuple) -> None:
        self._gpus = cfg.fake_gpus
        self._clock = clock
        self._rng = random.Random(seed)
        self._t0 = clock()
        self._holding = holding

    def status(self) -> types.TelemetryStatus:
        return types.TelemetryStatus("fake", True, "")

    def close(self) -> None:
        pass

    def sample(self) -> list[types.GpuSample]:
        t = self._clock() - self._t0
        held: dict[int, float] = {}
        for indices, fraction in self._holding():
            for i in indices:
                held[i] = held.get(i, 0.0) + fraction
        return [self._one(i, gpu, t, held.get(i, 0.0)) for i, gpu in enumerate(self._gpus)]

    def _one(self, index: int, gpu: FakeGpu, t: float, held: float) -> types.GpuSample:
        wave = 0.5 + 0.4 * math.sin(t / 60.0 + index)
        util = min(100.0, max(0.0, 100 * wave + self._rng.uniform(-5, 5)))
        name, total = gpu.name, int(gpu.memory_total_gb * GIB)
        base = total * (0.3 + 0.6 * wave) if gpu.memory_used_gb is None \
            else gpu.memory_used_gb * GIB
        used = min(total, int(base + held * total))
        return types.GpuSample(
            index=index, uuid=f"GPU-fake-{index:04d}", name=name,
            memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=total - used,
            utilization_percent=round(util, 1), memory_utilization_percent=round(util * 0.6, 1),
            temperature_celsius=round(35 + util * 0.45, 1),
            power_watts=round(70 + util * 3.3, 1), power_limit_watts=400.0)


def build(cfg: TelemetrySettings, on_error: Callable[[], None],
          holding: Callable[[], Iterable[Holding]] = tuple) -> GpuSource:
    if cfg.source == "fake":
        return FakeSource(cfg, holding=holding)
    return NvmlSource(on_error=on_error)
