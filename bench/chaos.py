"""Benchmark: chaos — the gateway keeps serving while parts of the fleet fail.

The fleet (real processes, loopback): two ``synapse controlplane`` replicas sharing
Redis (L1 cache, rate limits, durable intent) and one Milvus Lite server (L2, run as its
own process so that it can be killed like a Milvus deployment); two ``synapse agent``
nodes, each supervising two engine simulators (four backends) and embedding through a
TEI-mode simulator; every agent streams to both replicas. The model falls back to a second
model, served by one more simulator that the replicas know as a static upstream
(``bench/chaos_fallback.py``; the fault ``primary_down`` fails every engine of the model).

Steady load (``--workers`` closed-loop clients, 70% non-streaming / 30% streaming chat,
temperature 0 so answers are cacheable, a fifth of them repeats of earlier successful
prompts) runs through a client-side balancer over both replicas — the role of a
Kubernetes Service: it follows each replica's ``GET /ready`` (probed every 0.25 s), and a
request refused or reset before any response head goes to the other replica (counted as
``lb_retries``; no gateway answered it).
Meanwhile the harness injects one fault at a time (``FAULTS``), lifts it, and waits until
the fleet is whole again before the next one.

Figures per fault: requests sent, succeeded, failed, failed while a healthy backend
existed (every failure except streams broken after their first byte — those end with an
SSE error event and count as ``failed_visible``), latency p50/p99 of the successful
non-streaming requests (what a fault costs when it costs no errors), and for the
control-plane restart the time until the restarted replica routes to all four backends
again (``reregister_s``, from its ``/health`` answering; ``start_s`` is spawn to
``/health``). The restart on existing L2 data (``restart_controlplane_l2``: replica 1
stops, Milvus restarts on the same data so its collection comes back "released", the
replica starts again) probes a stored question's case-changed copies on each replica
until they are semantic hits again (``semantic_resumed``, ``semantic_resume_s``). After the run, ``wrongly_cached`` re-asks the prompts: a prompt whose
every attempt failed must not be an exact cache hit, and a hit must equal the answer the
client originally got. Per fault, the deltas of the replicas' own
``synapse_upstream_retries_total``, ``synapse_cache_errors_total`` and
``synapse_redis_errors_total`` show what the gateway absorbed, and
``semantic_lookup_ms`` the mean time of a semantic lookup (embed + L2 search) there.

Run: ``python -m bench.chaos [--duration 8] [--workers 8] [--faults a,b]`` (or
``python path/to/bench/chaos.py`` from any directory). Not run by tests (``tests/chaos``
runs a short version of the same machinery). Last line: ``{"bench": "chaos", "requests":
…, "failed_with_healthy_backend": …, "wrongly_cached": …, "reregister_s": …,
"semantic_resumed": …, "faults": {…}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import psutil

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ and tests/ import
    sys.path.insert(0, str(REPO))

from bench import chaos_fallback, chaos_intent, common, scrape  # noqa: E402
from tests import fleet, harness  # noqa: E402

FAULTS = ["sigkill_engine", "hang_engine", "error_rate_20", "stall_stream", "kill_redis",
          "milvus_down", "kill_embedder", "restart_controlplane", "restart_controlplane_l2",
          "restart_agent", "intent_race", "primary_down"]
NODES = {"node-a": ["gen-a1", "gen-a2"], "node-b": ["gen-b1", "gen-b2"]}


# -- the fleet --------------------------------------------------------------------------


@dataclasses.dataclass
class ChaosFleet:
    tmp: pathlib.Path
    pool: harness.ProcessPool
    redis: harness.RedisServer
    urls: list[str]
    cp_configs: list[pathlib.Path]
    cps: list[harness.ManagedProcess]
    agent_configs: dict[str, pathlib.Path]
    agents: dict[str, harness.ManagedProcess]
    engine_ports: dict[str, int]
    tei_port: int
    milvus_port: int
    fallback_port: int = 0                          # the fallback model's engine
    tei: harness.ManagedProcess | None = None
    milvus: harness.ManagedProcess | None = None
    faulted: set[str] = dataclasses.field(default_factory=set)
    load: Load | None = None                        # set while run_chaos runs
    session: aiohttp.ClientSession | None = None

    # processes that come and go
    def start_tei(self) -> None:
        self.tei = self.pool.start("tei", fleet.tei_argv(self.tei_port),
                                   ready_url=f"http://127.0.0.1:{self.tei_port}/health")

    def start_fallback(self, time_scale: float) -> None:
        self.fallback_port = harness.free_port()
        self.pool.start("fallback", chaos_fallback.argv(self.fallback_port, time_scale),
                        ready_url=f"http://127.0.0.1:{self.fallback_port}/health")

    def start_milvus(self) -> None:
        # The child imports bench.chaos: the repository goes on its path, whatever the
        # working directory this bench was started from.
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.milvus = self.pool.start(
            "milvus", [sys.executable, "-m", "bench.chaos", "--milvus-server",
                       str(self.tmp / "milvus"), str(self.milvus_port)],
            ready=lambda: _port_open(self.milvus_port), timeout=60, cwd=str(REPO),
            env={"PYTHONPATH": path})

    def start_cp(self, i: int) -> harness.ManagedProcess:
        proc = self.pool.start(f"controlplane-{i}", ["synapse", "controlplane", "--config",
                                                     str(self.cp_configs[i])],
                               ready_url=f"{self.urls[i]}/health", timeout=60)
        if i < len(self.cps):
            self.cps[i] = proc
        else:
            self.cps.append(proc)
        return proc

    def start_agent(self, node: str) -> None:
        self.agents[node] = self.pool.start(node, ["synapse", "agent", "--config",
                                                   str(self.agent_configs[node])])

    def engine_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.engine_ports[name]}"

    def engine_pid(self, name: str) -> int | None:
        node = next(n for n, engines in NODES.items() if name in engines)
        port = str(self.engine_ports[name])
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.agents[node].pid).children(recursive=True):
                argv = child.cmdline()
                # the engine itself, not the reaper that leads its process group (and
                # names the engine's port in its own command line)
                if port in argv and not any(a.endswith("engine_reaper.py") for a in argv):
                    return int(child.pid)
        return None

    def ready_everywhere(self) -> bool:
        # four engines of the model and the fallback model's engine
        return all(fleet.backends_ready(u) == 5 for u in self.urls) and \
            all(_sim_ok(self.engine_url(e)) for e in self.engine_ports) and \
            _sim_ok(f"http://127.0.0.1:{self.fallback_port}")

    def healthy_backends(self) -> int:
        return 4 - len(self.faulted) + 1            # the fallback model's engine is never faulted


def _port_open(port: int) -> bool:
    import socket
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _sim_ok(url: str) -> bool:
    return harness.http_ok(f"{url}/health", timeout=1.0)


COUNTERS = ("synapse_upstream_retries_total", "synapse_cache_errors_total",
            "synapse_redis_errors_total", "synapse_fallbacks_total")
SEMANTIC = {"synapse_cache_lookup_duration_seconds_sum": "semantic_s",
            "synapse_cache_lookup_duration_seconds_count": "semantic_n"}


def counters(urls: list[str]) -> dict[str, float]:
    """Sums over both replicas of the counters an operator would watch during a fault
    (a replica that does not answer adds nothing)."""
    out = dict.fromkeys([*COUNTERS, *SEMANTIC.values()], 0.0)
    for url in urls:
        try:
            text = scrape.metrics_page(url, fleet.ADMIN_KEY, 5)
        except OSError:
            continue
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
            elif name in SEMANTIC and 'layer="semantic"' in line:
                out[SEMANTIC[name]] += float(line.rsplit(" ", 1)[1])
    return out


def set_faults(url: str, **faults: Any) -> None:
    """Sets faults on an engine the agent started: it wants its node's engine key on
    /sim/*, which the agent chose at its start (read from the engine's environment)."""
    key = harness.engine_key_at(url)
    req = urllib.request.Request(f"{url}/sim/faults", data=json.dumps(faults).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


def _cp_config(fl_tmp: pathlib.Path, i: int, http: int, grpc: int, redis_url: str,
               milvus_port: int, fallback_port: int) -> dict[str, Any]:
    return fleet.controlplane_config(
        f"replica-{i}", http, grpc, fl_tmp / f"data-{i}",
        http={"upstream_first_byte_timeout_s": 2.0, "upstream_idle_timeout_s": 2.0},
        redis={"url": redis_url, "timeout_s": 0.2},
        registry={"node_down_after_s": 3},
        cache={"semantic_enabled": True, "embed_model": fleet.EMBED,
               "milvus_uri": f"http://127.0.0.1:{milvus_port}", "l1_budget_ms": 200,
               "semantic_budget_ms": 500},
        logging={"level": "warning"}, **chaos_fallback.sections(fallback_port))


@contextlib.contextmanager
def chaos_fleet(tmp: pathlib.Path, time_scale: float = 0.005,
                agent_embedder: dict[str, Any] | None = None) -> Iterator[ChaosFleet]:
    """Start the whole fleet; stop every process on exit."""
    pool = harness.ProcessPool(tmp)
    redis = harness.RedisServer(tmp)
    http, grpc = [harness.free_port() for _ in range(2)], [harness.free_port() for _ in range(2)]
    ports = {e: harness.free_port() for engines in NODES.values() for e in engines}
    fl = ChaosFleet(tmp, pool, redis, [f"http://127.0.0.1:{p}" for p in http], [], [], {}, {},
                    ports, harness.free_port(), harness.free_port())
    try:
        fl.start_milvus()
        fl.start_tei()
        fl.start_fallback(time_scale)
        for i in range(2):
            cfg = _cp_config(tmp, i, http[i], grpc[i], redis.url, fl.milvus_port,
                             fl.fallback_port)
            fl.cp_configs.append(fleet.write_yaml(tmp / f"cp-{i}.yaml", cfg))
            fl.start_cp(i)
        addresses = [f"127.0.0.1:{p}" for p in grpc]
        for node, engines in NODES.items():
            cfg = fleet.agent_config(node, addresses, {e: ports[e] for e in engines},
                                     tmp / f"engines-{node}", time_scale=time_scale,
                                     tei_url=f"http://127.0.0.1:{fl.tei_port}")
            cfg["control_plane"].update(reconnect_min_s=0.2, reconnect_max_s=2.0)
            cfg["embedder"].update(agent_embedder or {})
            fl.agent_configs[node] = fleet.write_yaml(tmp / f"{node}.yaml", cfg)
            fl.start_agent(node)
        harness.wait_until(fl.ready_everywhere, 120, "five engines behind both replicas",
                           interval=0.3)
        yield fl
    finally:
        pool.stop_all()
        redis.stop()


# -- load ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    fault: str
    prompt: str
    stream: bool
    ok: bool
    visible: bool = False        # a stream broken after its first byte (SSE error event)
    healthy: int = 4
    status: int = 0
    cache: str = ""
    text: str = ""
    error: str = ""
    seconds: float = 0.0


class Load:
    """Closed-loop clients through a client-side balancer over the replicas."""

    def __init__(self, fl: ChaosFleet, workers: int, seed: int = 7) -> None:
        self.fl = fl
        self.workers = workers
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.fault = "none"
        self.lb_retries = 0
        self._down_until = [0.0] * len(fl.urls)
        self._ready = [True] * len(fl.urls)
        self._next = 0
        self._stop = asyncio.Event()
        self._n = 0

    def next_prompt(self) -> str:
        done = [o.prompt for o in self.outcomes[-400:] if o.ok and not o.stream]
        if done and self.rng.random() < 0.2:
            return self.rng.choice(done)
        self._n += 1
        return f"Chaos question {self._n}: what does fault {self.fault} teach us?"

    def _replicas(self) -> list[int]:
        now = time.monotonic()
        order = [(self._next + k) % len(self.fl.urls) for k in range(len(self.fl.urls))]
        self._next += 1
        up = [i for i in order if self._down_until[i] <= now and self._ready[i]]
        return up + [i for i in order if i not in up]

    async def run(self, session: aiohttp.ClientSession) -> None:
        prober = asyncio.create_task(self._probe(session))
        await asyncio.gather(*(self._worker(session) for _ in range(self.workers)))
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober

    async def _probe(self, session: aiohttp.ClientSession) -> None:
        """Readiness probe (GET /ready every 0.25 s), as a Service's endpoints follow it."""
        timeout = aiohttp.ClientTimeout(total=1.0)
        while True:
            for i, url in enumerate(self.fl.urls):
                try:
                    async with session.get(f"{url}/ready", timeout=timeout) as resp:
                        self._ready[i] = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    self._ready[i] = False
            await asyncio.sleep(0.25)

    def stop(self) -> None:
        self._stop.set()

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            prompt, stream = self.next_prompt(), self.rng.random() < 0.3
            healthy, started = self.fl.healthy_backends(), time.monotonic()
            out = await self.one(session, prompt, stream)
            out.healthy = min(healthy, self.fl.healthy_backends())
            out.seconds = time.monotonic() - started
            self.outcomes.append(out)

    async def ask(self, session: aiohttp.ClientSession, replica: int, prompt: str) -> Outcome:
        """One non-streaming request to one replica (a probe: not counted in the load)."""
        out = Outcome("probe", prompt, False, ok=False)
        body = {"model": "llama", "temperature": 0, "max_tokens": 8, "stream": False,
                "messages": [{"role": "user", "content": prompt}]}
        headers = {"Authorization": f"Bearer {fleet.TENANT_KEY}"}
        try:
            async with session.post(f"{self.fl.urls[replica]}/v1/chat/completions", json=body,
                                    headers=headers) as resp:
                out.status, out.cache = resp.status, resp.headers.get("x-synapse-cache", "")
                await _read_whole(resp, out)
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        return out

    async def one(self, session: aiohttp.ClientSession, prompt: str, stream: bool,
                  fault: str | None = None) -> Outcome:
        out = Outcome(fault or self.fault, prompt, stream, ok=False)
        body = {"model": "llama", "temperature": 0, "max_tokens": 8, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}
        headers = {"Authorization": f"Bearer {fleet.TENANT_KEY}"}
        for i in self._replicas():
            try:
                async with session.post(f"{self.fl.urls[i]}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    out.status, out.cache = resp.status, resp.headers.get("x-synapse-cache", "")
                    await (_read_stream(resp, out) if stream and resp.status == 200
                           else _read_whole(resp, out))
                return out
            except (aiohttp.ClientConnectorError, aiohttp.ClientOSError,
                    aiohttp.ServerDisconnectedError) as exc:
                if out.status:
                    out.error = f"{type(exc).__name__}: {exc}"
                    out.visible = bool(out.text)
                    return out
                # Refused or reset before any response head — the request never got an
                # answer from a gateway: the balancer tries the next replica.
                self._down_until[i] = time.monotonic() + 1.0
                self.lb_retries += 1
                out.error = f"{type(exc).__name__}: {exc}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                out.error = f"{type(exc).__name__}: {exc}"
                out.visible = out.visible or bool(out.text)
                return out
        return out


async def _read_whole(resp: aiohttp.ClientResponse, out: Outcome) -> None:
    data = await resp.json(content_type=None)
    if resp.status == 200:
        out.text = data["choices"][0]["message"]["content"] or ""
        out.ok = True
    else:
        out.error = str(data.get("error", {}).get("message", ""))[:200]


async def _read_stream(resp: aiohttp.ClientResponse, out: Outcome) -> None:
    parts: list[str] = []
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            out.ok = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            out.visible, out.error = True, str(chunk["error"].get("message", ""))[:200]
            break
        for choice in chunk.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
        out.text = "".join(parts)
    if not out.ok and not out.error:
        out.visible, out.error = bool(parts), "stream ended without [DONE]"


# -- faults -----------------------------------------------------------------------------


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(max(0.0, seconds))


async def fault_sigkill_engine(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    """SIGKILL one engine every 2 s (rotating); its agent restarts it."""
    names, end, killed = list(fl.engine_ports), time.monotonic() + duration, 0
    while time.monotonic() < end:
        victim = names[killed % len(names)]
        pid = fl.engine_pid(victim)
        if pid:
            fl.faulted.add(victim)
            with contextlib.suppress(ProcessLookupError):
                psutil.Process(pid).send_signal(signal.SIGKILL)
            killed += 1
        await _sleep(min(2.0, end - time.monotonic()))
        fl.faulted.discard(victim)
    info["killed"] = killed


LIFT: dict[str, Any] = {"hang": False, "error_rate": 0.0, "stall_after_chunks": None}


async def _sim_fault(fl: ChaosFleet, duration: float, name: str, **faults: Any) -> None:
    fl.faulted.add(name)
    await asyncio.to_thread(set_faults, fl.engine_url(name), **faults)
    try:
        await _sleep(duration)
    finally:
        lift = {k: LIFT[k] for k in faults if k in LIFT}
        await asyncio.to_thread(set_faults, fl.engine_url(name), **lift)
        fl.faulted.discard(name)


async def fault_hang_engine(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    await _sim_fault(fl, duration, "gen-a1", hang=True)


async def fault_error_rate_20(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    await _sim_fault(fl, duration, "gen-b1", error_rate=0.2)


async def fault_stall_stream(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    await _sim_fault(fl, duration, "gen-a2", stall_after_chunks=2, stall_s=1.0)


async def fault_kill_redis(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    fl.redis.kill()
    await _sleep(duration)
    await asyncio.to_thread(fl.redis.start)


async def fault_milvus_down(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    assert fl.milvus is not None
    fl.milvus.signal(signal.SIGKILL)
    await _sleep(duration)
    await asyncio.to_thread(fl.start_milvus)


async def fault_kill_embedder(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    assert fl.tei is not None
    fl.tei.signal(signal.SIGKILL)
    await _sleep(duration)
    await asyncio.to_thread(fl.start_tei)


async def fault_restart_controlplane(fl: ChaosFleet, duration: float,
                                     info: dict[str, Any]) -> None:
    """SIGTERM replica 1, start it again, time until it routes to all four backends."""
    await asyncio.to_thread(fl.cps[1].stop)
    await _sleep(min(1.0, duration / 4))
    spawned = time.monotonic()
    await asyncio.to_thread(fl.start_cp, 1)
    up = time.monotonic()
    info["start_s"] = round(up - spawned, 2)      # process spawn to /health answering
    deadline = up + 60
    info["reregistered"] = False
    while time.monotonic() < deadline:
        if await asyncio.to_thread(fleet.backends_ready, fl.urls[1]) == 5:   # 4 + fallback
            info["reregistered"] = True
            break
        await asyncio.sleep(0.05)
    info["reregister_s"] = round(time.monotonic() - up, 2)
    await _sleep(duration - (time.monotonic() - up))


SEMANTIC_PROBE = "How do I rotate the keys of a chaos fleet without downtime?"


def _variants(text: str) -> Iterator[str]:
    """Case-changed copies of ``text``, each new to the exact layer (every miss stores its
    own answer) but the same words to the embedder: semantic candidates of ``text``."""
    for i in range(2, len(text)):
        yield text[:i].upper() + text[i:]
        yield text[:i].lower() + text[i:]


async def _semantic_hit(load: Load, session: aiohttp.ClientSession, replica: int,
                        prompts: Iterator[str], answers: set[str], within_s: float) -> float | None:
    """Seconds until ``replica`` serves a semantic hit of the probe, None if it never did.

    ``answers`` holds every answer the probe's family stored so far: each missed variant
    stores its own, and a hit may rightly serve any of them (the verifier's favourite
    among the stored variants), so a hit counts when its answer is one of them. Misses
    add theirs."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        prompt = next(prompts, None)
        if prompt is None:
            break
        out = await load.ask(session, replica, prompt)
        if out.cache == "hit-semantic" and out.text in answers:
            return round(time.monotonic() - start, 2)
        if out.status == 200 and out.text and not out.cache.startswith("hit"):
            answers.add(out.text)
        await asyncio.sleep(0.3)
    return None


async def fault_restart_controlplane_l2(fl: ChaosFleet, duration: float,
                                        info: dict[str, Any]) -> None:
    """Restart replica 1 on its existing L2 data: it stops, Milvus restarts on the same
    data (its collection comes back "released", as after any Milvus or Lite restart), the
    replica starts again. Semantic hits must resume on both replicas."""
    assert fl.load is not None and fl.session is not None
    load, session, prompts = fl.load, fl.session, _variants(SEMANTIC_PROBE)
    answers = {(await load.ask(session, 1, SEMANTIC_PROBE)).text}
    seen = await _semantic_hit(load, session, 1, prompts, answers, 30)
    info["semantic_before"] = seen is not None
    await asyncio.to_thread(fl.cps[1].stop)
    assert fl.milvus is not None
    await asyncio.to_thread(fl.milvus.stop)
    await asyncio.to_thread(fl.start_milvus)
    await asyncio.to_thread(fl.start_cp, 1)
    resumed = [await _semantic_hit(load, session, i, prompts, answers, 60) for i in (1, 0)]
    info["semantic_resumed"] = None not in resumed
    info["semantic_resume_s"] = resumed
    await _sleep(duration / 4)


async def fault_restart_agent(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    """SIGTERM node-b's agent (it drains and stops its engines), then start it again."""
    fl.faulted.update(NODES["node-b"])
    await asyncio.to_thread(fl.agents["node-b"].stop)
    await _sleep(min(1.0, duration / 4))
    await asyncio.to_thread(fl.start_agent, "node-b")
    await _sleep(duration / 2)
    fl.faulted.difference_update(NODES["node-b"])


async def fault_intent_race(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    """Two replicas edit one node's intent at once (deploys, cordons): nothing lost."""
    await chaos_intent.race(fl, duration, info)


async def fault_primary_down(fl: ChaosFleet, duration: float, info: dict[str, Any]) -> None:
    """Every engine of the primary model answers 500: the fallback model serves."""
    await chaos_fallback.primary_down(fl, duration, info, set_faults)


FAULT_FUNCS: dict[str, Callable[[ChaosFleet, float, dict[str, Any]], Any]] = {
    name: globals()[f"fault_{name}"] for name in FAULTS}


# -- the run ----------------------------------------------------------------------------


async def run_chaos(fl: ChaosFleet, faults: list[str], duration: float, workers: int,
                    settle_timeout: float = 60.0) -> dict[str, Any]:
    load = Load(fl, workers)
    infos: dict[str, dict[str, Any]] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        fl.load, fl.session = load, session
        runner = asyncio.create_task(load.run(session))
        try:
            await asyncio.sleep(min(2.0, duration))       # steady state, fault "none"
            for name in faults:
                before = await asyncio.to_thread(counters, fl.urls)
                load.fault = name
                infos[name] = {}
                await FAULT_FUNCS[name](fl, duration, infos[name])
                load.fault = f"{name}:recovery"
                await _settle(fl, infos[name], settle_timeout)
                after = await asyncio.to_thread(counters, fl.urls)
                for key in COUNTERS:
                    short = key.removeprefix("synapse_").removesuffix("_total")
                    # A restarted replica starts from zero: never report negatives.
                    infos[name][short] = max(0, round(after[key] - before[key]))
                lookups = after["semantic_n"] - before["semantic_n"]
                if lookups > 0:
                    infos[name]["semantic_lookup_ms"] = round(
                        1000 * (after["semantic_s"] - before["semantic_s"]) / lookups, 1)
        finally:
            load.stop()
            await runner
        wrongly = await wrongly_cached(load, session)
    return summarize(load, infos, faults, wrongly)


async def _settle(fl: ChaosFleet, info: dict[str, Any], limit_s: float) -> None:
    """Wait until every engine is back behind both replicas before the next fault."""
    deadline = time.monotonic() + limit_s
    while not await asyncio.to_thread(fl.ready_everywhere):
        if time.monotonic() > deadline:
            info["not_recovered"] = True
            return
        await asyncio.sleep(0.2)


async def wrongly_cached(load: Load, session: aiohttp.ClientSession,
                         limit: int = 300) -> list[str]:
    """Re-ask prompts: a never-successful prompt must not be an exact hit; a hit must be
    the answer the client got before."""
    answers: dict[str, str] = {}
    failed: set[str] = set()
    for o in load.outcomes:
        if o.ok:
            answers.setdefault(o.prompt, o.text)
        else:
            failed.add(o.prompt)
    never_ok = sorted(failed - set(answers))
    sample = never_ok + sorted(answers)[:max(0, limit - len(never_ok))]
    wrong: list[str] = []
    for prompt in sample:
        out = await load.one(session, prompt, stream=False, fault="check")
        if out.cache != "hit-exact":
            continue
        if prompt not in answers or out.text != answers[prompt]:
            wrong.append(prompt)
    return wrong


def _pct(values: list[float], q: float) -> float:
    return round(1000 * common.nearest_rank(values, q), 1) if values else 0.0


def _figures(rows: list[Outcome]) -> dict[str, Any]:
    failed = [o for o in rows if not o.ok]
    ok_seconds = [o.seconds for o in rows if o.ok and not o.stream]
    return {"p50_ms": _pct(ok_seconds, 0.5), "p99_ms": _pct(ok_seconds, 0.99),"sent": len(rows), "succeeded": len(rows) - len(failed), "failed": len(failed),
            "failed_with_healthy_backend": sum(1 for o in failed
                                               if not o.visible and o.healthy > 0),
            "failed_visible": sum(1 for o in failed if o.visible),
            "streams": sum(1 for o in rows if o.stream),
            "cache_hits": sum(1 for o in rows if o.cache.startswith("hit"))}


def summarize(load: Load, infos: dict[str, dict[str, Any]], faults: list[str],
              wrongly: list[str]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for name in ["none", *faults]:
        rows = [o for o in load.outcomes if o.fault in (name, f"{name}:recovery")]
        per[name] = {**_figures(rows), **infos.get(name, {})}
        errors = sorted({o.error for o in rows if not o.ok and not o.visible})
        if errors:
            per[name]["errors"] = errors[:3]
        cut = sorted({o.error for o in rows if o.visible})
        if cut:
            per[name]["stream_cuts"] = cut[:3]
    total = _figures(load.outcomes)
    rereg = infos.get("restart_controlplane", {}).get("reregister_s")
    return {"bench": "chaos", "requests": total["sent"],
            "failed_with_healthy_backend": total["failed_with_healthy_backend"],
            "wrongly_cached": len(wrongly), "reregister_s": rereg,
            "semantic_resumed": infos.get("restart_controlplane_l2", {}).get(
                "semantic_resumed"),
            "failed_visible": total["failed_visible"], "lb_retries": load.lb_retries,
            "faults": per}


def print_table(result: dict[str, Any]) -> None:
    cols = ["sent", "succeeded", "failed", "failed_with_healthy_backend", "failed_visible",
            "cache_hits", "p50_ms", "p99_ms"]
    heads = ["sent", "ok", "failed", "failed_w_healthy", "visible", "hits", "p50 ms", "p99 ms"]
    print(f"{'fault':<22}" + "".join(f"{h:>17}" for h in heads) + "  notes")
    for name, fig in result["faults"].items():
        notes = {k: v for k, v in fig.items() if k not in cols and k != "streams"}
        print(f"{name:<22}" + "".join(f"{fig[c]:>17}" for c in cols) + f"  {notes or ''}")
    print(f"requests {result['requests']}, failed with a healthy backend "
          f"{result['failed_with_healthy_backend']}, wrongly cached {result['wrongly_cached']},"
          f" re-registration {result['reregister_s']} s, balancer retries "
          f"{result['lb_retries']}")


def milvus_server(data_dir: str, port: int) -> None:
    """``--milvus-server DIR PORT``: a standalone Milvus Lite server for the fleet."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
    server, _db, _port = start_server_in_thread(data_dir=data_dir, host="127.0.0.1",
                                                port=port)
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)
    server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per fault")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset")
    parser.add_argument("--milvus-server", nargs=2, metavar=("DIR", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.milvus_server:
        milvus_server(args.milvus_server[0], int(args.milvus_server[1]))
        return 0
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="synapse-chaos-") as tmp, \
            chaos_fleet(pathlib.Path(tmp)) as fl:
        result = asyncio.run(run_chaos(fl, faults, args.duration, args.workers))
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
