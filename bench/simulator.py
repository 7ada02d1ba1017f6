"""Benchmark: the engine simulator's own throughput at ``--time-scale 0``.

Starts ``synapse simulator`` as a subprocess pinned to one core (``taskset -c 0`` when
available), drives it with 32 concurrent non-streaming chat clients (one aiohttp session,
keep-alive) for a fixed time after a warm-up, and reports requests/s, latency
percentiles and the simulator's peak RSS (``VmHWM`` from ``/proc``). The target is at
least 2,000 requests/s so the simulator is never the bottleneck of a gateway benchmark.

The "baseline" row is the same simulator answering ``GET /health`` (no parsing, no
scheduling, no text): the ceiling of the HTTP stack on that core, so the cost of the
OpenAI path is the gap between the two rows.

Run: ``python -m bench.simulator [--seconds 10] [--concurrency 32] [--max-tokens 16]``.
The last line printed is one JSON object:
``{"bench": "simulator", "rps": …, "peak_rss_mb": …, …}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import time

import aiohttp

LISTEN = re.compile(r"simulator listening on (http://\S+)")
BODY_TEMPLATE = {
    "model": "bench-model",
    "messages": [{"role": "system", "content": "You are a concise assistant."},
                 {"role": "user", "content": "Summarise the benefits of caching, item {i}."}],
}


def start_simulator() -> tuple[subprocess.Popen[str], str]:
    exe = pathlib.Path(sys.executable).parent / "synapse"
    argv = [str(exe), "simulator", "--port", "0", "--time-scale", "0",
            "--served-model-name", "bench-model", "--log-level", "warning"]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = LISTEN.search(line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit("the simulator did not start (no 'simulator listening on' line)")


def peak_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, method: str, body_for: object, seconds: float, concurrency: int,
                warmup: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + warmup + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal errors
        i = 0
        while time.monotonic() < stop_at:
            payload = body_for(k, i) if callable(body_for) else None
            t0 = time.perf_counter()
            async with session.request(method, url, json=payload) as resp:
                await resp.read()
                ok = resp.status == 200
            if measuring:
                latencies.append(time.perf_counter() - t0)
                errors += 0 if ok else 1
            i += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(session, k)) for k in range(concurrency)]
        await asyncio.sleep(warmup)
        measuring = True
        started = time.monotonic()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "errors": errors, "rps": n / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if n else float("nan"),
            "p99_ms": 1000 * latencies[int(n * 0.99) - 1] if n else float("nan")}


def chat_body(max_tokens: int) -> object:
    def body(k: int, i: int) -> dict[str, object]:
        messages = [dict(m) for m in BODY_TEMPLATE["messages"]]  # type: ignore[attr-defined]
        messages[1]["content"] = messages[1]["content"].format(i=k * 100_000 + i)
        return {**BODY_TEMPLATE, "messages": messages, "max_tokens": max_tokens}
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    proc, base = start_simulator()
    try:
        health = asyncio.run(drive(base + "/health", "GET", None, args.seconds / 2,
                                   args.concurrency, args.warmup))
        chat = asyncio.run(drive(base + "/v1/chat/completions", "POST",
                                 chat_body(args.max_tokens), args.seconds, args.concurrency,
                                 args.warmup))
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    pinned = "taskset -c 0" if shutil.which("taskset") else "not pinned"
    print(f"engine simulator, --time-scale 0, {args.concurrency} clients, {pinned}, "
          f"cpus={os.cpu_count()}")
    print(f"{'case':<34}{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in (("baseline: GET /health", health),
                    (f"chat, non-streaming, {args.max_tokens} tokens", chat)):
        print(f"{name:<34}{r['requests']:>10.0f}{r['errors']:>8.0f}{r['rps']:>10.0f}"
              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}")
    print(f"simulator peak RSS: {rss:.1f} MB")
    print(json.dumps({"bench": "simulator", "rps": round(chat["rps"], 1),
                      "peak_rss_mb": round(rss, 1), "baseline_health_rps":
                      round(health["rps"], 1), "concurrency": args.concurrency,
                      "max_tokens": args.max_tokens, "errors": int(chat["errors"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
