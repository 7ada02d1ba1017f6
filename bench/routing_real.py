"""Benchmark: routing policies in front of two real vLLM engines (SmolLM2-135M, one CPU
core each), from the engine tier (``make engines``).

One process tree: a ``synapse agent`` supervising two real vLLMs (``engine: vllm``,
``VLLM_CPU_OMP_THREADS_BIND`` 0 and 1, ``VLLM_CPU_KVCACHE_SPACE=1``, of which each uses
``--kv-tokens`` (default 12,288: 96 blocks of 128; 1 GiB would hold about 46,600, and a
workload scaled to that takes hours on two CPU cores); the agent reports their block size
and KV capacity from ``vllm:cache_config_info``), four ``synapse controlplane`` replicas
fed by that agent — ``predicted_ttft`` with the model's own tokenizer
(``models[].tokenizer``), ``predicted_ttft`` with the shared approximation
(``predicted_approx``), ``round_robin``, ``least_loaded``; and ``predicted_pod``, the
first as a pod of two serving processes (``http.workers``), when named in ``--policies``
— and the Rust ``vllm-router`` in ``cache_aware`` mode (``make bench-peers``) in front
of the same two engines. Each policy runs each workload in turn,
on fresh random texts (no run inherits another's prefix cache), closed loop with
``--concurrency`` requests in flight, streamed, ``ignore_eos``.

Workloads, scaled to what two CPU engines serve in a few minutes:

* A (shared long contexts under KV pressure): contexts of ``--context-tokens`` tokens
  holding together 1.6 times one engine's KV (more than one engine holds, 0.8 of each
  engine's when split between the two), each asked
  ``--rounds`` questions, round by round (every context once per round: the reuse
  distance of a context is all the others, so an engine that sees every context evicts
  each before its next question, LRU; an engine that sees half of them keeps them);
* C (unique prompts): ``--unique`` prompts of 200-1,500 tokens.

Printed per workload and policy: TTFT p50/p90 (to the first content token), output
tokens/s over the wall time, the engines' own prefix-cache hit ratio (the delta of
``vllm:prefix_cache_hits_total / queries_total`` over the run), the busiest engine's share
of the requests (from the engines' ``vllm:request_success_total``, so it holds for the
vllm-router too, which names no backend) and, for Synapse's
predicted policies, the router's predicted ÷ engine-reported cached tokens (the delta of
``synapse_route_cached_tokens_total``). Last line: ``{"bench": "routing_real", "engine":
"vllm", "A": {"p90_ttft_ratio_vs_round_robin": …, "p50_ttft_ratio_vs_round_robin": …,
"p90_ttft_ratio_vs_vllm_router": …, "engine_prefix_hit_ratio": …}, "C":
{"p90_ttft_ratio_vs_least_loaded": …}, "cached_tokens_agreement": …,
"cached_tokens_agreement_approximation": …}``.

Run: ``python -m bench.routing_real`` (its run time on this project's machines: README,
"Benchmarks").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.gateway import Tree, start_redis  # noqa: E402
from bench.routing import ADMIN, KEY, Result, _backends_ready, send  # noqa: E402
from bench.scrape import engine_requests, engine_totals, learned, route_totals  # noqa: E402
from synapse_common import engines  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
VLLM_ROUTER = REPO / ".bench-venvs" / "vllm-router" / "bin" / "vllm-router"
REPLICAS: dict[str, dict[str, Any]] = {
    "predicted_ttft": {"policy": "predicted_ttft"},
    "predicted_approx": {"policy": "predicted_ttft"},
    "round_robin": {"policy": "round_robin"},
    "least_loaded": {"policy": "least_loaded"},
    # predicted_ttft as a pod of serving processes (http.workers: 2, with a Redis):
    # only when named in --policies
    "predicted_pod": {"policy": "predicted_ttft"},
}
POD_WORKERS = 2
START_S = 600.0
# --enable-scale-out: vllm-router's cache_aware policy asks the engine to render each chat
# prompt (POST /v1/chat/completions/render), which vLLM refuses (403) without it.
VLLM_FLAGS = ["--dtype", "bfloat16", "--enforce-eager", "--enable-prefix-caching",
              "--enable-prompt-tokens-details", "--enable-scale-out"]


# Prose-like text: words of every length, numbers, punctuation, sentences (the
# approximation counts about four characters per token; real BPE differs on such text).
VOCAB = ("the of and to in is that for on with as by at from this an be are or it not we "
         "which can your about cache engine router prefix tokens memory latency request "
         "response stream replica cluster node policy model prompt context budget quarterly "
         "revenue infrastructure throughput scheduling allocation bandwidth transformer "
         "attention quantization deployment observability heterogeneous accelerator "
         "utilization eviction inference gateway kubernetes configuration availability "
         "reliability capacity forecast contractual obligations tenant invoice").split()


TOKENS_PER_WORD = 1.37  # SmolLM2's tokenizer on this prose


def words(rng: random.Random, n_tokens: int) -> str:
    """Prose of about ``n_tokens`` tokens of SmolLM2's tokenizer."""
    n = round(n_tokens / TOKENS_PER_WORD)
    out: list[str] = []
    while len(out) < n:
        sentence = [rng.choice(VOCAB) for _ in range(rng.randint(6, 16))]
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(2, 99_999)))
        if rng.random() < 0.3:
            i = rng.randrange(1, len(sentence))
            sentence[i - 1] += ","
        out.append(" ".join(sentence).capitalize() + rng.choice((".", ".", ".", ";", "?")))
        out.extend([""] * (len(sentence) - 1))  # count words, keep sentences whole
    return " ".join(w for w in out if w)


def workload_a(rng: random.Random, contexts: int, rounds: int, tokens: int,
               ) -> list[list[dict[str, str]]]:
    texts = [f"Document {c} ({rng.random():.6f}). " + words(rng, tokens) for c in range(contexts)]
    order = list(range(contexts))
    out = []
    for r in range(rounds):
        rng.shuffle(order)
        out += [[{"role": "system", "content": texts[c]},
                 {"role": "user", "content": f"Question {r}: {words(rng, 10)}?"}] for c in order]
    return out


def workload_c(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{i} {rng.random():.6f} "
              + words(rng, rng.randint(200, 1500))}] for i in range(n)]


async def closed_loop(url: str, model: str, prompts: Sequence[list[dict[str, str]]],
                      concurrency: int, max_tokens: int,
                      headers: dict[str, str]) -> tuple[list[Result], float]:
    queue = list(reversed(prompts))
    results: list[Result] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            results.append(await send(session, url, queue.pop(), max_tokens, 1.0, model))

    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=900),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results, time.perf_counter() - started


def summarise(results: list[Result], wall: float, engine_delta: tuple[float, float],
              route_delta: tuple[float, float], served: Sequence[float]) -> dict[str, float]:
    """One policy's row; ``served`` is how many requests each engine finished during it
    (read from the engines, so it holds for a router that names no backend)."""
    ttfts = sorted(r.ttft for r in results)
    hits, queries = engine_delta
    predicted, reported = route_delta
    return {"p50": common.nearest_rank(ttfts, 0.5), "p90": common.nearest_rank(ttfts, 0.9),
            "wall_s": wall, "tokens_per_s": sum(r.output_tokens for r in results) / wall,
            "engine_hit_ratio": hits / queries if queries else 0.0,
            "usage_hit_ratio": (sum(r.cached_tokens for r in results)
                                / max(1, sum(r.prompt_tokens for r in results))),
            "cached_agreement": predicted / reported if reported else float("nan"),
            "busiest_share": max(served, default=0.0) / max(1.0, sum(served)),
            "requests": len(results)}


KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, bf16
ONE_GIB_TOKENS = 2**30 // KV_BYTES_PER_TOKEN


def kv_flags(kv_tokens: int) -> list[str]:
    """vLLM flags for a KV cache of ``kv_tokens`` per engine: the agent's 1 GiB
    (VLLM_CPU_KVCACHE_SPACE, whole GiB only) of which only that many 128-token blocks are
    used (``--num-gpu-blocks-override``, which ``vllm:cache_config_info`` reports)."""
    if kv_tokens >= ONE_GIB_TOKENS:
        return []
    return ["--num-gpu-blocks-override", str(kv_tokens // 128)]


def start(tree: Tree, workdir: pathlib.Path, tier: engines.EngineTier, kv_tokens: int,
          policies: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The agent with two vLLMs, one control plane per replica asked for and the
    vllm-router: the URL of each policy, and the engines' URLs."""
    command, model_dir = tier.require_vllm()
    replicas = {name: router for name, router in REPLICAS.items()
                if name in policies or name == "round_robin"}
    grpc = {name: free_port() for name in replicas}
    urls: dict[str, str] = {}
    for name, router in replicas.items():
        http = free_port()
        model: dict[str, Any] = {"name": tier.model_name}
        if name in ("predicted_ttft", "predicted_pod"):
            model["tokenizer"] = str(model_dir)
        pod: dict[str, Any] = {"workers": POD_WORKERS} if name == "predicted_pod" else {}
        cfg = workdir / f"cp-{name}.yaml"
        cfg.write_text(yaml.safe_dump({
            **({"redis": {"url": start_redis(tree)}} if pod else {}),
            "replica_id": name, "http": {"host": "127.0.0.1", "port": http, **pod,
                                         "upstream_first_byte_timeout_s": 300.0,
                                         "upstream_idle_timeout_s": 120.0},
            "grpc": {"host": "127.0.0.1", "port": grpc[name]},
            "auth": {"admin_key": ADMIN, "tenants": [{"name": "bench", "keys": [KEY]}],
                     "allow_unauthenticated_agents": True},
            "models": [model], "router": router, "cache": {"enabled": False},
            "registry": {"node_down_after_s": 30}, "logging": {"level": "warning"}}))
        tree.start(f"cp-{name}", [str(BIN / "synapse"), "controlplane", "--config", str(cfg)],
                   f"http://127.0.0.1:{http}/health")
        urls[name] = f"http://127.0.0.1:{http}"
    ports = [free_port(), free_port()]
    extra = [*VLLM_FLAGS, *kv_flags(kv_tokens)]
    agent = workdir / "agent.yaml"
    agent.write_text(yaml.safe_dump({
        "node_name": "bench", "control_plane": {
            "addresses": [f"127.0.0.1:{p}" for p in grpc.values()], "report_interval_s": 0.5},
        "grpc": {"host": "127.0.0.1", "port": 0}, "metrics": {"host": "127.0.0.1", "port": 0},
        "telemetry": {"source": "fake"},
        "supervisor": {"log_dir": str(workdir / "engines"), "scrape_interval_s": 0.5,
                       "vllm_command": command, "vllm_device": "cpu",
                       "vllm_cpu_kvcache_gib": 1, "startup_deadline_s": START_S},
        "backends": [{"name": f"vllm-{core}", "engine": "vllm", "model": str(model_dir),
                      "served_model_names": [tier.model_name], "port": port,
                      "max_model_len": 4096, "extra_args": extra,
                      "env": {"VLLM_CPU_OMP_THREADS_BIND": str(core)}}
                     for core, port in enumerate(ports)]}))
    proc = tree.start("agent", [str(BIN / "synapse"), "agent", "--config", str(agent)],
                      f"{urls['round_robin']}/health")
    deadline = time.monotonic() + START_S
    while not all(_backends_ready(u) == 2 for u in urls.values()):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the two vLLMs did not become ready (logs in {workdir})")
        time.sleep(1.0)
    engine_urls = [f"http://127.0.0.1:{p}" for p in ports]
    peer = VLLM_ROUTER.resolve()
    if not peer.is_file():
        raise SystemExit(f"{peer} is missing: run `make bench-peers`")
    port = free_port()
    tree.start("vllm-router", [str(peer), "--worker-urls", *engine_urls, "--port", str(port),
                               "--host", "127.0.0.1", "--policy", "cache_aware",
                               "--prometheus-port", str(free_port())],
               f"http://127.0.0.1:{port}/health")
    urls["vllm_router_cache_aware"] = f"http://127.0.0.1:{port}"
    return urls, engine_urls


def warm_up(engine_urls: Sequence[str], model: str) -> None:
    """One request per engine, so no policy pays a first request's one-time costs."""
    for u in engine_urls:
        body = json.dumps({"model": model, "max_tokens": 4, "messages": [
            {"role": "user", "content": "warm up"}]}).encode()
        req = urllib.request.Request(f"{u}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            resp.read()


Workload = Callable[[random.Random], list[list[dict[str, str]]]]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tier = engines.find()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-routing-real-"))
    tree = Tree(workdir)
    # Workload A's contexts hold 1.6 times one engine's KV: more than one engine holds,
    # 0.8 of each engine's when split between the two.
    contexts = args.contexts or round(1.6 * args.kv_tokens / args.context_tokens)
    print(f"KV per engine {args.kv_tokens} tokens; A: {contexts} contexts of "
          f"{args.context_tokens} tokens x {args.rounds} rounds; C: {args.unique} prompts; "
          f"{args.concurrency} in flight", flush=True)
    workloads: dict[str, Workload] = {
        "A": lambda rng: workload_a(rng, contexts, args.rounds, args.context_tokens),
        "C": lambda rng: workload_c(rng, args.unique)}
    table: dict[str, dict[str, dict[str, float]]] = {}
    try:
        urls, engine_urls = start(tree, workdir, tier, args.kv_tokens,
                                  args.policies.split(","))
        warm_up(engine_urls, tier.model_name)
        print(f"{'workload':<9}{'policy':<25}{'p50 s':>7}{'p90 s':>7}{'wall s':>8}"
              f"{'out tok/s':>10}{'engine hit':>11}{'usage hit':>10}{'pred/rep':>9}"
              f"{'busiest':>8}",
              flush=True)
        for name in args.workloads:
            table[name] = {}
            for i, policy in enumerate(args.policies.split(",")):
                rng = random.Random(f"{args.seed}-{name}-{i}")
                prompts = workloads[name](rng)
                cp = urls[policy] if policy in REPLICAS else None
                engine0, route0 = engine_totals(engine_urls), route_totals(cp, ADMIN)
                served0 = engine_requests(engine_urls)
                errors0 = learned(cp, {}, ADMIN)[1] if cp else {}
                results, wall = await closed_loop(
                    f"{urls[policy]}/v1/chat/completions", tier.model_name, prompts,
                    args.concurrency, args.max_tokens, {"Authorization": f"Bearer {KEY}"})
                engine1, route1 = engine_totals(engine_urls), route_totals(cp, ADMIN)
                served = [b - a for a, b in zip(served0, engine_requests(engine_urls), strict=True)]
                row = table[name][policy] = summarise(
                    results, wall, (engine1[0] - engine0[0], engine1[1] - engine0[1]),
                    (route1[0] - route0[0], route1[1] - route0[1]), served)
                print(f"{name:<9}{policy:<25}{row['p50']:>7.2f}{row['p90']:>7.2f}"
                      f"{row['wall_s']:>8.1f}{row['tokens_per_s']:>10.1f}"
                      f"{row['engine_hit_ratio']:>11.2f}{row['usage_hit_ratio']:>10.2f}"
                      f"{row['cached_agreement']:>9.2f}{row['busiest_share']:>8.2f}", flush=True)
                if cp and policy.startswith("predicted"):
                    print(f"{'':<9}  {learned(cp, errors0, ADMIN)[0]}", flush=True)
    finally:
        tree.stop()
        if args.keep_logs:
            print(f"logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result_json(table)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def result_json(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "routing_real", "engine": "vllm"}
    a = table.get("A", {})
    if "predicted_ttft" in a and "round_robin" in a:
        p, rr = a["predicted_ttft"], a["round_robin"]
        vr = a.get("vllm_router_cache_aware")
        out["A"] = {"p90_ttft_ratio_vs_round_robin": _ratio(p["p90"], rr["p90"]),
                    "p50_ttft_ratio_vs_round_robin": _ratio(p["p50"], rr["p50"]),
                    "p90_ttft_ratio_vs_vllm_router": _ratio(p["p90"], vr["p90"]) if vr else None,
                    "p50_ttft_ratio_vs_vllm_router": _ratio(p["p50"], vr["p50"]) if vr else None,
                    "throughput_ratio_vs_round_robin":
                        _ratio(p["tokens_per_s"], rr["tokens_per_s"]),
                    "engine_prefix_hit_ratio": round(p["engine_hit_ratio"], 3)}
        out["cached_tokens_agreement"] = round(p["cached_agreement"], 3)
        if (pod := a.get("predicted_pod")) is not None:
            out["A"]["pod_p90_ttft_ratio_vs_one_process"] = _ratio(pod["p90"], p["p90"])
            out["A"]["pod_p90_ttft_ratio_vs_round_robin"] = _ratio(pod["p90"], rr["p90"])
            out["A"]["pod_engine_prefix_hit_ratio"] = round(pod["engine_hit_ratio"], 3)
        if "predicted_approx" in a:
            out["cached_tokens_agreement_approximation"] = \
                round(a["predicted_approx"]["cached_agreement"], 3)
    c = table.get("C", {})
    if "predicted_ttft" in c and "least_loaded" in c:
        out["C"] = {"p90_ttft_ratio_vs_least_loaded":
                    _ratio(c["predicted_ttft"]["p90"], c["least_loaded"]["p90"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="AC")
    parser.add_argument("--policies", default="predicted_ttft,predicted_approx,round_robin,"
                        "least_loaded,vllm_router_cache_aware")
    parser.add_argument("--kv-tokens", type=int, default=12_288,
                        help=f"KV cache per engine, tokens (1 GiB: {ONE_GIB_TOKENS})")
    parser.add_argument("--contexts", type=int, default=0,
                        help="default: 1.6 x one engine's KV / --context-tokens")
    parser.add_argument("--context-tokens", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=10,
                        help="questions per context (each context's first is cold for "
                             "any router: ten make the p90 measure routing)")
    parser.add_argument("--unique", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", default="15")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    print(json.dumps(common.run(run(args))))


if __name__ == "__main__":
    main()
