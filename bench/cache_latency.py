"""Benchmark: what the response cache costs and saves, through the HTTP API.

One run, one process tree: ``synapse simulator --time-scale 0`` (answers at once, so
the time measured is the control plane's), one ``synapse agent`` serving MiniLM over
``Node.Embed``, and two control planes with the simulator as a static upstream:
``cache`` (embedded-mode cache: in-process L1, Milvus Lite file, default budgets) and
``nocache`` (``cache.enabled: false``). The agent runs torch with one thread
(``OMP_NUM_THREADS=1``, see ``fleet``). The same requests go to both, one at a time:

* **exact hit**: a question asked before, byte for byte;
* **semantic hit**: a paraphrase (QQP duplicate of a stored question) that the verifier
  accepts, with ``--entries`` (10,000) entries in the same scope; only responses marked
  ``hit-semantic`` are counted;
* **miss**: a question never asked, in the full scope: the cache's added cost is L1 +
  embed + L2 search + verify (the write happens after the response). ``added`` = cache
  p50 (p99) minus no-cache p50 (p99);
* **miss_new_scope**: the same in a new conversation (a scope with no entries): L1 + a
  scalar L2 probe, no embedding (``miss_new_scope_added_p50_ms``).

The scope is filled through the API itself (``Cache-Control: no-cache`` requests: they
skip the lookup and are stored), so the entries are exactly what production writes.
Texts come from ``--pairs`` (the QQP dev pairs). The agent's embedder is
``--tuning`` (default ``none``: plain all-MiniLM-L6-v2, what agents serve by default; no
tuned embedder is shipped yet) and the control plane's verifier the one fitted for it
(``--verifier``, ``--embedder-id`` for a tuning of your own); ``--pair-scorer shipped``
gives the agent the shipped pair scorer and the cache the shipped verifier's stack on it
(``cache.pair_scorer``), as production does by default, so a lookup with a candidate at
or above the stack's floor also waits for a ``Node.ScorePairs`` call on its best
candidate, and for one more on the others when that one is refused; the same run is then
repeated with ``--baseline-pair-scorer`` (default ``none``: the verifier alone) and both
are printed, the baseline's result under ``"baseline"`` in the JSON line.
``--pair-scorer-precision bfloat16`` runs the agent's scorer in bfloat16
(``embedder.pair_scorer_precision``; float32 where the CPU has no AMX-BF16, said in the
agent's log) and ``--baseline-pair-scorer-precision`` sets the baseline's (default: the
same), so ``--pair-scorer-precision bfloat16 --baseline-pair-scorer shipped
--baseline-pair-scorer-precision float32`` puts both precisions side by side. The agent's
embedder and pair scorer run on onnxruntime when it is installed (``embedder.runtime``
``auto``); the scorer runs a pair's two orders side by side (two single-threaded lanes,
``agent.embedding.pair_scorer_onnx``), the embedder on one thread. Run: ``python -m
bench.cache_latency [--entries 10000] [--queries 300]``. Last line: ``{"bench": "cache_latency",
"exact_hit_p50_ms": …, "exact_hit_p99_ms": …, "semantic_hit_p50_ms": …,
"semantic_hit_p99_ms": …, "miss_added_p50_ms": …, "miss_added_p99_ms": …, …}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import numpy as np
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import scrape  # noqa: E402
from controlplane import calibrate  # noqa: E402
from protos.synapse.v1 import node_pb2, node_pb2_grpc  # noqa: E402
from synapse_common import call_metadata  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

MODEL = "bench-model"
KEY = "sk-bench-cache-0123456789"
AGENT_TOKEN = "bench-cache-agent-token"  # agent and control planes share it
ADMIN_KEY = "bench-cache-admin-0123456789"   # reads the control planes' /metrics
BIN = pathlib.Path(sys.executable).parent
SYSTEM = "You are a helpful assistant. Answer in one sentence."



def wait(predicate, what: str, procs: list[subprocess.Popen[bytes]], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{p.args} exited with {p.returncode} waiting for {what}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def metric(url: str, name: str, labels: str = "") -> float:
    text = scrape.metrics_page(url, ADMIN_KEY, 5)
    found = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def settle(url: str, quiet_s: float = 6.0, limit_s: float = 900.0) -> None:
    """Wait until the writer is done: L2 stores and write errors stop changing."""
    def progress() -> tuple[float, ...]:
        return tuple(metric(url, name, labels) for name, labels in (
            ("synapse_cache_stores_total", '{layer="semantic"}'),
            ("synapse_cache_errors_total", '{layer="semantic"}'),
            ("synapse_cache_errors_total", '{layer="embedder"}')))
    deadline = time.monotonic() + limit_s
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif last[0] > 0 and time.monotonic() - since >= quiet_s:
            return
    raise SystemExit("the cache writer did not settle")


def breakdown(url: str) -> dict[str, float]:
    """Mean time of each cache stage, from the control plane's own histograms."""
    out = {}
    for key, name, labels in (
            ("embed", "synapse_embedding_duration_seconds", ""),
            ("l1_lookup", "synapse_cache_lookup_duration_seconds", '{layer="exact"}'),
            ("semantic_lookup", "synapse_cache_lookup_duration_seconds", '{layer="semantic"}')):
        total = metric(url, f"{name}_sum", labels)
        count = metric(url, f"{name}_count", labels)
        out[key] = round(1000 * total / count, 2) if count else float("nan")
    return out


def embeds(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        node_pb2_grpc.NodeStub(ch).Embed(node_pb2.EmbedRequest(texts=["ping"]), timeout=5,
                                         metadata=call_metadata.metadata(AGENT_TOKEN))
    return True


@contextlib.contextmanager
def fleet(tmp: pathlib.Path, entries: int, tuning: str = "none",
          verifier: str | None = None, embedder_id: str | None = None,
          pair_scorer: str = "none", precision: str = "float32"
          ) -> Iterator[dict[str, str]]:
    sim, node = free_port(), free_port()
    http = {"cache": free_port(), "nocache": free_port()}
    grpc_ports = {"cache": free_port(), "nocache": free_port()}
    for name in http:
        cfg = {"replica_id": name, "data_dir": str(tmp / name),
               "http": {"host": "127.0.0.1", "port": http[name]},
               "grpc": {"host": "127.0.0.1", "port": grpc_ports[name]},
               "auth": {"agent_token": AGENT_TOKEN, "admin_key": ADMIN_KEY,
                        "tenants": [{"name": "bench", "keys": [KEY]}]},
               "models": [{"name": MODEL}],
               "upstreams": [{"name": "sim", "url": f"http://127.0.0.1:{sim}",
                              "models": [MODEL]}],
               "cache": {"enabled": name == "cache",
                         "l1_max_entries": max(100_000, 2 * entries),
                         "verifier_path": verifier, "embedder_id": embedder_id,
                         "pair_scorer": pair_scorer != "none" and verifier is None},
               "logging": {"level": "error"}}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    agent = {"node_name": "bench-node",
             "control_plane": {"addresses": [f"127.0.0.1:{p}" for p in grpc_ports.values()],
                               "report_interval_s": 1, "token": AGENT_TOKEN},
             "grpc": {"host": "127.0.0.1", "port": node,
                      "advertise_address": f"127.0.0.1:{node}"},
             "metrics": {"host": "127.0.0.1", "port": 0},
             "telemetry": {"source": "fake"},
             "embedder": {"kind": "minilm", "tuning": tuning, "pair_scorer": pair_scorer,
                          "pair_scorer_precision": precision},
             "logging": {"level": "error"}, "supervisor": {"log_dir": str(tmp / "engines")}}
    (tmp / "agent.yaml").write_text(yaml.safe_dump(agent))
    log = open(tmp / "processes.log", "ab")
    cmds = [[str(BIN / "synapse"), "simulator", "--port", str(sim), "--model", MODEL,
             "--time-scale", "0"]]
    cmds += [[str(BIN / "synapse"), "controlplane", "--config", str(tmp / f"{n}.yaml")]
             for n in http]
    cmds.append([str(BIN / "synapse"), "agent", "--config", str(tmp / "agent.yaml")])
    # One torch thread for the agent's MiniLM: a single short text gains nothing from two,
    # and on a busy 2-core machine two threads spin against each other (measured here:
    # 9 ms with one thread, 120 ms with two under load).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the MiniLM loader goes offline itself
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c in cmds]
    urls = {n: f"http://127.0.0.1:{p}" for n, p in http.items()}
    try:
        wait(lambda: http_ok(f"http://127.0.0.1:{sim}/health"), "the simulator", procs)
        for url in urls.values():
            wait(lambda u=url: http_ok(f"{u}/health"), url, procs)
        wait(lambda: metric(urls["cache"], "synapse_agent_streams") >= 1, "agent", procs)
        wait(lambda: embeds(f"127.0.0.1:{node}"), "the agent's embedder", procs)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()
        log.close()


def body(question: str, system: str = SYSTEM) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}


async def ask(session: aiohttp.ClientSession, url: str, question: str,
              headers: dict[str, str] | None = None, system: str = SYSTEM) -> tuple[float, str]:
    start = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body(question, system),
                            headers={"Authorization": f"Bearer {KEY}", **(headers or {})}) as r:
        await r.read()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status} from {url}")
        return (time.perf_counter() - start) * 1000, r.headers.get("x-synapse-cache", "")


async def fill(session: aiohttp.ClientSession, url: str, texts: list[str]) -> None:
    queue = list(texts)

    async def worker() -> None:
        while queue:
            await ask(session, url, queue.pop(), {"Cache-Control": "no-cache"})
    await asyncio.gather(*(worker() for _ in range(16)))


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


async def measure(urls: dict[str, str], stored: list[str], paraphrases: list[str],
                  fresh: list[str], n: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {k: {"cache": [], "nocache": []}
                                              for k in ("exact", "semantic", "miss",
                                                        "miss_new_scope")}
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        await fill(session, urls["cache"], stored)
        print(f"filled the scope with {len(stored)} entries through the API in "
              f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
        await settle(urls["cache"])
        entries = metric(urls["cache"], "synapse_cache_stores_total", '{layer="semantic"}')
        print(f"{entries:.0f} entries in L2", file=sys.stderr)
        await asyncio.sleep(3)      # the background flush after the last writes
        for text in stored[:50]:    # warm-up: connections, code paths
            await ask(session, urls["cache"], text)
            await ask(session, urls["nocache"], text)
        for text in stored[50:50 + n]:
            ms, status = await ask(session, urls["cache"], text)
            if status == "hit-exact":
                out["exact"]["cache"].append(ms)
            out["exact"]["nocache"].append((await ask(session, urls["nocache"], text))[0])
        for text in paraphrases:
            ms, status = await ask(session, urls["cache"], text)
            if status == "hit-semantic":
                out["semantic"]["cache"].append(ms)
                out["semantic"]["nocache"].append((await ask(session, urls["nocache"], text))[0])
        for text in fresh[:n]:
            ms, status = await ask(session, urls["cache"], text)
            if status == "miss":
                out["miss"]["cache"].append(ms)
            out["miss"]["nocache"].append((await ask(session, urls["nocache"], text))[0])
        for i, text in enumerate(fresh[:n]):    # a new conversation: its scope is empty
            system = f"{SYSTEM} Conversation {i}."
            ms, status = await ask(session, urls["cache"], text, system=system)
            if status == "miss":
                out["miss_new_scope"]["cache"].append(ms)
            out["miss_new_scope"]["nocache"].append(
                (await ask(session, urls["nocache"], text, system=system))[0])
    return out


def texts_from(pairs_file: str, entries: int, queries: int
               ) -> tuple[list[str], list[str], list[str]]:
    pairs = calibrate.read_pairs(pairs_file)
    stored: dict[str, None] = {}
    paraphrases: list[str] = []
    for a, b, label in zip(pairs.text_a, pairs.text_b, pairs.label, strict=True):
        if len(stored) >= entries:
            break
        if a not in stored and b not in stored:
            stored[a] = None
            if label == 1 and len(paraphrases) < 4 * queries:
                paraphrases.append(b)
    used = set(stored) | set(paraphrases)
    fresh = [t for t in dict.fromkeys(pairs.text_b[::-1]) if t not in used][:queries]
    return list(stored), paraphrases, fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=str(pathlib.Path(__file__).resolve().parents[2]
                                               / "shared" / "data" / "qqp_pairs_dev.jsonl.gz"))
    parser.add_argument("--entries", type=int, default=10_000, help="entries in the scope")
    parser.add_argument("--queries", type=int, default=300, help="requests per scenario")
    parser.add_argument("--tuning", default="none",
                        help="the agent's embedder.tuning (none: plain all-MiniLM-L6-v2)")
    parser.add_argument("--verifier", default=None,
                        help="cache.verifier_path (default: shipped; must fit --tuning)")
    parser.add_argument("--embedder-id", default=None,
                        help="cache.embedder_id (default: the untuned MiniLM's)")
    parser.add_argument("--pair-scorer", default="shipped",
                        help="the agent's embedder.pair_scorer (shipped, the default as in "
                        "production, a tune-pair-scorer file, or none); not none also turns "
                        "cache.pair_scorer on (the shipped verifier's stack) unless "
                        "--verifier names a file of its own")
    parser.add_argument("--baseline-pair-scorer", default="none",
                        help="the same run again with this embedder.pair_scorer, printed "
                        "beside it (default none: the verifier alone); '' skips it")
    parser.add_argument("--pair-scorer-precision", default="float32",
                        choices=("float32", "bfloat16"),
                        help="the agent's embedder.pair_scorer_precision")
    parser.add_argument("--baseline-pair-scorer-precision", default=None,
                        choices=("float32", "bfloat16"),
                        help="the baseline run's (default: --pair-scorer-precision)")
    args = parser.parse_args(argv)
    base_precision = args.baseline_pair_scorer_precision or args.pair_scorer_precision
    # SIGTERM unwinds like Ctrl-C, so the process tree is always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stored, paraphrases, fresh = texts_from(args.pairs, args.entries, args.queries)
    result = run(args, args.pair_scorer, stored, paraphrases, fresh,
                 args.pair_scorer_precision)
    ours = (args.pair_scorer, args.pair_scorer_precision)
    theirs = (args.baseline_pair_scorer, base_precision)
    if args.baseline_pair_scorer and theirs != ours:
        result["baseline"] = run(args, args.baseline_pair_scorer, stored, paraphrases, fresh,
                                 base_precision)
        print("\nsemantic hit / added miss p50 (ms), hits: "
              f"pair scorer {' '.join(ours)}: {result['semantic_hit_p50_ms']} / "
              f"{result['miss_added_p50_ms']}, {result['semantic_hits']}; "
              f"{' '.join(theirs)}: {result['baseline']['semantic_hit_p50_ms']} / "
              f"{result['baseline']['miss_added_p50_ms']}, "
              f"{result['baseline']['semantic_hits']}")
    print(json.dumps(result))
    return 0


def run(args: argparse.Namespace, pair_scorer: str, stored: list[str],
        paraphrases: list[str], fresh: list[str], precision: str = "float32"
        ) -> dict[str, Any]:
    """One measurement with the agent's ``embedder.pair_scorer`` = ``pair_scorer`` (and
    ``pair_scorer_precision`` = ``precision``): its table printed, its result returned."""
    with tempfile.TemporaryDirectory() as tmp, fleet(
            pathlib.Path(tmp), args.entries, args.tuning, args.verifier,
            args.embedder_id, pair_scorer, precision) as urls:
        out = asyncio.run(measure(urls, stored, paraphrases, fresh, args.queries))
        parts = breakdown(urls["cache"])
        scorer_calls = {o: metric(urls["cache"], "synapse_cache_pair_scorer_total",
                                  f'{{outcome="{o}"}}')
                        for o in ("scored", "skipped", "timeout", "error", "unavailable",
                                  "mismatch")}
    print(f"cache latency through the HTTP API, {len(stored)} entries in scope (ms), "
          f"pair scorer: {pair_scorer} ({precision})")
    print(f"{'scenario':<16}{'n':>6}{'cache p50':>11}{'cache p99':>11}{'off p50':>10}"
          f"{'off p99':>10}")
    for name, m in out.items():
        print(f"{name:<16}{len(m['cache']):>6}{pct(m['cache'], 50):>11}{pct(m['cache'], 99):>11}"
              f"{pct(m['nocache'], 50):>10}{pct(m['nocache'], 99):>10}")
    miss, off = out["miss"]["cache"], out["miss"]["nocache"]
    result: dict[str, Any] = {
        "bench": "cache_latency", "entries": len(stored), "tuning": args.tuning,
        "pair_scorer": pair_scorer, "pair_scorer_precision": precision,
        "exact_hit_p50_ms": pct(out["exact"]["cache"], 50),
        "exact_hit_p99_ms": pct(out["exact"]["cache"], 99),
        "semantic_hit_p50_ms": pct(out["semantic"]["cache"], 50),
        "semantic_hit_p99_ms": pct(out["semantic"]["cache"], 99),
        "miss_added_p50_ms": round(pct(miss, 50) - pct(off, 50), 2),
        "miss_added_p99_ms": round(pct(miss, 99) - pct(off, 99), 2),
        "cache_off_p50_ms": pct(off, 50), "cache_off_p99_ms": pct(off, 99),
        "miss_new_scope_added_p50_ms": round(
            pct(out["miss_new_scope"]["cache"], 50)
            - pct(out["miss_new_scope"]["nocache"], 50), 2),
        "semantic_hits": len(out["semantic"]["cache"]),
        "semantic_queries": len(paraphrases)}
    print(f"added by the cache to a miss: p50 {result['miss_added_p50_ms']} ms, "
          f"p99 {result['miss_added_p99_ms']} ms")
    print("inside the control plane (means over the run, ms): " +
          ", ".join(f"{k} {v}" for k, v in parts.items()))
    with contextlib.suppress(OSError):
        print(f"load average during the run: {open('/proc/loadavg').read().split()[:3]}")
    result["breakdown_mean_ms"] = parts
    if pair_scorer != "none":
        print("pair scorer calls by outcome: " + ", ".join(f"{k} {v:.0f}"
                                                           for k, v in scorer_calls.items()))
        result["pair_scorer_calls"] = scorer_calls
    return result


if __name__ == "__main__":
    raise SystemExit(main())
