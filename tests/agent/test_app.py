"""Agent wiring details: GPU processes are attributed to the backend that owns them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from agent import app, telemetry
from tests.agent.test_telemetry import StandInNvml


class TwoProcessGpu(StandInNvml):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(power_error=3)
        self.pids = pids

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        import types

        return [types.SimpleNamespace(pid=pid, usedGpuMemory=2**30) for pid in self.pids]


def test_gpu_processes_are_named_after_the_backend_whose_process_tree_they_are_in():
    # An "engine" that forks a worker, as vLLM does: the worker holds the GPU memory.
    engine = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time;"
                               "w = subprocess.Popen([sys.executable, '-c', 'import time; "
                               "time.sleep(30)']); print(w.pid, flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    worker = 0
    try:
        worker = int(engine.stdout.readline())
        source = telemetry.NvmlSource(library=TwoProcessGpu([worker, 999_999]))
        [gpu] = app._sample_with_owners(source, {engine.pid: "llama"})
        owners = {p.pid: p.backend_name for p in gpu.processes}
        assert owners == {worker: "llama", 999_999: ""}  # unknown PIDs stay unattributed
    finally:
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        engine.kill()
        engine.wait()
        engine.stdout.close()
