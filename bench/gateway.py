"""Benchmark: what the control plane costs in front of a backend.

One process tree: ``synapse simulator --time-scale 0`` (answers at once, so every
millisecond measured is HTTP and proxy work) and ``synapse controlplane`` with the
simulator as a static upstream (cache off, one tenant key; ``--limits`` gives it token
limits and a budget that are never reached, to measure their cost). The same load then goes
direct to the simulator and through the control plane, side by side:

* saturated, non-streaming: 32 concurrent clients for ``--seconds`` → requests/s;
* saturated, streaming: the same with ``stream: true`` (whole SSE stream read);
* fixed rate (``--rate``, default 300 req/s, open loop) → latency p50/p99; "added" is
  through-Synapse minus direct at the same percentile.

Direct and Synapse alternate in ``--rounds`` rounds (throughput: the median round;
latency: percentiles over all rounds), so load from anything else on the machine hits
both alike.

Variants of the control plane, each one more process measured in the same interleaved
rounds and compared with the plain one (under ``variants``): ``--tracing`` traces every
request (``tracing.sampling_ratio`` 1.0, or ``--tracing-ratio``) and exports the spans over OTLP/gRPC to
``python -m tests.otlp`` (a receiver in a process of its own); ``--access-log`` logs at
the default ``info`` level in JSON, one access-log line per request (the plain control
plane logs at ``warning``, so it writes none); ``--baseline-tree DIR`` runs the same
control plane from another source tree (before/after a change; the simulator and the
plain control plane come from ``PYTHONPATH``, as usual); ``--workers N`` (default: the
CPUs this bench may use, when more than one) runs the same control plane as a pod of N
serving processes (``http.workers``, with the Redis-server the workers need), target
``workers:N``.

Peers, when ``make bench-peers`` installed them under ``.bench-venvs/``: LiteLLM's proxy
(2 workers) and the PyPI ``vllm-router`` (round robin) in front of the same simulator,
nginx (2 workers, upstream keep-alive; the floor of what proxying costs) when
``nginx`` is on PATH, and ``python_floor`` (``bench/python_floor.py``: one uvloop process,
an httptools server and Synapse's own upstream client, no feature at all; the floor of a
Python gateway, so Synapse minus it is what its features and aiohttp cost), measured in the same interleaved rounds as Synapse (a peer whose
saturated throughput is under twice ``--rate`` gets its latency phase at half that
throughput); their ratios go under ``peers``. A peer that does not start is skipped
(said on stdout), not the run.

Last, every gateway's CPU time per proxied request — user + system of its whole process
tree (LiteLLM's workers, nginx's workers), read with psutil over ``--cpu-requests``
requests (fewer for a slow peer), median of the rounds, all gateways interleaved in the
same rounds — goes under ``cpu_us_per_request``: the figure that other load on a shared
machine moves least; the same for streamed requests (the whole SSE stream read) under
``cpu_us_per_stream_request``.

``--cpu-only`` measures only that last phase (no direct target, no throughput or latency):
the quick before/after of a change, with ``--baseline-tree`` and ``--no-peers`` (Synapse
and its variants only).

The load generator is one uvloop process with aiohttp (keep-alive); on a 2-core machine
it competes with the servers for CPU, so absolute numbers understate a real deployment;
the ratios are what to compare. Run: ``python -m bench.gateway [--seconds 8]``.
Last line: ``{"bench": "gateway", "direct_rps": …, "synapse_rps": …, "throughput_ratio":
…, "added_p50_ms": …, "added_p99_ms": …, "stream_throughput_ratio": …,
"cpu_us_per_request": {"synapse": …, "vllm_router": …, …}, "cpu_us_per_stream_request":
{…}, "variants": {…}, "peers": {…}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import aiohttp
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

MODEL = "bench-model"
KEY = "bench-key-0123456789"
PEER_KEY = "sk-bench-peer-0123456789abcdef"  # LiteLLM refuses to start without one
VENVS = REPO / ".bench-venvs"
BIN = pathlib.Path(sys.executable).parent
PEER_CPU_REQUESTS = 500     # per round, for a peer under --cpu-only



def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {url}")


class Tree:
    """Child processes of this benchmark, stopped together at the end."""

    def __init__(self, workdir: pathlib.Path) -> None:
        common.exit_on_sigterm()
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], ready: str,
              env: dict[str, str] | None = None,
              timeout: float = 90.0) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # lives as long as the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(proc)
        self.named[name] = proc
        wait_http(ready, proc, timeout)
        return proc

    def start_tcp(self, name: str, argv: list[str], port: int,
                  cwd: pathlib.Path | None = None) -> subprocess.Popen[bytes]:
        """A helper process that is ready once ``port`` on loopback accepts (no HTTP)."""
        log = open(self.workdir / f"{name}.log", "wb")  # lives as long as the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        0.5):
                return proc
            time.sleep(0.2)
        raise SystemExit(f"{name} did not start (its log: {self.workdir / name}.log)")

    def start_peer(self, name: str, argv: list[str], ready: str,
                   env: dict[str, str] | None = None) -> subprocess.Popen[bytes] | None:
        """A peer gateway, or None (said on stdout) when it does not come up: one peer
        failing to start on a loaded machine must not lose the run's other figures."""
        try:
            return self.start(name, argv, ready, env, timeout=240.0)
        except SystemExit as exc:
            print(f"{name} skipped: {exc}", flush=True)
            return None

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:   # deaf to SIGTERM: never left running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def body(i: int, stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 16, "stream": stream, "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": f"Summarise the benefits of caching, item {i}."}]}).encode()


async def one(session: aiohttp.ClientSession, url: str, i: int, stream: bool,
              headers: dict[str, str]) -> bool:
    async with session.post(url, data=body(i, stream),
                            headers={**headers, "Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status == 200


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process ``pid`` and all its descendants (children
    that exited and were reaped count through their parent's ``children_*`` times)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


async def cpu_per_request(targets: list[tuple[str, str, dict[str, str], int, int]],
                          rounds: int, clients: int = 16,
                          stream: bool = False) -> dict[str, float]:
    """CPU microseconds each gateway's process tree spends per proxied request (user +
    system time over ``n`` requests, the target's own count, median of ``rounds``
    interleaved rounds): unlike throughput, hardly moved by what else runs on the
    machine."""
    samples: dict[str, list[float]] = {name: [] for name, _, _, _, _ in targets}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(rounds):
            for name, url, headers, pid, n in targets:
                before = tree_cpu_s(pid)
                queue = iter(range(n))
                await asyncio.gather(*(_drain(session, url, headers, queue, stream)
                                       for _ in range(clients)))
                samples[name].append((tree_cpu_s(pid) - before) / n * 1e6)
    return {name: round(statistics.median(v), 1) for name, v in samples.items()}


async def _drain(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                 queue: Iterator[int], stream: bool) -> None:
    for i in queue:     # workers share the iterator: n requests in all
        await one(session, url, i, stream, headers)


async def saturate(url: str, headers: dict[str, str], seconds: float, clients: int,
                   stream: bool) -> tuple[float, int]:
    """Closed loop: ``clients`` workers back to back; (requests/s, errors)."""
    done = errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(session, url, i, stream, headers) for i in range(clients)))
        stop = time.monotonic() + seconds
        start = time.monotonic()

        async def worker(k: int) -> None:
            nonlocal done, errors
            i = k
            while time.monotonic() < stop:
                i += clients
                try:
                    ok = await one(session, url, i, stream, headers)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                done += 1
                errors += not ok

        await asyncio.gather(*(worker(k) for k in range(clients)))
        return done / (time.monotonic() - start), errors


async def fixed_rate(url: str, headers: dict[str, str], seconds: float,
                     rate: float) -> tuple[list[float], int]:
    """Open loop at ``rate`` req/s; (latencies in seconds, errors)."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(session, url, i, False, headers) for i in range(32)))

        async def timed(i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                ok = await one(session, url, i, False, headers)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

        tasks = []
        start = time.perf_counter()
        n = int(seconds * rate)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed(i)))
        await asyncio.gather(*tasks)
    return latencies, errors


def pct_ms(latencies: list[float], q: float) -> float:
    return common.nearest_rank(latencies, q) * 1000


def controlplane_config(workdir: pathlib.Path, sim_url: str, http: int, grpc: int,
                        limits: bool = False, name: str = "controlplane", workers: int = 1,
                        **sections: object) -> str:
    path = workdir / f"{name}.yaml"
    tenant: dict[str, object] = {"name": "bench", "keys": [KEY]}
    if limits:  # token limits and a budget that never refuse: their cost, not their effect
        tenant.update(tokens_per_minute=10**12, budget={"tokens": 10**15, "period": "day"},
                      models={MODEL: {"tokens_per_minute": 10**12}})
    path.write_text(json.dumps({
        # http.workers only when asked: a --baseline-tree may predate the setting
        "http": {"host": "127.0.0.1", "port": http, **({"workers": workers} if workers > 1
                                                       else {})},
        "grpc": {"host": "127.0.0.1", "port": grpc},
        "auth": {"tenants": [tenant]},
        "upstreams": [{"name": "sim", "url": sim_url, "models": [MODEL]}],
        "cache": {"enabled": False},
        "logging": {"level": "warning"},
        **sections,
    }))
    return str(path)


def variants(args: argparse.Namespace, sink: str, redis: str,
             ) -> dict[str, dict[str, object]]:
    """The extra control planes asked for, by target name: their config sections."""
    out: dict[str, dict[str, object]] = {}
    if args.workers > 1:    # a pod of serving processes; Redis is what they share
        out[workers_target(args.workers)] = {"workers": args.workers,
                                             "redis": {"url": redis}}
    if args.tracing:    # every request traced and exported to an OTLP receiver
        out["traced"] = {"tracing": {"enabled": True, "sampling_ratio": args.tracing_ratio,
                                     "endpoint": sink}}
    if args.access_log:  # the default log level: one JSON access-log line per request
        out["logged"] = {"logging": {"level": "info", "format": "json"}}
    for tree in args.baseline_tree:  # the same config, the code of another source tree
        out[tree_target(tree)] = {}
    return out


def workers_target(n: int) -> str:
    return f"workers:{n}"


def start_redis(tree: Tree) -> str:
    """A private redis-server (no persistence) for the workers variant; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--workers needs redis-server on PATH (make test installs it)")
    port = free_port()
    tree.start_tcp("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tree.workdir)], port)
    return f"redis://127.0.0.1:{port}/0"


def tree_target(tree: pathlib.Path) -> str:
    """The target name of a control plane running the code in ``tree``."""
    return f"tree:{tree.name}"


def start_sink(tree: Tree) -> str:
    """``python -m tests.otlp`` (an OTLP/gRPC receiver that counts spans) in a process of
    its own, so receiving spans does not weigh on the load generator."""
    port = free_port()
    tree.start_tcp("otlp-sink", [sys.executable, "-m", "tests.otlp", "--port", str(port)],
                   port, cwd=REPO)
    return f"http://127.0.0.1:{port}"


def compared(row: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """A variant's figures beside the plain control plane's, measured in the same rounds."""
    return {"rps": round(row["rps"], 1), "stream_rps": round(row["stream_rps"], 1),
            "rps_vs_synapse": round(row["rps"] / base["rps"], 3),
            "stream_rps_vs_synapse": round(row["stream_rps"] / base["stream_rps"], 3),
            "added_p50_ms_vs_synapse": round(row["p50_ms"] - base["p50_ms"], 3),
            "added_p99_ms_vs_synapse": round(row["p99_ms"] - base["p99_ms"], 3),
            "errors": row["errors"]}


NGINX_CONF = """daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/nginx-body;
  proxy_temp_path {dir}/nginx-proxy;
  fastcgi_temp_path {dir}/nginx-fastcgi;
  uwsgi_temp_path {dir}/nginx-uwsgi;
  scgi_temp_path {dir}/nginx-scgi;
  upstream sim {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def peers(tree: Tree, sim_url: str, workdir: pathlib.Path,
          ) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """(name, chat URL, process) of every peer gateway installed by ``make bench-peers``,
    and nginx (a plain reverse proxy with upstream keep-alive, 2 workers: the floor of
    what a proxy costs) when ``nginx`` is on PATH, and always ``bench/python_floor.py``
    (uvloop, httptools and Synapse's upstream client, no feature: the floor of a Python
    gateway)."""
    litellm = VENVS / "litellm" / "bin" / "litellm"
    if litellm.exists():
        port = free_port()
        cfg = workdir / "litellm.yaml"
        cfg.write_text(json.dumps({
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"openai/{MODEL}", "api_base": f"{sim_url}/v1", "api_key": "none"}}],
            "general_settings": {"master_key": PEER_KEY}}))
        # Offline: the bundled model cost map, no telemetry.
        proc = tree.start_peer("litellm", [str(litellm), "--config", str(cfg), "--port",
                                           str(port), "--num_workers", "2"],
                               f"http://127.0.0.1:{port}/health/liveliness",
                               env={"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                    "LITELLM_TELEMETRY": "False"})
        if proc is not None:
            yield "litellm", f"http://127.0.0.1:{port}/v1/chat/completions", proc
    router = VENVS / "vllm-router" / "bin" / "vllm-router"
    if router.exists():
        port = free_port()
        proc = tree.start_peer("vllm-router", [str(router), "--worker-urls", sim_url,
                                               "--port", str(port), "--policy", "round_robin",
                                               "--prometheus-port", str(free_port())],
                               f"http://127.0.0.1:{port}/health")
        if proc is not None:
            yield "vllm_router", f"http://127.0.0.1:{port}/v1/chat/completions", proc
    nginx = shutil.which("nginx")
    if nginx is not None:
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, port=port,
                                          upstream=sim_url.removeprefix("http://")))
        proc = tree.start_peer("nginx", [nginx, "-p", str(workdir), "-c", str(conf)],
                               f"http://127.0.0.1:{port}/health")
        if proc is not None:
            yield "nginx", f"http://127.0.0.1:{port}/v1/chat/completions", proc
    port = free_port()
    floor = str(REPO / "bench" / "python_floor.py")
    proc = tree.start_peer("python-floor", [str(BIN / "python"), floor, str(port), sim_url],
                           f"http://127.0.0.1:{port}/health")
    if proc is not None:
        yield "python_floor", f"http://127.0.0.1:{port}/v1/chat/completions", proc


async def measure(targets: list[tuple[str, str, dict[str, str]]], args: argparse.Namespace,
                  adaptive: frozenset[str] = frozenset()) -> dict[str, dict[str, float]]:
    """Measure ``targets`` in interleaved rounds, so that CPU taken by anything else on the
    machine during the run weighs on each of them alike; throughput is the median round,
    latency percentiles are over every round's requests. Targets in ``adaptive`` (peers)
    get the fixed-rate phase at ``--rate`` or half their throughput, whichever is less."""
    rounds, part = args.rounds, args.seconds / args.rounds
    rps: dict[str, list[float]] = {n: [] for n, _, _ in targets}
    srps: dict[str, list[float]] = {n: [] for n, _, _ in targets}
    lat: dict[str, list[float]] = {n: [] for n, _, _ in targets}
    errors = dict.fromkeys(rps, 0)
    for _ in range(rounds):
        for name, url, headers in targets:
            r, e1 = await saturate(url, headers, part, args.clients, False)
            sr, e2 = await saturate(url, headers, part, args.clients, True)
            # A peer slower than the fixed rate would only measure its own queue: it gets
            # half its saturated throughput instead (printed).
            at = min(args.rate, max(1.0, r / 2)) if name in adaptive else args.rate
            ls, e3 = await fixed_rate(url, headers, part, at)
            rps[name].append(r)
            srps[name].append(sr)
            lat[name].extend(ls)
            errors[name] += e1 + e2 + e3
    rows = {}
    for name, _, _ in targets:
        at = (min(args.rate, max(1.0, statistics.median(rps[name]) / 2)) if name in adaptive
              else args.rate)
        row = rows[name] = {
            "rps": statistics.median(rps[name]), "stream_rps": statistics.median(srps[name]),
            "p50_ms": pct_ms(lat[name], 0.5), "p99_ms": pct_ms(lat[name], 0.99),
            "errors": errors[name], "rate": at}
        print(f"{name:<14} {row['rps']:>9.0f} {row['stream_rps']:>11.0f} {row['p50_ms']:>9.2f} "
              f"{row['p99_ms']:>9.2f} {row['errors']:>7}"
              + (f"   (at {at:.0f} req/s)" if at != args.rate else ""), flush=True)
    return rows


async def run(args: argparse.Namespace) -> dict[str, object]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    tree = Tree(workdir)
    try:
        sp, hp, gp = free_port(), free_port(), free_port()
        sim = f"http://127.0.0.1:{sp}"
        tree.start("simulator", [str(BIN / "synapse"), "simulator", "--port", str(sp),
                                 "--time-scale", "0", "--served-model-name", MODEL,
                                 "--log-level", "warning"], f"{sim}/health")
        cfg = controlplane_config(workdir, sim, hp, gp, args.limits)
        tree.start("controlplane", [str(BIN / "synapse"), "controlplane", "--config", cfg],
                   f"http://127.0.0.1:{hp}/ready")
        print(f"{'target':<14} {'req/s':>9} {'stream r/s':>11} {'p50 ms':>9} {'p99 ms':>9} "
              f"{'errors':>7}   (latency at {args.rate:g} req/s)", flush=True)
        auth = {"Authorization": f"Bearer {KEY}"}
        targets = [("direct", f"{sim}/v1/chat/completions", {}),
                   ("synapse", f"http://127.0.0.1:{hp}/v1/chat/completions", auth)]
        wanted = variants(args, start_sink(tree) if args.tracing else "",
                          start_redis(tree) if args.workers > 1 else "")
        trees = {tree_target(t): t.resolve() for t in args.baseline_tree}
        for name, sections in wanted.items():
            vh = free_port()
            others = {k: v for k, v in sections.items() if k != "workers"}
            vcfg = controlplane_config(workdir, sim, vh, free_port(), args.limits,
                                       name=name.replace(":", "-"),
                                       workers=int(str(sections.get("workers", 1))), **others)
            tree.start(name, [str(BIN / "synapse"), "controlplane", "--config", vcfg],
                       f"http://127.0.0.1:{vh}/ready",
                       env={"PYTHONPATH": str(trees[name])} if name in trees else None)
            targets.append((name, f"http://127.0.0.1:{vh}/v1/chat/completions", auth))
        # Peers join the same interleaved rounds: a throughput ratio between gateways
        # measured minutes apart on a shared machine would measure the machine.
        peer_headers = {"Authorization": f"Bearer {PEER_KEY}"}
        peer_procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, url, proc in (peers(tree, sim, workdir) if args.peers else ()):
            targets.append((name, url, peer_headers))
            peer_procs[name] = proc
        if args.cpu_only:
            return await cpu_only(targets, args, {
                "synapse": tree.named["controlplane"].pid,
                **{name: tree.named[name].pid for name in wanted},
                **{name: proc.pid for name, proc in peer_procs.items()}},
                frozenset(peer_procs))
        both = await measure(targets, args, adaptive=frozenset(peer_procs))
        direct, syn = both["direct"], both["synapse"]
        variant_rows = {name: compared(both[name], syn) for name in wanted}
        pids = {"synapse": tree.named["controlplane"].pid,
                **{name: tree.named[name].pid for name in wanted}}
        cpu_targets = [(n, u, h, pids[n], args.cpu_requests) for n, u, h in targets
                       if n in pids]
        peer_rows = {}
        for name, url, headers in targets:
            if name not in peer_procs:
                continue
            row = both[name]
            peer_rows[name] = {"rps": round(row["rps"], 1),
                               "throughput_ratio": round(row["rps"] / direct["rps"], 3),
                               "stream_throughput_ratio":
                                   round(row["stream_rps"] / direct["stream_rps"], 3),
                               "added_p50_ms": round(row["p50_ms"] - direct["p50_ms"], 3),
                               "latency_rate_rps": round(row["rate"], 1),
                               "synapse_rps_over_peer": round(syn["rps"] / row["rps"], 3),
                               "synapse_stream_rps_over_peer":
                                   round(syn["stream_rps"] / row["stream_rps"], 3),
                               "errors": row["errors"]}
            if (pod := both.get(workers_target(args.workers))) is not None:
                peer_rows[name]["synapse_workers_rps_over_peer"] = round(
                    pod["rps"] / row["rps"], 3)
                peer_rows[name]["synapse_workers_stream_rps_over_peer"] = round(
                    pod["stream_rps"] / row["stream_rps"], 3)
            # A slow peer gets about two seconds' worth of requests per round.
            n = max(100, min(args.cpu_requests, int(row["rps"] * 2)))
            cpu_targets.append((name, url, headers, peer_procs[name].pid, n))
        # Every gateway's CPU per request, interleaved in the same rounds.
        cpu, scpu = await cpu_whole_and_streamed(cpu_targets, args.rounds)
        for name, row in variant_rows.items():
            row["cpu_us_per_request"] = cpu[name]
            row["added_cpu_us_per_request"] = round(cpu[name] - cpu["synapse"], 1)
            row["cpu_ms_per_request"] = round(cpu[name] / 1000, 4)
            row["added_cpu_ms_per_request"] = round((cpu[name] - cpu["synapse"]) / 1000, 4)
        for name, row in peer_rows.items():
            row["cpu_us_per_request"] = cpu[name]
            row["cpu_us_per_stream_request"] = scpu[name]
    finally:
        tree.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"bench": "gateway", "direct_rps": round(direct["rps"], 1),
            "synapse_rps": round(syn["rps"], 1),
            "throughput_ratio": round(syn["rps"] / direct["rps"], 3),
            "added_p50_ms": round(syn["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(syn["p99_ms"] - direct["p99_ms"], 3),
            "stream_throughput_ratio": round(syn["stream_rps"] / direct["stream_rps"], 3),
            "rate_rps": args.rate, "limits": args.limits, "tracing_ratio": args.tracing_ratio,
            "synapse_cpu_ms_per_request": round(cpu["synapse"] / 1000, 4),
            "cpu_us_per_request": cpu, "cpu_us_per_stream_request": scpu,
            "variants": variant_rows,
            "peers": peer_rows}


async def cpu_whole_and_streamed(targets: list[tuple[str, str, dict[str, str], int, int]],
                                 rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Every target's CPU µs per whole and per streamed request, each printed."""
    cpu = await cpu_per_request(targets, rounds)
    print("CPU µs per request (process tree, user + system): "
          + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()), flush=True)
    scpu = await cpu_per_request(targets, rounds, stream=True)
    print("CPU µs per streamed request: "
          + ", ".join(f"{k} {v:.0f}" for k, v in scpu.items()), flush=True)
    return cpu, scpu


async def cpu_only(targets: list[tuple[str, str, dict[str, str]]], args: argparse.Namespace,
                   pids: dict[str, int], peer_names: frozenset[str]) -> dict[str, object]:
    """``--cpu-only``: every gateway's CPU per request (whole and streamed answers), no
    throughput or latency phase; the quick before/after of a change with
    ``--baseline-tree``. Peers, whose throughput is not measured then, get at most
    ``PEER_CPU_REQUESTS`` requests per round (a slow one would hold the run up)."""
    cpu_targets = [(n, u, h, pids[n], min(args.cpu_requests, PEER_CPU_REQUESTS)
                    if n in peer_names else args.cpu_requests)
                   for n, u, h in targets if n in pids]
    cpu, scpu = await cpu_whole_and_streamed(cpu_targets, args.rounds)
    return {"bench": "gateway", "cpu_only": True, "limits": args.limits,
            "cpu_us_per_request": cpu, "cpu_us_per_stream_request": scpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rate", type=float, default=300.0, help="fixed-rate phase, req/s")
    parser.add_argument("--rounds", type=int, default=3,
                        help="direct and Synapse alternate this many times")
    parser.add_argument("--limits", action="store_true",
                        help="give the tenant token limits and a budget (never reached), as "
                        "well as the usage accounting that is always on")
    parser.add_argument("--tracing", action="store_true",
                        help="also measure a control plane tracing every request (ratio 1.0) "
                        "to an OTLP receiver, in the same rounds (target 'traced')")
    parser.add_argument("--tracing-ratio", type=float, default=1.0,
                        help="tracing.sampling_ratio of the traced control plane")
    parser.add_argument("--baseline-tree", type=pathlib.Path, metavar="DIR", action="append",
                        default=[],
                        help="also measure a control plane running the code in DIR (e.g. "
                        "`git archive COMMIT | tar -x -C DIR`), same config: before/after "
                        "a change, in the same rounds (target 'tree:<DIR name>'); repeat it "
                        "to measure several trees, e.g. to find the commit that changed a "
                        "figure")
    parser.add_argument("--cpu-requests", type=int, default=2000,
                        help="requests per round of the CPU-per-request phase")
    parser.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                        help="also measure the control plane as a pod of this many serving "
                        "processes (http.workers; target 'workers:N'); 1 = not measured")
    parser.add_argument("--access-log", action="store_true",
                        help="also measure a control plane at the default log level, writing "
                        "one JSON access-log line per request (target 'logged')")
    parser.add_argument("--cpu-only", action="store_true",
                        help="measure only the CPU per request of each gateway (no "
                        "throughput or latency phase, no direct target)")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="leave out the peer gateways (LiteLLM, vllm-router, nginx, "
                        "python_floor): Synapse and its variants only")
    args = parser.parse_args()
    result = common.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
