"""Benchmark: a quiet tenant's latency while another tenant sends huge request bodies.

A control plane serves both tenants on one event loop, so the CPU one request costs is
time every other request waits. A hostile tenant's cheapest weapon is a body the size
limit admits but the control plane walks slowly: ``--attack many`` sends 110,000
one-letter messages (3.3 MB), ``--attack one`` a single 3.9 MB message; either asks for
about a million prompt tokens, more than any backend's KV cache holds, so the right
answer is a quick 400.

One engine simulator (``--time-scale 0``, kind ``vllm``: the control plane reads its KV
capacity) behind one control plane per target: ``synapse`` (this tree) and each
``--baseline-tree DIR`` (the same config, that tree's code), measured one after the
other so they never share the CPU. For each target: the quiet tenant alone, sending
small chats back to back for ``--seconds``; then the same while ``--attackers``
concurrent loops of the other tenant send the oversized body. Printed per target: the
quiet tenant's p50/p99 latency in both phases, and the attacker's requests (count,
p50 time, status). JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import tempfile
import time

import aiohttp
import orjson

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.gateway import BIN, KEY, MODEL, Tree  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

ATTACKER_KEY = "bench-attacker-0123456789"
MAX_BODY = 4 * 1024 * 1024     # the default http.max_body_bytes, set explicitly


def attack_body(kind: str) -> bytes:
    if kind == "many":
        messages = [{"role": "user", "content": "x"}] * 110_000
    else:
        messages = [{"role": "user", "content": "x" * 3_900_000}]
    body = orjson.dumps({"model": MODEL, "max_tokens": 2, "messages": messages})
    assert len(body) < MAX_BODY
    return body


def config(workdir: pathlib.Path, name: str, sim: str, http: int, grpc: int) -> str:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps({
        "http": {"host": "127.0.0.1", "port": http, "max_body_bytes": MAX_BODY},
        "grpc": {"host": "127.0.0.1", "port": grpc},
        "auth": {"tenants": [{"name": "quiet", "keys": [KEY]},
                             {"name": "attacker", "keys": [ATTACKER_KEY]}]},
        "upstreams": [{"name": "sim", "url": sim, "models": [MODEL], "kind": "vllm"}],
        "registry": {"upstream_probe_interval_s": 0.5},
        "cache": {"enabled": True, "semantic_enabled": False},
        "logging": {"level": "warning"},
    }))
    return str(path)


async def quiet(session: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    """Small chats back to back (each unique, so the cache never answers): latencies."""
    out: list[float] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        body = {"model": MODEL, "max_tokens": 2, "temperature": 1.0,
                "messages": [{"role": "user", "content": f"quiet question {i}"}]}
        start = time.perf_counter()
        async with session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise SystemExit(f"the quiet tenant got {resp.status}")
        out.append(time.perf_counter() - start)
        i += 1
    return out


async def attacker(session: aiohttp.ClientSession, url: str, body: bytes,
                   stop: asyncio.Event, times: list[float], statuses: dict[int, int]) -> None:
    headers = {"Authorization": f"Bearer {ATTACKER_KEY}", "Content-Type": "application/json"}
    while not stop.is_set():
        start = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
        times.append(time.perf_counter() - start)


def ms(values: list[float], q: float) -> float:
    return round(common.nearest_rank(values, q) * 1000, 1)


async def measure(url: str, args: argparse.Namespace, body: bytes) -> dict[str, object]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await quiet(session, url, 1.0)     # warm-up
        alone = await quiet(session, url, args.seconds)
        stop = asyncio.Event()
        times: list[float] = []
        statuses: dict[int, int] = {}
        tasks = [asyncio.create_task(attacker(session, url, body, stop, times, statuses))
                 for _ in range(args.attackers)]
        await asyncio.sleep(0.5)
        attacked = await quiet(session, url, args.seconds)
        stop.set()
        await asyncio.gather(*tasks)
    return {"quiet_alone_p50_ms": ms(alone, 0.5), "quiet_alone_p99_ms": ms(alone, 0.99),
            "quiet_attacked_p50_ms": ms(attacked, 0.5),
            "quiet_attacked_p99_ms": ms(attacked, 0.99),
            "attack_requests": len(times), "attack_p50_ms": ms(times, 0.5),
            "attack_statuses": {str(k): v for k, v in sorted(statuses.items())}}


async def run(args: argparse.Namespace) -> dict[str, object]:
    body = attack_body(args.attack)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="synapse-oversized-"))
    tree = Tree(workdir)
    results: dict[str, object] = {}
    try:
        sp = free_port()
        sim = f"http://127.0.0.1:{sp}"
        tree.start("simulator", [str(BIN / "synapse"), "simulator", "--port", str(sp),
                                 "--time-scale", "0", "--served-model-name", MODEL,
                                 "--log-level", "warning"], f"{sim}/health")
        targets: list[tuple[str, pathlib.Path | None]] = [("synapse", None)]
        targets += [(f"tree:{t.name}", t.resolve()) for t in args.baseline_tree]
        print(f"{'target':<16} {'quiet p50/p99 ms alone':>24} {'quiet p50/p99 ms attacked':>27} "
              f"{'attack reqs':>12} {'attack p50 ms':>14}  statuses", flush=True)
        for name, source in targets:
            http = free_port()
            cfg = config(workdir, name.replace(":", "-"), sim, http, free_port())
            proc = tree.start(name, [str(BIN / "synapse"), "controlplane", "--config", cfg],
                              f"http://127.0.0.1:{http}/ready",
                              env={"PYTHONPATH": str(source)} if source else None)
            await asyncio.sleep(1.5)    # the first probe of the upstream's KV capacity
            row = await measure(f"http://127.0.0.1:{http}/v1/chat/completions", args, body)
            results[name] = row
            print(f"{name:<16} {row['quiet_alone_p50_ms']:>11} / {row['quiet_alone_p99_ms']:<10}"
                  f" {row['quiet_attacked_p50_ms']:>13} / {row['quiet_attacked_p99_ms']:<11}"
                  f" {row['attack_requests']:>12} {row['attack_p50_ms']:>14}  "
                  f"{row['attack_statuses']}", flush=True)
            proc.terminate()
            proc.wait(30)
    finally:
        tree.stop()
    return {"bench": "oversized_bodies", "attack": args.attack, "attackers": args.attackers,
            "seconds": args.seconds, "targets": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", choices=("many", "one"), default="many",
                        help="110,000 tiny messages, or one 3.9 MB message")
    parser.add_argument("--attackers", type=int, default=2, help="concurrent attack loops")
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--baseline-tree", type=pathlib.Path, metavar="DIR", action="append",
                        default=[], help="also measure the control plane of this source tree")
    args = parser.parse_args()
    print(json.dumps(common.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
