"""Benchmark: what the control plane adds on each path of the API surface (issue 20).

Run: ``python -m bench.api_surface [--requests N] [--rounds R] [--upload-mib M]``.
Prints a table, then as the last line one JSON object: ``{"bench": "api_surface", …}``.

Against simulators at time scale 0 (instant answers: what is left is HTTP and Synapse),
one request at a time, each path measured in interleaved rounds beside its baseline, the
same request sent to the engine directly:

* ``p50_ms`` through Synapse and direct, and Synapse's CPU milliseconds per request
  (psutil, the control plane process; a figure a shared machine moves less than latency);
* ``/v1/messages`` on an engine that serves it (native) and on one that speaks chat
  completions only (translated: its baseline is the chat request sent directly);
* an upload of ``--upload-mib`` MiB (chunked multipart) to ``/v1/audio/transcriptions``:
  seconds through Synapse and direct, and how much the control plane's peak resident
  memory (VmHWM) grew during it — the upload is streamed, never held.

Every figure is measured on the simulator, not on a real engine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import aiohttp
import psutil
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.gateway import BIN, Tree  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402
from tests import uploads  # noqa: E402

KEY = "sk-bench-api-surface-0123456789"
CHAT, OLD, RANKER, WHISPER, TTS = "chat-model", "old-model", "ranker", "whisper", "tts"
MIB = 1024 * 1024
ENGINES = {  # name: (model, tasks, simulator flags)
    "llm": (CHAT, ["generate", "responses", "messages", "tokenize"], []),
    "old": (OLD, ["generate"], ["--task", "generate"]),
    "ranker": (RANKER, ["rerank", "score", "tokenize"],
               ["--task", "rerank", "--task", "score", "--task", "tokenize"]),
    "whisper": (WHISPER, ["transcription"], ["--task", "transcription", "--max-audio-mb",
                                             "1024"]),
    "tts": (TTS, ["speech"], ["--engine", "speech"]),
}
SAY = [{"role": "user", "content": "Summarise the benefits of caching in one line."}]
# path label: (engine, path through Synapse, direct path, body)
CASES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "chat": ("llm", "/v1/chat/completions", "/v1/chat/completions",
             {"model": CHAT, "max_tokens": 16, "messages": SAY}),
    "responses": ("llm", "/v1/responses", "/v1/responses",
                  {"model": CHAT, "max_output_tokens": 16, "input": SAY[0]["content"]}),
    "messages native": ("llm", "/v1/messages", "/v1/messages",
                        {"model": CHAT, "max_tokens": 16, "messages": SAY}),
    "messages translated": ("old", "/v1/messages", "/v1/chat/completions",
                            {"model": OLD, "max_tokens": 16, "messages": SAY}),
    "rerank": ("ranker", "/v1/rerank", "/v1/rerank",
               {"model": RANKER, "query": "caching", "documents": ["a cache", "a dog"]}),
    "tokenize": ("ranker", "/tokenize", "/tokenize", {"model": RANKER, "prompt": "caching"}),
    "speech": ("tts", "/v1/audio/speech", "/v1/audio/speech",
               {"model": TTS, "input": "caching helps", "voice": "alloy"}),
}


def _start(tree: Tree, work: pathlib.Path) -> tuple[str, dict[str, str], int]:
    urls: dict[str, str] = {}
    for name, (model, _, flags) in ENGINES.items():
        port = free_port()
        tree.start(name, [str(BIN / "synapse"), "simulator", "--port", str(port), "--model", model,
                          "--time-scale", "0", *flags],
                   ready=f"http://127.0.0.1:{port}/health")
        urls[name] = f"http://127.0.0.1:{port}"
    http = free_port()
    cfg = {"http": {"host": "127.0.0.1", "port": http, "max_audio_bytes": 2048 * MIB},
           "grpc": {"host": "127.0.0.1", "port": free_port()}, "data_dir": str(work / "cp"),
           "auth": {"tenants": [{"name": "bench", "keys": [KEY]}]},
           "models": [{"name": m} for m, _, _ in ENGINES.values()],
           "upstreams": [{"name": n, "url": urls[n], "models": [m], "tasks": tasks}
                         for n, (m, tasks, _) in ENGINES.items()],
           "cache": {"enabled": False}, "logging": {"level": "warning"}}
    path = work / "cp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    base = f"http://127.0.0.1:{http}"
    cp = tree.start("cp", [str(BIN / "synapse"), "controlplane", "--config", str(path)],
                    ready=f"{base}/ready")
    return base, urls, cp.pid


async def _timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = json.dumps(body).encode()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        async with session.post(url, data=data, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        out.append((time.perf_counter() - start) * 1000)
    return out


async def paths(base: str, urls: dict[str, str], pid: int, n: int,
                rounds: int) -> dict[str, dict[str, float]]:
    proc = psutil.Process(pid)
    lat: dict[str, dict[str, list[float]]] = {k: {"synapse": [], "direct": [], "cpu": []}
                                              for k in CASES}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(rounds):
            for label, (engine, path, direct, body) in CASES.items():
                before = proc.cpu_times()
                lat[label]["synapse"] += await _timed(session, base + path, body, n)
                after = proc.cpu_times()
                used = (after.user - before.user) + (after.system - before.system)
                lat[label]["cpu"].append(used / n * 1000)
                lat[label]["direct"] += await _timed(session, urls[engine] + direct, body, n)
    return {k: {"synapse_p50_ms": round(common.nearest_rank(v["synapse"], 0.5), 3),
                "direct_p50_ms": round(common.nearest_rank(v["direct"], 0.5), 3),
                "cpu_ms_per_request": round(statistics.median(v["cpu"]), 3)}
            for k, v in lat.items()}


async def _upload(url: str, size: int) -> float:
    headers, body = uploads.audio_form(WHISPER, size, KEY)
    start = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body, headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"upload: {resp.status} {text}")
    return time.perf_counter() - start


async def upload(base: str, urls: dict[str, str], pid: int, mib: int) -> dict[str, float]:
    before = uploads.proc_kib(pid, "VmHWM")
    through = await _upload(base + "/v1/audio/transcriptions", mib * MIB)
    grew = uploads.proc_kib(pid, "VmHWM") - before
    direct = await _upload(urls["whisper"] + "/v1/audio/transcriptions", mib * MIB)
    return {"mib": mib, "synapse_s": round(through, 3), "direct_s": round(direct, 3),
            "cp_peak_rss_growth_mib": round(grew / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-mib", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree(pathlib.Path(tmp))
        try:
            base, urls, pid = _start(tree, pathlib.Path(tmp))
            by_path = common.run(paths(base, urls, pid, args.requests, args.rounds))
            up = common.run(upload(base, urls, pid, args.upload_mib))
        finally:
            tree.stop()
    print(f"{'path':22} {'synapse p50 ms':>15} {'direct p50 ms':>14} {'cp cpu ms/req':>14}")
    for label, r in by_path.items():
        print(f"{label:22} {r['synapse_p50_ms']:>15} {r['direct_p50_ms']:>14} "
              f"{r['cpu_ms_per_request']:>14}")
    print(f"upload {up['mib']} MiB: {up['synapse_s']} s through Synapse, {up['direct_s']} s "
          f"direct; control plane peak RSS grew {up['cp_peak_rss_growth_mib']} MiB")
    print(json.dumps({"bench": "api_surface", "paths": by_path, "upload": up}))


if __name__ == "__main__":
    main()
