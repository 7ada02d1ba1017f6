"""Benchmark: ``Node.Embed`` over gRPC (a real ``synapse agent`` process) vs the raw model.

Run: ``python -m bench.embedding [--calls N] [--rounds R] [--batch-wait-ms MS]
[--runtime auto|torch|onnx]``. Prints a
table, then as the last line one JSON object: ``{"bench": "embedding", "batched_speedup": …,
"cached_p50_ms": …, "uncached_p50_ms": …}``.

* raw model: all-MiniLM-L6-v2 ``encode`` in this process, one text at a time and in
  batches of 32 (the ceiling micro-batching can approach); the agent runs the same modules
  without ``encode``'s per-call machinery, so its 1-caller row can beat this one;
* Node.Embed uncached: every call carries a text never seen before, 1 caller one call
  at a time, and 32 concurrent callers (micro-batching coalesces them);
* Node.Embed cached: the same texts again, 1 and 32 callers.

``batched_speedup`` = throughput of 32 concurrent uncached callers / throughput of one
caller, both on the agent's runtime (``--runtime``; the raw rows are always torch). The
ONNX runtime speeds up one text far more than a batch of 32, so its ratio is lower than
torch's although both of its throughputs are higher. The agent and this client share the
machine's cores, as a control plane and an agent on one node would; the raw model runs in
this process while the agent is idle, in the same rounds as the gRPC runs (see
:func:`measure`). Every call presents the agent token and names one tenant, as the
control plane's calls do.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import grpc
import yaml

from agent import config

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from protos.synapse.v1 import node_pb2, node_pb2_grpc  # noqa: E402
from synapse_common import call_metadata, minilm  # noqa: E402

TOKEN = "bench-agent-token"
METADATA = (*call_metadata.metadata(TOKEN), call_metadata.tenant("bench"))

WORDS = ("cache", "router", "kernel", "tensor", "gateway", "latency", "replica", "token",
         "scheduler", "prefix", "memory", "cluster", "request", "model", "driver", "queue")


def texts(prefix: str, n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 16], WORDS[(i // 16) % 16], WORDS[(i * 7) % 16]
        out.append(f"{prefix} {i}: how does the {a} interact with the {b} when the {c} is "
                   f"under load number {i * 13 % 97}?")
    return out


pct = common.nearest_rank


def load_model() -> Any:
    model = minilm.load()
    for i in range(10):  # first calls of each shape are slow (kernel selection)
        model.encode([f"warm up {i}"], show_progress_bar=False)
    model.encode(texts("warm up", 32), batch_size=32, show_progress_bar=False)
    return model


def raw_runs(model: Any, n: int, tag: str) -> dict[str, tuple[float, list[float]]]:
    """One round of the raw model in this process (the agent is idle meanwhile).

    ``encode`` runs on one worker thread, as in the agent: on a busy machine torch called
    from the main thread was measured an order of magnitude slower, which would flatter
    the agent.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        return worker.submit(_raw_runs, model, n, tag).result()


def _raw_runs(model: Any, n: int, tag: str) -> dict[str, tuple[float, list[float]]]:
    out = {}
    items, lat = texts(f"raw one {tag}", n), []
    start = time.perf_counter()
    for t in items:
        t0 = time.perf_counter()
        model.encode([t], show_progress_bar=False)
        lat.append(time.perf_counter() - t0)
    out["raw model, 1 text/call"] = (n / (time.perf_counter() - start), lat)
    items, lat = texts(f"raw batch {tag}", n), []
    start = time.perf_counter()
    for i in range(0, n, 32):
        t0 = time.perf_counter()
        model.encode(items[i:i + 32], batch_size=32, show_progress_bar=False)
        lat.append(time.perf_counter() - t0)
    out["raw model, 32 texts/call"] = (n / (time.perf_counter() - start), lat)
    return out


async def callers(stub: node_pb2_grpc.NodeStub, items: list[str], concurrency: int
                  ) -> tuple[float, list[float], int]:
    lat: list[float] = []
    cached = 0
    queue = list(reversed(items))

    async def worker() -> None:
        nonlocal cached
        while queue:
            text = queue.pop()
            t0 = time.perf_counter()
            resp = await stub.Embed(node_pb2.EmbedRequest(texts=[text]), timeout=60,
                                    metadata=METADATA)
            lat.append(time.perf_counter() - t0)
            cached += sum(resp.cached)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, lat, cached


async def grpc_runs(stub: node_pb2_grpc.NodeStub, n: int, tag: str
                    ) -> dict[str, tuple[float, list[float]]]:
    """One round of Node.Embed: uncached then cached, 1 and 32 callers."""
    out = {}
    one, many = texts(f"uncached one {tag}", n), texts(f"uncached many {tag}", n * 2)
    for name, items, conc in (("Node.Embed uncached, 1 caller", one, 1),
                              ("Node.Embed uncached, 32 callers", many, 32),
                              ("Node.Embed cached, 1 caller", one * 2, 1),
                              ("Node.Embed cached, 32 callers", many * 2, 32)):
        elapsed, lat, cached = await callers(stub, items, conc)
        expected = 0 if "uncached" in name else len(items)
        assert cached == expected, f"{name}: {cached} cache hits, expected {expected}"
        out[name] = (len(items) / elapsed, lat)
    return out


async def measure(model: Any, address: str, n: int, rounds: int
                  ) -> list[dict[str, float | str]]:
    """Raw model and Node.Embed alternate, ``rounds`` times, so a noisy neighbour on the
    shared machine hurts every row alike. Throughput is the median over rounds;
    percentiles come from every call."""
    runs: dict[str, tuple[list[float], list[float]]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        await stub.Embed(node_pb2.EmbedRequest(texts=["warm up"]), timeout=120,
                         metadata=METADATA)
        for r in range(rounds):
            results = raw_runs(model, n // 2, f"r{r}")
            results.update(await grpc_runs(stub, n, f"r{r}"))
            for name, (rate, lat) in results.items():
                rates, lats = runs.setdefault(name, ([], []))
                rates.append(rate)
                lats.extend(lat)
    return [{"name": name, "texts_per_s": statistics.median(rates),
             "p50_ms": pct(lats, 0.5) * 1000, "p99_ms": pct(lats, 0.99) * 1000}
            for name, (rates, lats) in runs.items()]


def start_agent(workdir: pathlib.Path, batch_wait_ms: float, runtime: str
                ) -> tuple[subprocess.Popen[bytes], str, pathlib.Path]:
    cfg = {"node_name": "bench", "control_plane": {"addresses": [], "token": TOKEN},
           "grpc": {"host": "127.0.0.1", "port": 0}, "metrics": {"host": "127.0.0.1", "port": 0},
           "telemetry": {"source": "fake"}, "supervisor": {"log_dir": str(workdir / "logs")},
           "embedder": {"kind": "minilm", "max_batch": 64, "batch_wait_ms": batch_wait_ms,
                        "runtime": runtime}}
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = workdir / "agent.log"
    synapse = pathlib.Path(sys.executable).parent / "synapse"
    proc = subprocess.Popen([str(synapse), "agent", "--config", str(path)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"agent node gRPC listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if found and "embedder minilm" in log.read_text():
            return proc, f"127.0.0.1:{found.group(1)}", log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the agent did not start:\n{log.read_text()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=128, help="texts per run (default 128)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    default_wait = config.EmbedderSettings().batch_wait_ms
    parser.add_argument("--batch-wait-ms", type=float, default=default_wait,
                        help=f"the agent's embedder.batch_wait_ms (default {default_wait:g}, "
                        "the agent's default)")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto",
                        help="the agent's embedder.runtime (default auto, the agent's default)")
    args = parser.parse_args()
    model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        proc, address, log = start_agent(pathlib.Path(tmp), args.batch_wait_ms, args.runtime)
        found = re.search(r"embedder minilm\S* loaded \(runtime (\w+)\)", log.read_text())
        runtime = found.group(1) if found else "unknown"
        try:
            rows = asyncio.run(measure(model, address, args.calls, args.rounds))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print(f"{'run':<36} {'texts/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for r in rows:
        print(f"{r['name']:<36} {r['texts_per_s']:>10.1f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f}")
    by = {r["name"]: r for r in rows}
    one = by["Node.Embed uncached, 1 caller"]
    many = by["Node.Embed uncached, 32 callers"]
    speedup = float(many["texts_per_s"]) / float(one["texts_per_s"])
    print(f"agent's embedder runtime: {runtime}")
    print(json.dumps({"bench": "embedding", "runtime": runtime, "batched_speedup": round(speedup, 2),
                      "cached_p50_ms": round(float(by["Node.Embed cached, 1 caller"]["p50_ms"]), 3),
                      "uncached_p50_ms": round(float(one["p50_ms"]), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
