"""GPU telemetry: real NVML on this GPU-less machine, a stand-in NVML library for the
field rules, and the explicitly chosen fake source."""

from __future__ import annotations

import types as pytypes

import pynvml

from agent import telemetry
from agent.config import FakeGpu, TelemetrySettings


def test_nvml_without_a_gpu_is_an_error_state_not_fake_data():
    errors = []
    source = telemetry.NvmlSource(on_error=lambda: errors.append(1))
    status = source.status()
    assert status.source == "nvml" and not status.ok and "nvmlInit failed" in status.error
    assert source.sample() == [] and errors
    source.close()


class StandInNvml:
    """The pynvml surface NvmlSource uses, for one GPU whose fan/power reads fail."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, power_error: int) -> None:
        self.power_error = power_error

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-1234"

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        assert version == pynvml.nvmlMemory_v2
        return pytypes.SimpleNamespace(total=80 * 2**30, used=20 * 2**30, free=60 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return pytypes.SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 64

    def nvmlDeviceGetPowerUsage(self, h):
        raise pynvml.NVMLError(self.power_error)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000  # mW

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [pytypes.SimpleNamespace(pid=4242, usedGpuMemory=18 * 2**30)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def test_a_not_supported_field_is_left_empty_and_the_rest_is_kept():
    errors = []
    source = telemetry.NvmlSource(on_error=lambda: errors.append(1),
                                  library=StandInNvml(pynvml.NVML_ERROR_NOT_SUPPORTED))
    [gpu] = source.sample()
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.uuid == "GPU-1234"
    assert gpu.power_watts is None and gpu.power_limit_watts == 700.0  # mW → W
    assert gpu.memory_used_bytes == 20 * 2**30 and gpu.utilization_percent == 87.0
    assert gpu.temperature_celsius == 64.0
    assert [(p.pid, p.used_memory_bytes) for p in gpu.processes] == [(4242, 18 * 2**30)]
    assert errors == []  # NotSupported is not an error


def test_other_nvml_errors_on_a_field_are_counted():
    errors = []
    source = telemetry.NvmlSource(on_error=lambda: errors.append(1),
                                  library=StandInNvml(pynvml.NVML_ERROR_GPU_IS_LOST))
    [gpu] = source.sample()
    assert gpu.power_watts is None and len(errors) == 1 and source.status().ok


def test_fake_source_moves_plausibly_and_says_it_is_fake():
    clock = [0.0]
    cfg = TelemetrySettings(source="fake", fake_gpus=[FakeGpu(name="Sim A", memory_total_gb=24),
                                                      FakeGpu(name="Sim B")])
    source = telemetry.FakeSource(cfg, clock=lambda: clock[0])
    assert source.status().source == "fake" and source.status().ok
    first = source.sample()
    clock[0] = 45.0
    later = source.sample()
    assert [g.name for g in first] == ["Sim A", "Sim B"]
    assert first[0].memory_total_bytes == 24 * 2**30
    for gpu in first + later:
        assert 0 <= gpu.utilization_percent <= 100
        assert gpu.memory_used_bytes + gpu.memory_free_bytes == gpu.memory_total_bytes
        assert 30 < gpu.temperature_celsius < 95 and 0 < gpu.power_watts <= 400
    assert first[0].memory_used_bytes != later[0].memory_used_bytes
