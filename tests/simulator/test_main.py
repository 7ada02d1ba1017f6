"""The ``synapse simulator`` command line: flags, config precedence, port 0, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
import subprocess
import urllib.request

import aiohttp

from tests import harness
from tests.simulator.conftest import MODEL, samples, start

AGENT_FLAGS = ("--config", "--engine", "--host", "--port", "--model", "--served-model-name",
               "--time-scale", "--seed", "--profile", "--max-num-seqs", "--num-gpu-blocks",
               "--block-size", "--prefill-s-per-token", "--decode-base-s",
               "--decode-per-seq-s", "--error-rate", "--crash-after", "--hang",
               "--stall-after-chunks", "--slow-start", "--embedder",
               "--max-client-batch-size")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([harness.console_script("synapse"), "simulator", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "SYNAPSE_CONFIG_PATH": ""})


def test_help_lists_the_flags_others_depend_on_and_the_faults_endpoint() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in AGENT_FLAGS:
        assert flag in result.stdout, flag
    assert "POST /sim/faults" in result.stdout


def test_bad_values_exit_2_with_one_line_naming_the_field(tmp_path: pathlib.Path) -> None:
    result = run("--error-rate", "2")
    assert result.returncode == 2 and "faults.error_rate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("--profile", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "--profile" in result.stderr
    bad = tmp_path / "bad-profile.yaml"
    bad.write_text("max_num_seqz: 3\n")
    result = run("--profile", str(bad))
    assert result.returncode == 2 and "profile.max_num_seqz" in result.stderr


def test_port_0_announces_the_port_and_sigterm_exits_0(processes: harness.ProcessPool,
                                                       tmp_path: pathlib.Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text("time_scale: 0\nprofile:\n  num_gpu_blocks: 500\n  block_size: 8\n")
    profile = tmp_path / "profile.yaml"
    profile.write_text("block_size: 32\nmax_num_seqs: 7\n")
    proc = processes.start("sim-port0", ["synapse", "simulator", "--config", str(config),
                                         "--port", "0", "--profile", str(profile),
                                         "--num-gpu-blocks", "123", "--served-model-name",
                                         "a", "--served-model-name", "b", "c"])
    pattern = re.compile(r"simulator listening on (http://127\.0\.0\.1:\d+)")
    harness.wait_until(lambda: bool(pattern.search(proc.output())), 30, "the listening line",
                       proc=proc)
    match = pattern.search(proc.output())
    assert match is not None
    url = match.group(1)
    assert not url.endswith(":0")
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        info = samples(resp.read().decode())["vllm:cache_config_info"][0][0]
    # file < --profile < single flags
    assert info["num_gpu_blocks"] == "123" and info["block_size"] == "32"
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        assert [m["id"] for m in json.load(resp)["data"]] == ["a", "b", "c"]
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


async def test_sigterm_mid_stream_closes_it_without_done_and_exits_0(
        processes: harness.ProcessPool) -> None:
    sim = start(processes, "--time-scale", "1", name="sim-term")
    body = {"model": MODEL, "prompt": "long", "max_tokens": 5000, "ignore_eos": True,
            "stream": True}
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            received += await resp.content.readline()
            sim.proc.signal(signal.SIGTERM)
            try:
                async for line in resp.content:
                    received += line
            except aiohttp.ClientPayloadError:
                pass  # the connection was closed under the stream: expected
    assert received.startswith(b"data: ") and b"[DONE]" not in received
    assert await asyncio.to_thread(sim.proc.wait, 30) == 0
    assert "aborted 1 unfinished sequences at shutdown" in sim.proc.output()
