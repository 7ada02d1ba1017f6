"""Benchmark: one tenant's long prompts against another's short streamed ones on one real
vLLM (SmolLM2-135M on the CPU, from the engine tier: ``make engines``), under each
configuration of vLLM's prefill scheduling flags.

Synapse's fair queue holds requests only while a backend is saturated
(:mod:`controlplane.core.saturation`), so a few concurrent long prompts of one tenant
reach the engine, whose scheduler knows no tenants. This bench measures what that costs
the other tenant, straight against vLLM (no Synapse in the path: the question is the
engine's scheduling), and what vLLM's chunked-prefill flags change.

One vLLM per configuration in ``--configs`` (named flag sets, :data:`CONFIGS`) is started
(``VLLM_CPU_KVCACHE_SPACE=1``, ``--max-model-len``, the CPU dtype, ``--enforce-eager``)
and warmed up; then, in each of ``--rounds`` rounds, every configuration in turn (the
others idle: background load on a shared machine spreads over all of them alike) runs:

* B alone: short streamed chat requests, one at a time (a short random pause between
  them, so they do not fall in step with the engine), each timed to its first content
  token (TTFT);
* B under A's flood: tenant A keeps ``--flood`` non-streamed requests in flight, each a
  fresh prompt of ``--long-tokens`` tokens (no prefix-cache reuse) asking for
  ``--a-max-tokens`` tokens, a new one sent as soon as one answers; once A's first answer
  is in (steady state), B's requests run again as above. A's requests completed during
  B's window are counted too: a flag that speeds B by starving A is no fix.

Printed: one row per configuration (B's TTFT p50/p90 alone and under the flood, over
``--b-requests`` each; A's completed requests/s and prompt tokens/s), then one JSON
line: ``{"bench": "prefill_share", "engine": "vllm", "configs": {NAME: {"flags": …,
"b_requests": …, "b_alone_p50": …, "b_alone_p90": …, "b_flood_p50": …, "b_flood_p90": …,
"a_req_per_s": …, "a_prompt_tok_per_s": …}}, "flood_p50_ratio_vs_default": {NAME: …},
"a_rate_ratio_vs_default": {NAME: …}}``.

Run: ``python -m bench.prefill_share`` (about 15 minutes for the four configurations on a
busy 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import aiohttp

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from agent import config as agent_config  # noqa: E402
from agent import engine_env as engine_env_rule  # noqa: E402
from bench import common  # noqa: E402
from bench.gateway import Tree  # noqa: E402
from bench.routing import send  # noqa: E402
from bench.routing_real import words  # noqa: E402
from synapse_common import engines  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

START_S = 600.0
# Named flag sets: "default" is vLLM's own scheduling; the others add chunked-prefill
# flags (vllm/config/scheduler.py in the engine tier's vLLM). The agent starts a vLLM
# with "threshold_256" (agent.core.commands.prefill_share).
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "threshold_256": ["--long-prefill-token-threshold", "256"],
    "threshold_512": ["--long-prefill-token-threshold", "512"],
    "threshold_256_adaptive": ["--long-prefill-token-threshold", "256",
                               "--long-prefill-token-threshold-adaptive"],
}


def engine_env(cores: str, command: Sequence[str]) -> dict[str, str]:
    """What the agent gives a vLLM on a node without a GPU, with a 1 GiB KV cache."""
    cfg = agent_config.SupervisorSettings(vllm_device="cpu", vllm_cpu_kvcache_gib=1,
                                          vllm_cpu_threads_bind=cores)
    return engine_env_rule.vllm_environment(cfg, command)


def start_engine(tree: Tree, name: str, tier: engines.EngineTier, flags: Sequence[str],
                 args: argparse.Namespace) -> str:
    command, model_dir = tier.require_vllm()
    port = free_port()
    argv = [*command, "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", tier.model_name, "--max-model-len", str(args.max_model_len),
            "--dtype", engines.cpu_dtype(), "--enforce-eager", *flags]
    url = f"http://127.0.0.1:{port}"
    tree.start(f"vllm-{name}", argv, f"{url}/health", env=engine_env(args.cores, command),
               timeout=START_S)
    return url


def warm_up(url: str, model: str) -> None:
    """A long and a short request, so no phase pays a first request's one-time costs."""
    rng = random.Random("warm")
    for content in (words(rng, 1500), "warm up"):
        body = json.dumps({"model": model, "max_tokens": 4, "messages": [
            {"role": "user", "content": content}]}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            resp.read()


async def tenant_b(session: aiohttp.ClientSession, url: str, model: str, rng: random.Random,
                   n: int) -> tuple[list[float], float]:
    """``n`` short streamed requests, one at a time: their TTFTs and the wall time."""
    ttfts = []
    started = time.perf_counter()
    for i in range(n):
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        question = f"Question {i} ({rng.random():.6f}): {words(rng, 12)}?"
        result = await send(session, url, [{"role": "user", "content": question}], 4, 1.0,
                            model)
        ttfts.append(result.ttft)
    return ttfts, time.perf_counter() - started


class Flood:
    """Tenant A: ``k`` long non-streamed requests kept in flight."""

    def __init__(self, url: str, model: str, rng: random.Random, k: int, tokens: int,
                 max_tokens: int) -> None:
        self.url, self.model, self.rng = url, model, rng
        self.k, self.tokens, self.max_tokens = k, tokens, max_tokens
        self.done: list[tuple[float, int]] = []  # (end time, prompt tokens)
        self.first = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _worker(self, session: aiohttp.ClientSession, w: int) -> None:
        n = 0
        while True:
            n += 1
            prompt = f"Report {w}-{n} ({self.rng.random():.6f}). " + words(self.rng, self.tokens)
            body = {"model": self.model, "max_tokens": self.max_tokens, "ignore_eos": True,
                    "messages": [{"role": "user", "content": prompt}]}
            async with session.post(self.url, json=body) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"tenant A: status {resp.status}: {answer}")
            self.done.append((time.perf_counter(), int(answer["usage"]["prompt_tokens"])))
            self.first.set()

    def start(self, session: aiohttp.ClientSession) -> None:
        self.tasks = [asyncio.create_task(self._worker(session, w)) for w in range(self.k)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:   # a worker that failed says why
            try:
                await task
            except asyncio.CancelledError:
                pass

    def rate(self, since: float, until: float) -> tuple[float, float]:
        """Requests/s and prompt tokens/s that A completed in [since, until]."""
        inside = [tokens for end, tokens in self.done if since <= end <= until]
        span = max(until - since, 1e-9)
        return len(inside) / span, sum(inside) / span


async def phase(session: aiohttp.ClientSession, url: str, model: str,
                args: argparse.Namespace, rng: random.Random, n: int,
                totals: dict[str, list[float]]) -> None:
    """One round on one engine: ``n`` of B's requests alone, then ``n`` under A's flood;
    appends to ``totals`` (B's TTFTs, A's completions and prompt tokens, the window)."""
    chat = f"{url}/v1/chat/completions"
    alone, _ = await tenant_b(session, chat, model, rng, n)
    totals["alone"] += alone
    flood = Flood(chat, model, random.Random(rng.random()), args.flood, args.long_tokens,
                  args.a_max_tokens)
    flood.start(session)
    try:
        await asyncio.wait_for(flood.first.wait(), 600)
        t0 = time.perf_counter()
        flooded, wall = await tenant_b(session, chat, model, rng, n)
        totals["flood"] += flooded
        totals["a"].append(sum(1 for end, _ in flood.done if end >= t0))
        totals["a_tokens"].append(sum(tok for end, tok in flood.done if end >= t0))
        totals["window"].append(wall)
    finally:
        await flood.stop()
    await asyncio.sleep(1.0)   # the engine finishes aborting A's requests


def summary(flags: Sequence[str], totals: dict[str, list[float]]) -> dict[str, Any]:
    q = common.nearest_rank
    window = sum(totals["window"]) or float("nan")
    return {"flags": list(flags), "b_requests": len(totals["flood"]),
            "b_alone_p50": q(totals["alone"], 0.5), "b_alone_p90": q(totals["alone"], 0.9),
            "b_flood_p50": q(totals["flood"], 0.5), "b_flood_p90": q(totals["flood"], 0.9),
            "a_req_per_s": sum(totals["a"]) / window,
            "a_prompt_tok_per_s": sum(totals["a_tokens"]) / window}


def row(name: str, r: dict[str, Any]) -> str:
    return (f"{name:<24}{r['b_alone_p50']:>9.3f}{r['b_alone_p90']:>9.3f}"
            f"{r['b_flood_p50']:>9.3f}{r['b_flood_p90']:>9.3f}{r['a_req_per_s']:>8.3f}"
            f"{r['a_prompt_tok_per_s']:>10.0f}  {' '.join(r['flags']) or '(vLLM defaults)'}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tier = engines.find()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-prefill-share-"))
    tree = Tree(workdir)
    per_round = -(-args.b_requests // args.rounds)
    print(f"A: {args.flood} in flight x {args.long_tokens} prompt tokens, max_tokens "
          f"{args.a_max_tokens}, non-streamed; B: short streamed, one at a time, "
          f"{per_round * args.rounds} per phase in {args.rounds} rounds (the configurations "
          f"take turns each round); max-model-len {args.max_model_len}", flush=True)
    fields = ("alone", "flood", "a", "a_tokens", "window")
    totals: dict[str, dict[str, list[float]]] = {n: {k: [] for k in fields} for n in names}
    try:
        urls: dict[str, str] = {}
        for name in names:   # all up at once, idle but one: rounds interleave them
            urls[name] = start_engine(tree, name, tier, CONFIGS[name], args)
            warm_up(urls[name], tier.model_name)
        rng = random.Random(args.seed)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            for r in range(args.rounds):
                for name in names:
                    await phase(session, urls[name], tier.model_name, args, rng, per_round,
                                totals[name])
                print(f"round {r + 1}/{args.rounds} done: B under the flood so far, p50 "
                      + ", ".join(f"{n} {common.nearest_rank(t['flood'], 0.5):.2f} s"
                                  for n, t in totals.items()), flush=True)
    finally:
        tree.stop()
        if args.keep_logs:
            print(f"logs: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = {n: summary(CONFIGS[n], totals[n]) for n in names}
    print(f"{'config':<24}{'B alone':>18}{'B + A flood':>18}{'A':>8}{'A':>10}\n"
          f"{'':<24}{'p50 s':>9}{'p90 s':>9}{'p50 s':>9}{'p90 s':>9}{'req/s':>8}"
          f"{'tok/s':>10}  flags", flush=True)
    for name, result in table.items():
        print(row(name, result), flush=True)
    return result_json(table)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def result_json(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "prefill_share", "engine": "vllm", "configs": {
        name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        for name, r in table.items()}}
    base = table.get("default")
    if base is not None:
        out["flood_p50_ratio_vs_default"] = {
            n: _ratio(r["b_flood_p50"], base["b_flood_p50"]) for n, r in table.items()}
        out["a_rate_ratio_vs_default"] = {
            n: _ratio(r["a_req_per_s"], base["a_req_per_s"]) for n, r in table.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"named flag sets, in order (known: {', '.join(CONFIGS)})")
    parser.add_argument("--flood", type=int, default=3, help="tenant A's requests in flight")
    parser.add_argument("--long-tokens", type=int, default=1800,
                        help="tenant A's prompt length, tokens")
    parser.add_argument("--a-max-tokens", type=int, default=8)
    parser.add_argument("--b-requests", type=int, default=21,
                        help="B's requests per phase (alone, under the flood), all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--cores", default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                        help="VLLM_CPU_OMP_THREADS_BIND for the engine")
    parser.add_argument("--seed", default="1")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    print(json.dumps(common.run(run(args))))


if __name__ == "__main__":
    main()
