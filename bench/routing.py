"""Benchmark: routing policies on prefix-heavy and unique workloads.

One process tree: a ``synapse agent`` supervising 4 simulators (``realistic`` profile:
Llama-3.1-8B on an H100, time-scaled by ``--time-scale``) and three ``synapse
controlplane`` replicas, one per policy (``predicted_ttft``, ``round_robin``,
``least_loaded``), all fed by the same agent. Each workload is run against each replica
in turn, with fresh random texts per run so no run inherits another's prefix cache.

Workloads (open loop, Poisson arrivals, streaming requests with ``ignore_eos``):

* A: 40 groups sharing a 2,000-token context, 5 users each, one short question each;
* B: 80 multi-turn chats of 8 rounds over a shared 500-token system prompt (each round
  is sent when the previous answer is complete and carries the whole history);
* C: unique prompts of 200-2,000 tokens;
* H (heterogeneous fleet): a second tree with two simulators, one twice as slow per token
  (prefill and decode), and two ``predicted_ttft`` replicas: costs learned from the
  answers (the default) and today's constant costs (``router.learn_costs: false``);
  unique prompts as in C.

The rates are set so that round robin is overloaded (its p90 TTFT above 1 s). TTFT is
the time to the first content token; times are reported in simulated seconds (measured
/ time scale). Throughput is output tokens / (last answer - first request); the prefix
hit ratio is the engines' cached prompt tokens / prompt tokens, from each answer's usage.

``--workers 1,2`` runs the whole bench once per count, each control plane a pod of that
many serving processes (``http.workers``; with a redis-server, which they need), so a
router whose locality split across the processes would show here as worse ratios; the
JSON then gains ``by_workers`` (each count's figures, keyed by the count).

Run: ``python -m bench.routing [--time-scale 1]``. Last line: ``{"bench": "routing",
"A": {"p90_ttft_ratio_vs_round_robin": …, "throughput_ratio_vs_round_robin": …,
"prefix_hit_ratio": …}, "B": {…}, "C": {"p90_ttft_ratio_vs_least_loaded": …},
"H": {"p90_ttft_ratio_learned_vs_constant": …}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from typing import Any

import aiohttp
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common, scrape  # noqa: E402
from bench.gateway import Tree, start_redis  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
KEY = "bench-routing-key-0123"
ADMIN = "bench-routing-admin-0123"
POLICIES = ("predicted_ttft", "round_robin", "least_loaded")
# Words of at most four letters: exactly one token each for the shared tokenizer.
WORDS = ("tok node kv gpu load rate busy idle fast slow warm cold hash key map set list tree "
         "root leaf path hop ring peer pool lane slot page disk core bus link port host "
         "test data plan step wait turn").split()
BIN = pathlib.Path(sys.executable).parent


def text(rng: random.Random, n_tokens: int) -> str:
    words: list[str] = []
    while len(words) < n_tokens:  # every word here is one token of the shared tokenizer
        words.append(rng.choice(WORDS))
    return " ".join(words)


@dataclasses.dataclass
class Result:
    ttft: float            # simulated seconds
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    content: str
    start: float
    end: float
    backend: str


async def send(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
               max_tokens: int, scale: float, model: str = MODEL) -> Result:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.text())[:200]}")
        backend = resp.headers.get("x-synapse-backend", "")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(piece)
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    return Result((ttft if ttft is not None else end - t0) / scale,
                  int(usage.get("completion_tokens", 0)), int(usage.get("prompt_tokens", 0)),
                  int(details.get("cached_tokens", 0)), "".join(parts), t0, end, backend)


async def poisson(rng: random.Random, rate: float, scale: float) -> None:
    await asyncio.sleep(rng.expovariate(rate) * scale)


async def workload_a(session: aiohttp.ClientSession, url: str, rng: random.Random,
                     scale: float, rate: float) -> list[Result]:
    contexts = [text(rng, 2000) for _ in range(40)]
    arrivals = [(g, u) for g in range(40) for u in range(5)]
    rng.shuffle(arrivals)
    tasks = []
    for g, u in arrivals:
        question = f"user {u}: " + text(rng, 12) + "?"
        messages = [{"role": "system", "content": contexts[g]},
                    {"role": "user", "content": question}]
        tasks.append(asyncio.create_task(send(session, url, messages, 32, scale)))
        await poisson(rng, rate, scale)
    return list(await asyncio.gather(*tasks))


async def workload_b(session: aiohttp.ClientSession, url: str, rng: random.Random,
                     scale: float, rate: float) -> list[Result]:
    system = text(rng, 500)

    async def chat(k: int) -> list[Result]:
        messages = [{"role": "system", "content": system}]
        out = []
        for _ in range(8):
            messages.append({"role": "user", "content": text(rng, 400)})
            r = await send(session, url, messages, 24, scale)
            messages.append({"role": "assistant", "content": r.content})
            out.append(r)
        return out

    tasks = []
    for k in range(80):
        tasks.append(asyncio.create_task(chat(k)))
        await poisson(rng, rate, scale)
    return [r for rs in await asyncio.gather(*tasks) for r in rs]


async def workload_c(session: aiohttp.ClientSession, url: str, rng: random.Random,
                     scale: float, rate: float) -> list[Result]:
    tasks = []
    for i in range(240):
        messages = [{"role": "user", "content": f"{i} " + text(rng, rng.randint(200, 2000))}]
        tasks.append(asyncio.create_task(send(session, url, messages, 32, scale)))
        await poisson(rng, rate, scale)
    return list(await asyncio.gather(*tasks))


WORKLOADS = {"A": (workload_a, 32.0), "B": (workload_b, 20.0), "C": (workload_c, 28.0),
             "H": (workload_c, 8.0)}


def summarise(results: list[Result], scale: float) -> dict[str, float]:
    ttfts = sorted(r.ttft for r in results)

    def pct(q: float) -> float:
        return common.nearest_rank(ttfts, q)

    span = (max(r.end for r in results) - min(r.start for r in results)) / scale
    prompt = sum(r.prompt_tokens for r in results)
    per_backend = [sum(1 for r in results if r.backend == b)
                   for b in sorted({r.backend for r in results})]
    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "busiest_share": max(per_backend) / len(results),
            "tokens_per_s": sum(r.output_tokens for r in results) / span,
            "prefix_hit_ratio": sum(r.cached_tokens for r in results) / prompt if prompt else 0,
            "requests": len(results)}


SLOW = ["--prefill-s-per-token", "0.00024", "--decode-base-s", "0.024",
        "--decode-per-seq-s", "0.0003"]   # twice the default profile's per-token costs
HETEROGENEOUS: dict[str, dict[str, object]] = {
                 "learned": {"policy": "predicted_ttft"},
                 "constant": {"policy": "predicted_ttft", "learn_costs": False}}


def start_fleet(tree: Tree, workdir: pathlib.Path, scale: float,
                replicas: dict[str, dict[str, object]],
                sims: list[list[str]], workers: int = 1) -> dict[str, str]:
    """One control plane per entry of ``replicas`` (its ``router`` section), all fed by one
    agent supervising one simulator per entry of ``sims`` (its extra arguments); with
    ``workers`` > 1 each is a pod of that many processes, with a Redis database of its own."""
    grpc_ports = {name: free_port() for name in replicas}
    redis = start_redis(tree).removesuffix("/0") if workers > 1 else ""
    urls = {}
    for i, (name, router) in enumerate(replicas.items()):
        http = free_port()
        cfg = workdir / f"cp-{name}.yaml"
        pod: dict[str, object] = ({"redis": {"url": f"{redis}/{i}"}} if workers > 1 else {})
        cfg.write_text(yaml.safe_dump({
            **pod, "replica_id": name,
            "http": {"host": "127.0.0.1", "port": http,
                     **({"workers": workers} if workers > 1 else {})},
            "grpc": {"host": "127.0.0.1", "port": grpc_ports[name]},
            "auth": {"admin_key": ADMIN, "tenants": [{"name": "bench", "keys": [KEY]}],
                     "allow_unauthenticated_agents": True},
            "router": router, "cache": {"enabled": False},
            "registry": {"node_down_after_s": 10}, "logging": {"level": "warning"}}))
        tree.start(f"cp-{name}", [str(BIN / "synapse"), "controlplane", "--config", str(cfg)],
                   f"http://127.0.0.1:{http}/health")
        urls[name] = f"http://127.0.0.1:{http}"
    backends = [{"name": f"sim-{i}", "engine": "simulator", "model": MODEL,
                 "served_model_names": [MODEL], "port": free_port(),
                 "extra_args": ["--time-scale", str(scale), "--log-level", "warning", *extra]}
                for i, extra in enumerate(sims)]
    agent = workdir / "agent.yaml"
    agent.write_text(yaml.safe_dump({
        "node_name": "bench", "control_plane": {
            "addresses": [f"127.0.0.1:{p}" for p in grpc_ports.values()],
            "report_interval_s": 0.5},
        "grpc": {"host": "127.0.0.1", "port": 0}, "metrics": {"host": "127.0.0.1", "port": 0},
        "telemetry": {"source": "fake"},
        "supervisor": {"log_dir": str(workdir / "engines"), "scrape_interval_s": 0.5,
                       "simulator_command": [str(BIN / "synapse"), "simulator"]},
        "backends": backends}))
    tree.start("agent", [str(BIN / "synapse"), "agent", "--config", str(agent)],
               f"{next(iter(urls.values()))}/health")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(_backends_ready(u) == len(sims) for u in urls.values()):
            return urls
        time.sleep(0.5)
    raise SystemExit(f"the {len(sims)} simulators did not become ready behind every "
                     "control plane")


def route_decisions(url: str) -> str:
    """The control plane's synapse_route_decisions_total lines (why it chose what)."""
    return "\n".join("    " + line for line in scrape.metrics_page(url, ADMIN, 5).splitlines()
                     if line.startswith("synapse_route_decisions_total"))


def _backends_ready(url: str) -> int:
    req = urllib.request.Request(f"{url}/api/v1/stats",
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return int(json.loads(resp.read())["backends_ready"])
    except OSError:
        return 0


def header() -> None:
    print(f"{'workload':<9}{'policy':<16}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}"
          f"{'out tok/s':>11}{'prefix hit':>11}{'busiest':>9}", flush=True)


async def run_workloads(args: argparse.Namespace, urls: dict[str, str], names: str,
                        table: dict[str, dict[str, dict[str, float]]]) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for name in names:
        fn, rate = WORKLOADS[name]
        table[name] = {}
        for i, policy in enumerate(urls):
            rng = random.Random(f"{args.seed}-{name}-{i}")
            async with aiohttp.ClientSession(
                    headers=headers, timeout=aiohttp.ClientTimeout(total=600),
                    connector=aiohttp.TCPConnector(limit=0)) as session:
                results = await fn(session, f"{urls[policy]}/v1/chat/completions", rng,
                                   args.time_scale, rate * args.load)
            row = table[name][policy] = summarise(results, args.time_scale)
            if args.show_routes:
                print(await asyncio.to_thread(route_decisions, urls[policy]))
            print(f"{name:<9}{policy:<16}{row['p50']:>8.2f}{row['p90']:>8.2f}"
                  f"{row['p99']:>8.2f}{row['tokens_per_s']:>11.0f}"
                  f"{row['prefix_hit_ratio']:>11.2f}{row['busiest_share']:>9.2f}", flush=True)


async def run(args: argparse.Namespace) -> dict[str, object]:
    counts = [int(n) for n in str(args.workers).split(",")]
    results = {}
    for n in counts:
        if len(counts) > 1:
            print(f"-- {n} serving process{'es' if n > 1 else ''} per control plane",
                  flush=True)
        results[n] = await run_once(args, n)
    out = results[counts[0]]
    if len(counts) > 1:
        out["by_workers"] = {str(n): {k: v for k, v in r.items() if k != "bench"}
                             for n, r in results.items()}
    return out


async def run_once(args: argparse.Namespace, workers: int) -> dict[str, object]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    header()
    fleets: list[tuple[str, dict[str, dict[str, object]], list[list[str]]]] = [
        ("".join(w for w in args.workloads if w != "H"),
         {p: {"policy": p} for p in POLICIES}, [[] for _ in range(4)]),
        ("H" if "H" in args.workloads else "", HETEROGENEOUS, [[], SLOW])]
    for names, replicas, sims in fleets:
        if not names:
            continue
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-routing-"))
        tree = Tree(workdir)
        try:
            urls = start_fleet(tree, workdir, args.time_scale, replicas, sims, workers)
            await run_workloads(args, urls, names, table)
        finally:
            tree.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    return result_json(table)


def result_json(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, object]:
    out: dict[str, object] = {"bench": "routing"}
    for name in ("A", "B"):
        if name in table:
            p, rr = table[name]["predicted_ttft"], table[name]["round_robin"]
            out[name] = {"p90_ttft_ratio_vs_round_robin": round(p["p90"] / rr["p90"], 3),
                         "throughput_ratio_vs_round_robin":
                             round(p["tokens_per_s"] / rr["tokens_per_s"], 3),
                         "prefix_hit_ratio": round(p["prefix_hit_ratio"], 3),
                         "round_robin_p90_ttft_s": round(rr["p90"], 3)}
    if "C" in table:
        p, ll = table["C"]["predicted_ttft"], table["C"]["least_loaded"]
        out["C"] = {"p90_ttft_ratio_vs_least_loaded": round(p["p90"] / ll["p90"], 3),
                    "round_robin_p90_ttft_s": round(table["C"]["round_robin"]["p90"], 3)}
    if "H" in table:
        learned, constant = table["H"]["learned"], table["H"]["constant"]
        out["H"] = {"p90_ttft_ratio_learned_vs_constant":
                        round(learned["p90"] / constant["p90"], 3),
                    "p50_ttft_ratio_learned_vs_constant":
                        round(learned["p50"] / constant["p50"], 3),
                    "learned_p90_ttft_s": round(learned["p90"], 3),
                    "constant_p90_ttft_s": round(constant["p90"], 3),
                    "learned_busiest_share": round(learned["busiest_share"], 3),
                    "constant_busiest_share": round(constant["busiest_share"], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulator clock (smaller = faster runs, more CPU noise)")
    parser.add_argument("--load", type=float, default=1.0, help="multiplies every rate")
    parser.add_argument("--workloads", default="ABCH")
    parser.add_argument("--seed", default="7")
    parser.add_argument("--show-routes", action="store_true",
                        help="print each control plane's route decisions after a run")
    parser.add_argument("--workers", default="1",
                        help="serving processes per control plane (http.workers); a comma "
                        "list (1,2) runs the bench once per count")
    args = parser.parse_args()
    result = common.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
