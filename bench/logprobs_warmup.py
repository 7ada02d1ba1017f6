"""Benchmark: what a fresh real vLLM (SmolLM2-135M on the CPU, from the engine tier:
``make engines``) makes its first request asking for logprobs wait, what a plain request
sent meanwhile waits, and what the agent's warm-up request (:func:`agent.runner.
warmup_body`) and Inductor's on-disk cache change.

vLLM compiles ``batched_count_greater_than`` (``vllm/v1/sample/ops/logprobs.py``,
``torch.compile`` with Inductor) on the first request with logprobs, even with
``--enforce-eager``, inside the engine core's step. Three starts, one engine at a time,
with the agent's flags and environment (eager, a fixed KV cache):

* ``cold``: an empty ``TORCHINDUCTOR_CACHE_DIR``; two plain completions (the second is
  the baseline), then the first logprobs request and, one second into it, a plain one
  (does it stall?); then a second logprobs request;
* ``cached``: the same again on a new engine with the cache directory ``cold`` filled;
* ``warmed``: an empty cache directory; the agent's warm-up request right after
  ``/health`` (timed: what it adds to the start-up), then what tenants send first: a
  completion with logprobs, a chat completion with ``top_logprobs`` 2 and a completion
  with ``prompt_logprobs``, each timed.

Printed: one line per figure, then one JSON line ``{"bench": "logprobs_warmup", …}``.

Run: ``python -m bench.logprobs_warmup`` (a few minutes on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from agent import config as agent_config  # noqa: E402
from agent import engine_env as engine_env_rule  # noqa: E402
from agent import runner  # noqa: E402
from agent.core import commands, types  # noqa: E402
from bench.gateway import wait_http  # noqa: E402
from synapse_common import engines  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

START_S = 600.0
PLAIN = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


def engine_env(cores: str, inductor: pathlib.Path, command: Sequence[str]) -> dict[str, str]:
    """What the agent gives a vLLM on a node without a GPU (:mod:`agent.engine_env`),
    with a 1 GiB KV cache and the Inductor cache at ``inductor``."""
    cfg = agent_config.SupervisorSettings(vllm_device="cpu", vllm_cpu_kvcache_gib=1,
                                          vllm_cpu_threads_bind=cores)
    return {**engine_env_rule.vllm_environment(cfg, command),
            engine_env_rule.COMPILE_CACHE: str(inductor)}


def post(url: str, path: str, body: dict[str, Any]) -> float:
    """Seconds until ``body``'s answer (200 asserted)."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()
        assert resp.status == 200
    return time.monotonic() - t0


def start(workdir: pathlib.Path, name: str, inductor: pathlib.Path,
          args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, float]:
    tier = engines.find()
    command, model_dir = tier.require_vllm()
    port = free_port()
    spec = types.EngineSpec(name=name, engine="vllm", model=str(model_dir),
                            served_model_names=(tier.model_name,), max_model_len=4096,
                            extra_args=("--dtype", engines.cpu_dtype(), "--enforce-eager"))
    argv = commands.build(spec, "127.0.0.1", port, vllm_command=command) or []
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / f"{name}.log", "wb")  # lives as long as the child
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **engine_env(args.cores, inductor, command)},
                            start_new_session=True)
    wait_http(f"{url}/health", proc, START_S)
    return proc, url, time.monotonic() - t0


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stall(url: str, model: str) -> dict[str, float]:
    """Baseline plain latency, the first logprobs request with a plain one sent 1 s into
    it, then a second logprobs request."""
    plain = {**PLAIN, "model": model}
    with_logprobs = {**plain, "max_tokens": 1, "logprobs": 1}
    post(url, "/v1/completions", plain)
    out = {"plain_s": post(url, "/v1/completions", plain)}
    first: list[float] = []
    thread = threading.Thread(
        target=lambda: first.append(post(url, "/v1/completions", with_logprobs)))
    thread.start()
    time.sleep(1.0)
    out["plain_during_first_logprobs_s"] = post(url, "/v1/completions", plain)
    thread.join()
    out["first_logprobs_s"] = first[0]
    out["second_logprobs_s"] = post(url, "/v1/completions", with_logprobs)
    return out


def warmed(url: str, model: str) -> dict[str, float]:
    spec = types.EngineSpec(name="b", engine="vllm", model="m", served_model_names=(model,))
    out = {"warmup_s": post(url, runner.WARMUP_PATH, runner.warmup_body(spec))}
    out["first_logprobs_s"] = post(url, "/v1/completions",
                                   {**PLAIN, "model": model, "logprobs": 2})
    out["chat_top_logprobs_s"] = post(url, "/v1/chat/completions", {
        "model": model, "max_tokens": 8, "temperature": 0, "logprobs": True,
        "top_logprobs": 2, "messages": [{"role": "user", "content": "Name a colour."}]})
    out["prompt_logprobs_s"] = post(url, "/v1/completions",
                                    {**PLAIN, "model": model, "prompt_logprobs": 1})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = engines.find().model_name
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-logprobs-warmup-"))
    results: dict[str, Any] = {}
    try:
        for name, cache, measure in (("cold", "a", stall), ("cached", "a", stall),
                                     ("warmed", "b", warmed)):
            proc, url, started = start(workdir, name, workdir / f"inductor-{cache}", args)
            try:
                results[name] = {"start_s": started, **measure(url, model)}
            finally:
                stop(proc)
            for figure, value in results[name].items():
                print(f"{name:<8}{figure:<32}{value:8.2f} s", flush=True)
    finally:
        if args.keep_logs:
            print(f"logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"bench": "logprobs_warmup", "engine": "vllm", **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", default="auto", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--keep-logs", action="store_true")
    print(json.dumps(run(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
