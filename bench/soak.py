"""Benchmark: soak — mixed traffic for a long time, to catch leaks.

The fleet of :mod:`bench.chaos` (two control-plane replicas, Redis, a Milvus Lite server,
two agents with two simulators each, a TEI embedder), no faults. ``--workers`` clients
send a mix through both replicas: chat completions (non-streaming and streaming, a fifth
repeated so that the cache answers), text completions, embeddings, ``/v1/models``, and
requests that must fail (bad JSON, an unknown model, a wrong key) — error paths leak too.

RSS and open file descriptors of every process (control planes, agents, engines, TEI,
Milvus, Redis) are read after the warm-up (``--warmup``, default a fifth of the run, at
most 60 s: caches, pools and lazily loaded code settle there) and at the end, and sampled
every ``--sample-every`` seconds in between. Growth is end over post-warm-up; the issue's
bar is at most 10% for every Synapse process over a 10-minute run (``--duration 600``,
the default). Redis and Milvus are listed apart (``max_store_rss_growth_pct``): they
store the cache entries that unique prompts keep adding. Bounded caches inside Synapse
processes are made small (the agents' embedding cache: ``--embed-cache-entries``) so that
they fill during the warm-up; the run then measures steady state, not a cache filling. LiteLLM's proxy is reported to need a daily restart for memory growth; this is
the measurement that says whether Synapse does.

Run: ``python -m bench.soak [--duration 600] [--workers 6]``. Last line:
``{"bench": "soak", "duration_s": …, "requests": …, "errors": …, "max_rss_growth_pct": …,
"max_fd_growth": …, "processes": {name: {rss_start_mb, rss_end_mb, rss_growth_pct,
fds_start, fds_end}}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import sys
import tempfile
import time
from typing import Any

import aiohttp
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import chaos  # noqa: E402
from tests import fleet  # noqa: E402

# Data stores: their memory holds the cache entries written during the run (growth in
# proportion to data, bounded by TTL / maxmemory), so they are reported apart from the
# Synapse processes whose growth would be a leak.
STORES = {"redis", "milvus"}
EMBED_BODY = {"model": fleet.EMBED, "input": ["soak text one", "soak text two"]}


def processes(fl: chaos.ChaosFleet) -> dict[str, psutil.Process]:
    """Every process of the fleet by a stable name (engines by their backend name)."""
    out: dict[str, psutil.Process] = {}
    named = [(f"controlplane-{i}", p) for i, p in enumerate(fl.cps)]
    named += [(node, p) for node, p in fl.agents.items()]
    named += [("tei", fl.tei), ("milvus", fl.milvus), ("redis", fl.redis.proc)]
    for name, managed in named:
        if managed is not None and managed.popen.poll() is None:
            out[name] = psutil.Process(managed.pid)
    for engine in fl.engine_ports:
        pid = fl.engine_pid(engine)
        if pid:
            out[engine] = psutil.Process(pid)
    return out


def sample(procs: dict[str, psutil.Process]) -> dict[str, tuple[float, int]]:
    """(RSS in MB, open fds) per process; a process that vanished is left out."""
    out: dict[str, tuple[float, int]] = {}
    for name, proc in procs.items():
        try:
            out[name] = (proc.memory_info().rss / 2**20, proc.num_fds())
        except psutil.Error:
            continue
    return out


class Mix:
    def __init__(self, fl: chaos.ChaosFleet, seed: int = 11) -> None:
        self.fl = fl
        self.rng = random.Random(seed)
        self.requests = 0
        self.errors = 0           # unexpected outcomes (expected 4xx are not errors)
        self.statuses: dict[str, int] = {}

    async def one(self, session: aiohttp.ClientSession, load: chaos.Load) -> None:
        url = self.fl.urls[self.requests % len(self.fl.urls)]
        pick = self.rng.random()
        auth = {"Authorization": f"Bearer {fleet.TENANT_KEY}"}
        if pick < 0.55:
            out = await load.one(session, load.next_prompt(),
                                 stream=self.rng.random() < 0.3, fault="soak")
            load.outcomes.append(out)          # repeats of these make cache hits
            del load.outcomes[:-500]
            self._count("chat", 200 if out.ok else out.status or 599, expected=200)
            return
        if pick < 0.7:
            body: Any = {"model": "llama", "prompt": f"Soak {self.rng.randrange(10**6)}",
                         "max_tokens": 6}
            await self._post(session, url, "/v1/completions", body, auth, 200, "completions")
        elif pick < 0.85:
            await self._post(session, url, "/v1/embeddings", EMBED_BODY, auth, 200,
                             "embeddings")
        elif pick < 0.9:
            async with session.get(f"{url}/v1/models", headers=auth) as resp:
                await resp.read()
                self._count("models", resp.status, 200)
        elif pick < 0.94:
            async with session.post(f"{url}/v1/chat/completions", data=b"{not json",
                                    headers=auth) as resp:
                await resp.read()
                self._count("bad_json", resp.status, 400)
        elif pick < 0.97:
            await self._post(session, url, "/v1/chat/completions",
                             {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                             auth, 404, "unknown_model")
        else:
            await self._post(session, url, "/v1/chat/completions", {"model": "llama"},
                             {"Authorization": "Bearer sk-wrong"}, 401, "wrong_key")

    async def _post(self, session: aiohttp.ClientSession, url: str, path: str, body: Any,
                    headers: dict[str, str], expected: int, kind: str) -> None:
        async with session.post(f"{url}{path}", json=body, headers=headers) as resp:
            await resp.read()
            self._count(kind, resp.status, expected)

    def _count(self, kind: str, status: int, expected: int) -> None:
        self.requests += 1
        self.errors += status != expected
        key = f"{kind}:{status}"
        self.statuses[key] = self.statuses.get(key, 0) + 1


async def soak(fl: chaos.ChaosFleet, duration: float, warmup: float, workers: int,
               every: float) -> dict[str, Any]:
    mix, load = Mix(fl), chaos.Load(fl, workers)
    stop = time.monotonic() + warmup + duration
    samples: list[dict[str, tuple[float, int]]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while time.monotonic() < stop:
                try:
                    await mix.one(session, load)
                except (aiohttp.ClientError, TimeoutError):
                    mix._count("transport", 599, 200)

        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        await asyncio.sleep(warmup)
        procs = processes(fl)
        first = sample(procs)
        while time.monotonic() < stop:
            await asyncio.sleep(min(every, max(0.0, stop - time.monotonic())))
            samples.append(sample(procs))
        await asyncio.gather(*tasks)
    return report(first, samples, mix, duration)


def report(first: dict[str, tuple[float, int]], samples: list[dict[str, tuple[float, int]]],
           mix: Mix, duration: float) -> dict[str, Any]:
    last = samples[-1] if samples else first
    per: dict[str, Any] = {}
    for name, (rss0, fds0) in sorted(first.items()):
        if name not in last:
            per[name] = {"rss_start_mb": round(rss0, 1), "gone": True}
            continue
        rss1, fds1 = last[name]
        peak = max([s[name][0] for s in samples if name in s] or [rss1])
        per[name] = {"rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
                     "rss_peak_mb": round(peak, 1),
                     "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1),
                     "fds_start": fds0, "fds_end": fds1}
    ours = {n: p for n, p in per.items() if n not in STORES}
    growth = [p["rss_growth_pct"] for p in ours.values() if "rss_growth_pct" in p]
    fd_growth = [p["fds_end"] - p["fds_start"] for p in ours.values() if "fds_end" in p]
    stores = [p["rss_growth_pct"] for n, p in per.items() if n in STORES and "fds_end" in p]
    return {"bench": "soak", "duration_s": duration, "requests": mix.requests,
            "errors": mix.errors, "max_rss_growth_pct": max(growth, default=0.0),
            "max_store_rss_growth_pct": max(stores, default=0.0),
            "max_fd_growth": max(fd_growth, default=0), "statuses": mix.statuses,
            "processes": per}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'process':<16}{'rss start MB':>14}{'rss end MB':>12}{'peak MB':>10}"
          f"{'growth %':>10}{'fds start':>11}{'fds end':>9}")
    for name, p in result["processes"].items():
        if p.get("gone"):
            print(f"{name:<16}{p['rss_start_mb']:>14}   (exited during the run)")
            continue
        print(f"{name:<16}{p['rss_start_mb']:>14}{p['rss_end_mb']:>12}{p['rss_peak_mb']:>10}"
              f"{p['rss_growth_pct']:>10}{p['fds_start']:>11}{p['fds_end']:>9}")
    print(f"{result['requests']} requests in {result['duration_s']:.0f} s after warm-up, "
          f"{result['errors']} unexpected outcomes; statuses {result['statuses']}")
    print(f"largest RSS growth: Synapse processes {result['max_rss_growth_pct']}%, "
          f"stores (cache data) {result['max_store_rss_growth_pct']}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of measured traffic after the warm-up")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the first sample (default: duration/5, <= 60)")
    parser.add_argument("--workers", type=int, default=6, help="concurrent clients")
    parser.add_argument("--sample-every", type=float, default=10.0, help="sampling period")
    parser.add_argument("--embed-cache-entries", type=int, default=2000,
                        help="agents' embedding-cache bound (fills during the warm-up)")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)
    with tempfile.TemporaryDirectory(prefix="synapse-soak-") as tmp, \
            chaos.chaos_fleet(pathlib.Path(tmp), agent_embedder={
                "cache_max_entries": args.embed_cache_entries}) as fl:
        result = asyncio.run(soak(fl, args.duration, warmup, args.workers,
                                  args.sample_every))
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
