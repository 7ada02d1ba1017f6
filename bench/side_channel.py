"""Benchmark: can tenant B tell, by timing, which prompts tenant A sent? (issue 14, finding 2)

Run: ``python -m bench.side_channel [--before REV] [--prompts N] [--rounds R]``. Prints a
table, then as the last line one JSON object: ``{"bench": "side_channel", "after":
{"probe_p50_ms", "new_p50_ms", "gap_ms", "gap_ci95_ms", "auc"}, "before": {…}}``.

Real processes: a ``synapse controlplane`` (two tenants) and a ``synapse agent`` embedding
with the in-process all-MiniLM-L6-v2, on loopback; requests are ``POST /v1/embeddings``
with one text, which the control plane sends to the agent's ``Node.Embed``. Per round,
tenant A sends ``N`` prompts of its own; then, in a shuffled order, tenant B sends each
of A's prompts (the *probe*) and as many prompts nobody sent (*new*), and A sends its own
prompts again (*own repeat*). Client-side latency of every request is recorded.

* ``gap_ms`` = p50(new) - p50(probe): what B learns per request. ``gap_ci95_ms`` is
  its bootstrap 95 % interval; when it contains 0, the two are within noise.
* ``auc`` = P(a new request is slower than a probe): 1.0 is a perfect membership oracle
  (every probe faster than every new prompt), 0.5 is a coin toss.
* ``--before REV`` runs the same processes from git revision ``REV`` (exported to a
  temporary directory, e.g. the commit before the fix) beside the working tree's, in
  the same rounds, so both stacks see the same machine load.
* The other fix would be to make hits as slow as misses (pad every cache hit to a
  miss's time). Its price is read off the *own repeat* row: every hit would cost
  ``new_p50 - own_p50`` more (printed as ``padding_cost_ms``), the whole benefit of the
  cache for a tenant's own repeats, while partitioning the cache by tenant keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import numpy as np
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
KEYS = {"a": "sk-bench-tenant-a-5e7f9a1b3c", "b": "sk-bench-tenant-b-8d0f2a4c6e"}
TOKEN = "bench-side-channel-agent-token"
SUBJECTS = ("Acme", "Initech", "Globex", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka")
VERBS = ("acquire", "sue", "partner with", "lay off staff at", "audit", "merge with")


def prompt(tag: str, i: int) -> str:
    rng = random.Random(f"{tag}-{i}")
    a, b = rng.sample(SUBJECTS, 2)
    return (f"[{tag} {i}] Is {a} about to {rng.choice(VERBS)} {b} before the end of "
            f"quarter {rng.randint(1, 4)}? Draft a short answer for the board.")


@dataclasses.dataclass
class Stack:
    name: str
    url: str
    procs: list[subprocess.Popen[bytes]]


def _configs(tmp: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    http, grpc, node = free_port(), free_port(), free_port()
    cp = {"replica_id": "bench", "data_dir": str(tmp / "data"),
          "http": {"host": "127.0.0.1", "port": http},
          "grpc": {"host": "127.0.0.1", "port": grpc},
          "auth": {"agent_token": TOKEN, "tenants": [{"name": "a", "keys": [KEYS["a"]]},
                                                    {"name": "b", "keys": [KEYS["b"]]}]},
          "models": [{"name": "unused", "aliases": []}],
          "cache": {"enabled": False}, "logging": {"level": "warning"}}
    agent = {"node_name": "bench", "control_plane": {"addresses": [f"127.0.0.1:{grpc}"],
                                                     "token": TOKEN},
             "grpc": {"host": "127.0.0.1", "port": node,
                      "advertise_address": f"127.0.0.1:{node}"},
             "metrics": {"host": "127.0.0.1", "port": 0}, "telemetry": {"source": "fake"},
             "supervisor": {"log_dir": str(tmp / "logs")}, "embedder": {"kind": "minilm"},
             "logging": {"level": "warning"}}
    return cp, agent, f"http://127.0.0.1:{http}"


def start(name: str, tmp: pathlib.Path, code_dir: str | None) -> Stack:
    """A control plane and an agent from ``code_dir`` (None: this working tree)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cp, agent, url = _configs(tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if code_dir:
        env["PYTHONPATH"] = code_dir
    procs = []
    for proc_name, cfg in (("controlplane", cp), ("agent", agent)):
        path = tmp / f"{proc_name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = (tmp / f"{proc_name}.log").open("wb")
        procs.append(subprocess.Popen([str(BIN / "synapse"), proc_name, "--config", str(path)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    return Stack(name, url, procs)


def stop(stack: Stack) -> None:
    for proc in reversed(stack.procs):
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def embed(session: aiohttp.ClientSession, stack: Stack, tenant: str, text: str,
                ) -> float:
    body = {"model": EMBED_MODEL, "input": [text]}
    start_s = time.perf_counter()
    async with session.post(f"{stack.url}/v1/embeddings", json=body,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise SystemExit(f"{stack.name}: /v1/embeddings answered {resp.status}")
    return time.perf_counter() - start_s


async def wait_ready(session: aiohttp.ClientSession, stack: Stack) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            await embed(session, stack, "a", "warm up")
            return
        except (aiohttp.ClientError, SystemExit):
            await asyncio.sleep(0.5)
    raise SystemExit(f"{stack.name}: the agent's embedder never answered")


async def one_round(session: aiohttp.ClientSession, stack: Stack, tag: str, n: int,
                    out: dict[str, list[float]]) -> None:
    own = [prompt(f"A {tag}", i) for i in range(n)]
    for text in own:
        await embed(session, stack, "a", text)
    jobs = ([("probe", "b", t) for t in own] + [("own", "a", t) for t in own]
            + [("new", "b", prompt(f"B {tag}", i)) for i in range(n)])
    random.Random(tag).shuffle(jobs)
    for kind, tenant, text in jobs:
        out.setdefault(kind, []).append(await embed(session, stack, tenant, text))


def gap_stats(new: list[float], probe: list[float], seed: int = 0) -> dict[str, Any]:
    """Median gap, its bootstrap 95 % interval, and P(new > probe), all in ms."""
    a, b = np.asarray(new) * 1000, np.asarray(probe) * 1000
    rng = np.random.default_rng(seed)
    boots = [np.median(rng.choice(a, a.size)) - np.median(rng.choice(b, b.size))
             for _ in range(2000)]
    auc = float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())
    p50_new, p50_probe = common.nearest_rank(list(a), 0.5), common.nearest_rank(list(b), 0.5)
    return {"probe_p50_ms": round(p50_probe, 2), "new_p50_ms": round(p50_new, 2),
            "gap_ms": round(p50_new - p50_probe, 2),
            "gap_ci95_ms": [round(float(np.percentile(boots, 2.5)), 2),
                            round(float(np.percentile(boots, 97.5)), 2)],
            "auc": round(auc, 3)}


async def measure(stacks: list[Stack], n: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {s.name: {} for s in stacks}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for stack in stacks:
            await wait_ready(session, stack)
        for r in range(rounds):
            for stack in stacks if r % 2 == 0 else reversed(stacks):
                await one_round(session, stack, f"r{r}", n, results[stack.name])
    return results


def report(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    pct = common.nearest_rank
    labels = {"probe": "B sends A's prompts", "new": "B sends new prompts",
              "own": "A repeats its own prompts"}
    print(f"{'code':<8} {'requests':<27} {'n':>5} {'p50 ms':>8} {'p90 ms':>8}")
    summary: dict[str, Any] = {"bench": "side_channel"}
    for name, runs in results.items():
        for kind in ("probe", "new", "own"):
            lat = runs[kind]
            print(f"{name:<8} {labels[kind]:<27} {len(lat):>5} {pct(lat, 0.5) * 1000:>8.2f} "
                  f"{pct(lat, 0.9) * 1000:>8.2f}")
        stats = gap_stats(runs["new"], runs["probe"])
        stats["own_p50_ms"] = round(pct(runs["own"], 0.5) * 1000, 2)
        stats["padding_cost_ms"] = round(stats["new_p50_ms"] - stats["own_p50_ms"], 2)
        summary[name] = stats
    for name in results:
        s = summary[name]
        lo, hi = s["gap_ci95_ms"]
        verdict = "within noise" if lo <= 0 <= hi else "separable"
        print(f"{name}: new - probe = {s['gap_ms']:.2f} ms (95% CI {lo:.2f} .. {hi:.2f}), "
              f"P(new slower than probe) = {s['auc']:.2f}: {verdict}; padding hits to a "
              f"miss's time would cost {s['padding_cost_ms']:.2f} ms per own repeat")
    return summary


def export(rev: str, into: pathlib.Path) -> str:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", root, "archive", rev], capture_output=True,
                             check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REV",
                        help="also run git revision REV (e.g. the commit before the fix)")
    parser.add_argument("--prompts", type=int, default=40, help="A's prompts per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = pathlib.Path(tmp_dir)
        stacks: list[Stack] = []
        try:
            if args.before:
                code = export(args.before, tmp / "code-before")
                stacks.append(start("before", tmp / "before", code))
            stacks.append(start("after", tmp / "after", None))
            results = common.run(measure(stacks, args.prompts, args.rounds))
        finally:
            for stack in stacks:
                stop(stack)
    print(json.dumps(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
