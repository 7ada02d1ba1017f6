"""Benchmark: a quiet tenant's time to first token while a noisy tenant floods the fleet.

One process tree: 4 engine simulators (``realistic`` profile: Llama-3.1-8B on an H100,
time-scaled by ``--time-scale``) as static upstreams of two ``synapse controlplane``
processes that differ only in ``fairness.queue.enabled`` (off: today's behaviour, every
request goes on to an engine's FIFO queue; on: requests wait in the control plane's fair
queue while the best backend is saturated — every seat taken, the seat count given as
``upstreams[].max_num_seqs`` (``--seats learned``: learned from the engine's metrics, read
every ``--report-interval`` real seconds as upstreams of kind ``vllm``) — or its streamed
prefill queue above ``--queue-bound``).

Tenants: *quiet* (class ``interactive``) sends its normal load, RAG-like streamed
requests (``--quiet-prompt`` tokens of unique context, 32 tokens out) as a Poisson
process at ``--quiet-rate``; *noisy* (class ``batch``) floods with non-streamed batch
requests (``--noisy-prompt`` tokens in; out uniform from 1 to twice ``--noisy-output``,
so that answers do not start and end in lockstep cohorts) at ``--flood`` times the
fleet's capacity, open loop (``--noisy-stream`` streams them instead). The capacity is the profile's steady state with every seat
(``max_num_seqs``) of every engine busy, printed with the figures.

Phases (each on fresh texts, the engines idle before each):

1. quiet alone (queue off);
2. flood + quiet, queue off;
3. flood + quiet, queue on;
4. (``--phases …,hold0``) flood + quiet, queue on with ``fairness.queue.max_seat_hold_s``
   0: a request goes on whenever one seat is free, whatever its size — the rule before
   requests waited for all their seats. With ``--noisy-n N`` each noisy request asks for
   ``n: N`` (N seats; the flood's rate is divided by N to stay ``--flood`` times the
   capacity), which is where the two rules differ.
5. (``--phases …,pod``) one queue for a pod's workers: flood + quiet, queue on, both
   tenants in the same class (``interactive``: the fair-queuing order between the tenants
   of a class is what a pod's workers share, :mod:`controlplane.core.shared_routing`),
   side by side on two more control planes that differ only in ``http.workers``: 1, then
   ``--pod-workers`` (2) (and the pod's log level: its workers say at info when they
   serve). Both get ``redis.url`` (a ``redis-server`` this bench starts on a free port in
   its temporary directory, a database each), which a pod of workers needs. The client's
   connections spread over the workers as the kernel hands them out; both configurations
   get the same arrivals from each tenant. With ``--noisy-n N`` every noisy request needs
   N seats at once, which is where workers that ordered their own queues alone starved
   the quiet tenant. For the quiet tenant each row gives its requests completed (whole
   answers, all the phase), TTFT p50/p90 and errors: the pod's beside the one process's.
   Run it alone (the other phases' control planes are then not started) on engines of as
   many seats as ``--noisy-n``, so that each noisy request needs every seat of one, and
   with short quiet prompts, so that the quiet tenant's own load fits in its share of so
   small a fleet: ``python bench/fairness.py --phases pod --noisy-n 4 --max-num-seqs 4
   --quiet-prompt 100 --seconds 20``. With the default 256 seats an ``n: 4`` request is a
   small part of an engine and the order of the workers' queues hardly shows.

Printed: the quiet tenant's TTFT p50/p90 (simulated seconds: measured / time scale) in
each phase, its TTFTs counted after the warm-up ("quiet") and requests completed in the
whole phase ("done"), what became of the noisy requests, and the fleet's throughput over the
flood phases' measurement window: tokens processed, prompt and generation (the engines'
own ``vllm:prompt_tokens`` and ``vllm:generation_tokens`` counters, so partly generated
answers count; generation alone beside it: a quiet request's long prefill is work the
fleet does, which serving the quiet tenant moves from the queue-off phase's backlog into
the window) per simulated second of each engine's own clock
(``simulator:simulated_seconds``: modelled step durations plus idle time), summed over the engines — what the modelled GPUs did, which
the machine's other load does not change — and, beside it ("wall"), per real second
divided by the time scale, which it does: on 2 cores the control planes, the client and
four simulators share the CPU, and a phase whose control plane works harder slows every
simulated step. Also the sequences running and the requests waiting per engine (means
of samples taken each real second).
Figures come from the simulator only (no real engine here).

Run from anywhere: ``python bench/fairness.py [--time-scale 2] [--seconds 30]`` (or
``python -m bench.fairness`` from the repository). Last line:
``{"bench": "fairness", "quiet_p90_alone_s": …, "quiet_p90_flood_queue_off_s": …,
"quiet_p90_flood_queue_on_s": …, "throughput_ratio_on_vs_off": …}``; with the pod phase
also, per configuration (``1_worker``, ``2_workers``): ``quiet_sent_same_class_…``,
``quiet_completed_same_class_…``, ``quiet_p50_same_class_…_s``,
``quiet_p90_same_class_…_s``, ``quiet_errors_same_class_…``, ``noisy_ok_same_class_…``
(NaN or 0 for phases not run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import random
import re
import shutil
import subprocess
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

from bench import common  # noqa: E402
from bench.gateway import Tree, start_redis  # noqa: E402
from bench.routing import text  # noqa: E402
from bench.scrape import metrics_page  # noqa: E402
from simulator import profiles  # noqa: E402
from synapse_common.ports import free_port  # noqa: E402

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
QUIET_KEY = "bench-fair-quiet-0123456789"
NOISY_KEY = "bench-fair-noisy-0123456789"
ADMIN = "bench-fair-admin-0123456789"
SIMS = 4
QUIET_OUTPUT = 32
BIN = pathlib.Path(sys.executable).parent


@dataclasses.dataclass
class Phase:
    quiet_ttft: list[float] = dataclasses.field(default_factory=list)   # simulated s
    quiet_errors: int = 0
    quiet_sent: int = 0
    quiet_started: int = 0                                              # first token seen
    quiet_completed: int = 0                                 # whole answers, all the phase
    noisy: dict[str, int] = dataclasses.field(default_factory=dict)     # outcome -> count
    tokens_per_s: float = 0.0          # prompt + generation tokens processed, per
                                       # simulated second of the engines' own clocks
    generated_per_s: float = 0.0       # generation tokens alone, likewise
    wall_tokens_per_s: float = 0.0     # tokens per real second / time scale (host delays)
    running: float = 0.0        # sequences running per engine, mean of the window's samples
    engine_waiting: float = 0.0     # requests waiting inside an engine, likewise
    sample: dict[int, str] = dataclasses.field(default_factory=dict)  # an error body each
    all_sent: bool = False
    waiting: dict[int, float] = dataclasses.field(default_factory=dict)  # counted, no token
    censored: list[float] = dataclasses.field(default_factory=list)
    quiet_done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def progress(self) -> None:
        """Note a quiet request's first token or error (all in: ``quiet_done``)."""
        if self.all_sent and self.quiet_started + self.quiet_errors >= self.quiet_sent:
            self.quiet_done.set()


# -- the fleet ------------------------------------------------------------------------------


def capacity_rps(args: argparse.Namespace) -> float:
    """Noisy requests per simulated second the fleet finishes with every seat busy."""
    p = profiles.REALISTIC
    seats = args.max_num_seqs
    admitted = seats / args.noisy_output          # seats freed (and refilled) per step
    step = (p["decode_base_s"] + p["decode_per_seq_s"] * seats
            + admitted * args.noisy_prompt * p["prefill_s_per_token"])
    return float(SIMS * admitted / step / args.noisy_n)


@dataclasses.dataclass(frozen=True)
class Plane:
    """One control plane of the bench."""

    name: str
    queue: bool                 # fairness.queue.enabled
    hold: float                 # fairness.queue.max_seat_hold_s (simulated seconds)
    workers: int = 1            # http.workers (given with redis.url: the pod phase)
    same_class: bool = False    # the noisy tenant in the quiet tenant's class


def planes(args: argparse.Namespace) -> list[Plane]:
    """The control planes the asked phases need (only those are started)."""
    phases = args.phases
    out = []
    if phases & {"alone", "off"}:
        out.append(Plane("off", False, 0.0))
    if "on" in phases:
        out.append(Plane("on", True, args.seat_hold))
    if "hold0" in phases:
        out.append(Plane("hold0", True, 0.0))
    if "pod" in phases:
        out += [Plane("pod1", True, args.seat_hold, 1, True),
                Plane("pod", True, args.seat_hold, args.pod_workers, True)]
    return out


def start(tree: Tree, workdir: pathlib.Path, args: argparse.Namespace,
          ) -> tuple[list[str], dict[str, str]]:
    sims = []
    for i in range(SIMS):
        port = free_port()
        tree.start(f"sim-{i}", [str(BIN / "synapse"), "simulator", "--port", str(port),
                                "--served-model-name", MODEL, "--time-scale",
                                str(args.time_scale), "--max-num-seqs", str(args.max_num_seqs),
                                "--seed", str(i), "--log-level", "warning"],
                   f"http://127.0.0.1:{port}/health")
        sims.append(f"http://127.0.0.1:{port}")
    cps = {}
    wanted = planes(args)
    # The pod phase's planes share what a pod of workers needs, a Redis (a database each).
    redis = start_redis(tree).rsplit("/", 1)[0] if any(p.same_class for p in wanted) else ""
    databases = {p.name: f"{redis}/{db}"
                 for db, p in enumerate(p for p in wanted if p.same_class)}
    for plane in wanted:
        name = plane.name
        http = free_port()
        cfg = workdir / f"cp-{name}.yaml"
        config = controlplane_config(plane, http, sims, args, workdir / f"cp-{name}-data",
                                     databases.get(name, ""))
        cfg.write_text(yaml.safe_dump(config))
        if args.why:
            print(f"    cp-{name}: http {http}, grpc {config['grpc']['port']}", flush=True)
        proc = tree.start(f"cp-{name}", [str(BIN / "synapse"), "controlplane", "--config",
                                         str(cfg)], f"http://127.0.0.1:{http}/ready")
        if plane.workers > 1:
            serving(workdir / f"cp-{name}.log", plane.workers, proc)
        cps[name] = f"http://127.0.0.1:{http}"
    return sims, cps


def serving(log: pathlib.Path, workers: int, proc: subprocess.Popen[bytes],
            timeout: float = 120.0) -> None:
    """Until every serving worker of a pod has taken the HTTP port (each logs it once its
    mesh is joined; the primary's /ready does not wait for them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the pod's control plane exited with {proc.returncode} "
                             f"(its log: {log})")
        if log.read_text(errors="replace").count(f" of {workers} (") >= workers - 1:
            return
        time.sleep(0.5)
    raise SystemExit(f"the pod's serving workers did not all start (its log: {log})")


def controlplane_config(plane: Plane, http: int, sims: list[str], args: argparse.Namespace,
                        data_dir: pathlib.Path, redis: str = "") -> dict[str, Any]:
    """One control plane's configuration: ``redis`` (a URL) with ``plane.workers``."""
    noisy_class = "interactive" if plane.same_class else "batch"
    return {
        "replica_id": plane.name, "data_dir": str(data_dir),
        "http": {"host": "127.0.0.1", "port": http, "workers": plane.workers,
                 "upstream_first_byte_timeout_s": 600},
        "grpc": {"host": "127.0.0.1", "port": free_port()},
        **({"redis": {"url": redis}} if redis else {}),
        "auth": {"admin_key": ADMIN, "tenants": [
            {"name": "quiet", "keys": [QUIET_KEY], "priority": "interactive"},
            {"name": "noisy", "keys": [NOISY_KEY], "priority": noisy_class}]},
        # Each engine's seats as configured (--seats configured), or learned from the
        # vLLM metrics the simulators export (kind vllm), read every --report-interval
        # seconds as an agent would report them.
        "upstreams": [{"name": f"sim-{i}", "url": u, "models": [MODEL], "kind": "vllm",
                       "probe_interval_s": args.report_interval,
                       **({"max_num_seqs": args.max_num_seqs} if args.seats == "configured"
                          else {})}
                      for i, u in enumerate(sims)],
        "cache": {"enabled": False},
        # The control plane lives in real time: simulated seconds times the time scale.
        "fairness": {"queue": {"enabled": plane.queue,
                               "max_queue_wait_s": args.queue_bound * args.time_scale,
                               "deadline_s": args.deadline * args.time_scale,
                               "max_seat_hold_s": plane.hold * args.time_scale}},
        # A pod's workers say at info when they serve (serving()); no access log then.
        "logging": {"level": "info" if plane.workers > 1 else "warning"},
        **({"access_log": {"enabled": False}} if plane.workers > 1 else {})}


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for name in ("vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                 "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "simulator:simulated_seconds_total"):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", body, re.M)
        out[name.split(":")[1]] = float(m.group(1)) if m else 0.0
    return out


async def idle(sims: list[str]) -> None:
    """Until every engine has nothing running or waiting (a phase's leftovers aborted)."""
    for _ in range(600):
        states = [await asyncio.to_thread(scrape, u) for u in sims]
        if all(s["num_requests_running"] + s["num_requests_waiting"] == 0 for s in states):
            return
        await asyncio.sleep(0.5)
    raise SystemExit("the engines did not go idle between phases")


async def counters(sims: list[str]) -> list[tuple[float, float, float]]:
    """Per engine: tokens processed so far (prompt + generation), generation tokens, and
    its own simulated clock."""
    states = await asyncio.gather(*(asyncio.to_thread(scrape, u) for u in sims))
    return [(s["prompt_tokens_total"] + s["generation_tokens_total"],
             s["generation_tokens_total"], s["simulated_seconds_total"]) for s in states]


# -- the tenants ----------------------------------------------------------------------------


async def quiet_one(session: aiohttp.ClientSession, url: str, prompt: str, scale: float,
                    phase: Phase, record: bool) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": QUIET_OUTPUT, "ignore_eos": True,
            "messages": [{"role": "user", "content": prompt}]}
    t0 = time.perf_counter()
    me = id(prompt)
    if record:
        phase.waiting[me] = t0
    try:
        async with session.post(url, json=body,
                                headers={"Authorization": f"Bearer {QUIET_KEY}"}) as resp:
            if resp.status != 200:
                phase.quiet_errors += 1
                phase.waiting.pop(me, None)
                phase.progress()
                return
            first = True
            async for line in resp.content:
                if first and _has_content(line):
                    first = False
                    phase.quiet_started += 1
                    phase.waiting.pop(me, None)
                    phase.progress()
                    if record:
                        phase.quiet_ttft.append((time.perf_counter() - t0) / scale)
            if first:                           # ended without a token
                phase.quiet_errors += 1
                phase.waiting.pop(me, None)
                phase.progress()
            else:
                phase.quiet_completed += 1
    except (aiohttp.ClientError, TimeoutError):
        phase.quiet_errors += 1
        phase.waiting.pop(me, None)
        phase.progress()


def _has_content(line: bytes) -> bool:
    """Whether an SSE line carries generated text (not the role-only opening chunk)."""
    if not line.startswith(b"data: {") or b'"content"' not in line:
        return False
    chunk = json.loads(line[6:])
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


async def noisy_one(session: aiohttp.ClientSession, url: str, prompt: str, output: int,
                    args: argparse.Namespace, phase: Phase) -> None:
    body = {"model": MODEL, "max_tokens": output, "ignore_eos": True, "n": args.noisy_n,
            "stream": args.noisy_stream, "messages": [{"role": "user", "content": prompt}]}
    try:
        async with session.post(url, json=body,
                                headers={"Authorization": f"Bearer {NOISY_KEY}"}) as resp:
            async for piece in resp.content.iter_any():
                if resp.status != 200 and resp.status not in phase.sample:
                    phase.sample[resp.status] = piece.decode(errors="replace")[:300]
            outcome = "ok" if resp.status == 200 else str(resp.status)
    except (aiohttp.ClientError, TimeoutError):
        outcome = "error"
    except asyncio.CancelledError:
        outcome = "unfinished"
        phase.noisy[outcome] = phase.noisy.get(outcome, 0) + 1
        raise
    phase.noisy[outcome] = phase.noisy.get(outcome, 0) + 1


async def arrivals(rng: random.Random, rate: float, seconds: float, scale: float,
                   start: float) -> Any:
    """Poisson arrival times (real seconds from now) for ``seconds`` simulated seconds."""
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return
        delay = start + t * scale - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield t


def why(cp: str) -> str:
    """The control plane's view after a phase: answers by tenant and status, what the
    queue refused, and the costs the router learned (``--why``)."""
    body = metrics_page(cp, ADMIN, 60)
    keep = ("synapse_requests_total", "synapse_queue_refused_total",
            "synapse_route_learned_", "synapse_queue_wait_seconds_count",
            "synapse_queue_backend_seats",
            "synapse_queue_wait_seconds_sum")
    return "\n".join("    " + line for line in body.splitlines()
                     if line.startswith(keep) and not line.endswith(" 0.0"))


async def run_phase(name: str, cp: str, sims: list[str], flood_rps: float,
                    args: argparse.Namespace, arrivals_of: str = "") -> Phase:
    """One phase. Phases given the same ``arrivals_of`` get the same arrivals, prompts'
    lengths and answers' lengths from each tenant (a random stream per tenant; each prompt
    still begins with the phase's name, so no engine finds it in its prefix cache);
    otherwise the two tenants draw from one stream."""
    phase = Phase()
    rng = random.Random(f"{args.seed}-{name}")
    quiet_rng = noisy_rng = rng
    if arrivals_of:
        quiet_rng = random.Random(f"{args.seed}-{arrivals_of}-quiet")
        noisy_rng = random.Random(f"{args.seed}-{arrivals_of}-noisy")
    url = f"{cp}/v1/chat/completions"
    scale = args.time_scale
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        window: list[Any] = []

        async def quiet() -> None:
            async for t in arrivals(quiet_rng, args.quiet_rate, args.seconds, scale, start):
                prompt = f"quiet {name} {t:.6f} " + text(quiet_rng, args.quiet_prompt)
                phase.quiet_sent += 1
                tasks.append(asyncio.create_task(quiet_one(
                    session, url, prompt, scale, phase, t >= args.warmup)))

        async def noisy() -> None:
            if not flood_rps:
                return
            async for t in arrivals(noisy_rng, flood_rps, args.seconds, scale, start):
                prompt = f"noisy {name} {t:.6f} " + text(noisy_rng, args.noisy_prompt)
                # Answers of varied lengths (uniform, mean --noisy-output): batch jobs'
                # answers differ, and equal ones would start and end in lockstep cohorts.
                output = noisy_rng.randint(1, 2 * args.noisy_output - 1)
                tasks.append(asyncio.create_task(
                    noisy_one(session, url, prompt, output, args, phase)))

        async def meter() -> None:
            await asyncio.sleep(args.warmup * scale)
            window.append(await counters(sims))
            window.append(time.perf_counter())

        samples: list[dict[str, float]] = []

        async def occupancy() -> None:
            """The engines' seats in use and queues, sampled each real second of the
            window: the machine's other load slows every simulated step alike, not these."""
            await asyncio.sleep(args.warmup * scale)
            while time.perf_counter() < start + args.seconds * scale:
                samples.extend(await asyncio.gather(
                    *(asyncio.to_thread(scrape, u) for u in sims)))
                await asyncio.sleep(1.0)

        await asyncio.gather(quiet(), noisy(), meter(), occupancy())
        if samples:
            phase.running = sum(x["num_requests_running"] for x in samples) / len(samples)
            phase.engine_waiting = sum(x["num_requests_waiting"] for x in samples) / len(samples)
        window += [await counters(sims), time.perf_counter()]
        if args.why:
            states = await asyncio.gather(*(asyncio.to_thread(scrape, u) for u in sims))
            print("    engines running/waiting: " + ", ".join(
                f"{s['num_requests_running']:.0f}/{s['num_requests_waiting']:.0f}"
                for s in states), flush=True)
            print(await asyncio.to_thread(why, cp), flush=True)
            for status, body in phase.sample.items():
                print(f"    noisy {status}: {body}", flush=True)
        first, last = window[0], window[2]
        phase.wall_tokens_per_s = (sum(e[0] for e in last) - sum(e[0] for e in first)) / (
            (window[3] - window[1]) / scale)
        pairs = [(a, b) for a, b in zip(first, last, strict=True) if b[2] > a[2]]
        phase.tokens_per_s = sum((b[0] - a[0]) / (b[2] - a[2]) for a, b in pairs)
        phase.generated_per_s = sum((b[1] - a[1]) / (b[2] - a[2]) for a, b in pairs)
        # Every quiet request gets its first token (its TTFT counts); then the rest stops.
        phase.all_sent = True
        phase.progress()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(phase.quiet_done.wait(), args.drain * scale)
        # Quiet requests still without a token count with the time they have waited so
        # far: a lower bound of their TTFT (said in the table as "censored").
        now = time.perf_counter()
        phase.censored = [(now - t0) / scale for t0 in phase.waiting.values()]
        phase.quiet_ttft += phase.censored
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await idle(sims)
    return phase


# -- report ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return common.nearest_rank(values, q)


def row(name: str, p: Phase) -> None:
    noisy = ", ".join(f"{k} {v}" for k, v in sorted(p.noisy.items())) or "-"
    if p.censored:
        noisy += f"; {len(p.censored)} quiet censored (no token yet, TTFT >= their wait)"
    print(f"{name:<22}{pct(p.quiet_ttft, 0.5):>9.3f}{pct(p.quiet_ttft, 0.9):>9.3f}"
          f"{len(p.quiet_ttft):>7}{p.quiet_completed:>7}{p.quiet_errors:>7}"
          f"{p.tokens_per_s:>10.0f}"
          f"{p.generated_per_s:>10.0f}{p.wall_tokens_per_s:>10.0f}"
          f"{p.running:>9.0f}{p.engine_waiting:>9.0f}   {noisy}", flush=True)


async def run(args: argparse.Namespace) -> dict[str, object]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    tree = Tree(workdir)
    cap = capacity_rps(args)
    flood = args.flood * cap
    print(f"fleet: {SIMS} simulators x {args.max_num_seqs} seats; noisy capacity "
          f"{cap:.1f} req/s, flood {flood:.1f} req/s; quiet {args.quiet_rate:g} req/s "
          f"of {args.quiet_prompt} tokens; time scale {args.time_scale:g}", flush=True)
    try:
        sims, cps = start(tree, workdir, args)
        print(f"{'phase':<22}{'p50 s':>9}{'p90 s':>9}{'quiet':>7}{'done':>7}{'errors':>7}"
              f"{'tok/s':>10}{'gen':>10}{'wall':>10}{'running':>9}{'waiting':>9}   noisy requests",
              flush=True)
        nan = float("nan")
        empty = Phase(quiet_ttft=[nan], tokens_per_s=nan, generated_per_s=nan,
                      wall_tokens_per_s=nan)
        alone = off = on = hold0 = pod1 = pod = empty
        if "alone" in args.phases:
            alone = await run_phase("alone", cps["off"], sims, 0.0, args)
            row("quiet alone", alone)
        if "off" in args.phases:
            off = await run_phase("off", cps["off"], sims, flood, args)
            row("flood, queue off", off)
        if "on" in args.phases:
            on = await run_phase("on", cps["on"], sims, flood, args)
            row("flood, queue on", on)
        if "hold0" in args.phases:
            hold0 = await run_phase("hold0", cps["hold0"], sims, flood, args)
            row("flood, on, no holding", hold0)
        if "pod" in args.phases:
            # the same arrivals in both: only http.workers differs
            pod1 = await run_phase("pod1", cps["pod1"], sims, flood, args, "pod")
            row("same class, 1 worker", pod1)
            pod = await run_phase("pod", cps["pod"], sims, flood, args, "pod")
            row(f"same class, {args.pod_workers} workers", pod)
    finally:
        tree.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"bench": "fairness",
            "quiet_p50_alone_s": round(pct(alone.quiet_ttft, 0.5), 4),
            "quiet_p90_alone_s": round(pct(alone.quiet_ttft, 0.9), 4),
            "quiet_p50_flood_queue_off_s": round(pct(off.quiet_ttft, 0.5), 4),
            "quiet_p90_flood_queue_off_s": round(pct(off.quiet_ttft, 0.9), 4),
            "quiet_p50_flood_queue_on_s": round(pct(on.quiet_ttft, 0.5), 4),
            "quiet_p90_flood_queue_on_s": round(pct(on.quiet_ttft, 0.9), 4),
            "quiet_p90_ratio_on_vs_alone": round(pct(on.quiet_ttft, 0.9)
                                                 / pct(alone.quiet_ttft, 0.9), 3),
            "throughput_off_tokens_per_s": round(off.tokens_per_s, 1),
            "throughput_on_tokens_per_s": round(on.tokens_per_s, 1),
            "throughput_ratio_on_vs_off": round(on.tokens_per_s / off.tokens_per_s, 3),
            "generated_ratio_on_vs_off": round(on.generated_per_s / off.generated_per_s, 3),
            "throughput_ratio_on_vs_off_wall": round(on.wall_tokens_per_s
                                                     / off.wall_tokens_per_s, 3),
            "seats_running_ratio_on_vs_off": round(on.running / off.running, 3)
            if off.running else float("nan"),
            "noisy_n": args.noisy_n,
            "quiet_p50_flood_queue_on_no_hold_s": round(pct(hold0.quiet_ttft, 0.5), 4),
            "quiet_p90_flood_queue_on_no_hold_s": round(pct(hold0.quiet_ttft, 0.9), 4),
            "throughput_on_no_hold_tokens_per_s": round(hold0.tokens_per_s, 1),
            "noisy_ok_on": on.noisy.get("ok", 0), "noisy_ok_on_no_hold": hold0.noisy.get("ok", 0),
            **pod_fields("1_worker", pod1), **pod_fields(f"{args.pod_workers}_workers", pod)}


def pod_fields(config: str, p: Phase) -> dict[str, object]:
    """The pod phase's JSON fields for one configuration (``1_worker``, ``2_workers``)."""
    return {f"quiet_sent_same_class_{config}": p.quiet_sent,
            f"quiet_completed_same_class_{config}": p.quiet_completed,
            f"quiet_p50_same_class_{config}_s": round(pct(p.quiet_ttft, 0.5), 4),
            f"quiet_p90_same_class_{config}_s": round(pct(p.quiet_ttft, 0.9), 4),
            f"quiet_errors_same_class_{config}": p.quiet_errors,
            f"noisy_ok_same_class_{config}": p.noisy.get("ok", 0)}


PHASES = ("alone", "off", "on", "hold0", "pod")


def phase_names(value: str) -> frozenset[str]:
    """``--phases``: comma-separated names, each one of :data:`PHASES`."""
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    if unknown := sorted(names - set(PHASES)):
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown)}; "
                                         f"choose from {', '.join(PHASES)}")
    return names


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-scale", type=float, default=2.0,
                        help="simulator clock (smaller = faster runs, more CPU noise)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="simulated seconds of arrivals per phase")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="simulated seconds before TTFTs and throughput count")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="simulated seconds to wait, after the arrivals, for every quiet "
                        "request's first token (those still waiting then count with the "
                        "time waited: a lower bound, shown as censored)")
    parser.add_argument("--flood", type=float, default=3.0, help="times the fleet's capacity")
    parser.add_argument("--quiet-rate", type=float, default=2.0, help="quiet requests/s")
    parser.add_argument("--quiet-prompt", type=int, default=2000, help="quiet prompt tokens")
    parser.add_argument("--noisy-prompt", type=int, default=100, help="noisy prompt tokens")
    parser.add_argument("--noisy-output", type=int, default=256,
                        help="noisy output tokens, on average (uniform from 1 to twice this)")
    parser.add_argument("--noisy-stream", action=argparse.BooleanOptionalAction,
                        default=False, help="the noisy tenant streams its answers (batch "
                        "clients mostly do not)")
    parser.add_argument("--max-num-seqs", type=int, default=int(
        profiles.REALISTIC["max_num_seqs"]), help="seats per engine (the profile's: 256)")
    parser.add_argument("--seats", choices=("configured", "learned"), default="configured",
                        help="the queue counts each engine's seats from upstreams[]."
                        "max_num_seqs (configured) or learns them from its metrics")
    parser.add_argument("--report-interval", type=float, default=1.0,
                        help="real seconds between the control plane's reads of each "
                        "engine's /metrics (upstreams[].probe_interval_s)")
    parser.add_argument("--queue-bound", type=float, default=0.1,
                        help="fairness.queue.max_queue_wait_s of the queue-on control plane "
                        "(simulated seconds)")
    parser.add_argument("--deadline", type=float, default=30.0,
                        help="fairness.queue.deadline_s of the queue-on control plane "
                        "(simulated seconds)")
    parser.add_argument("--noisy-n", type=int, default=1,
                        help="n of each noisy request: the seats it takes")
    parser.add_argument("--seat-hold", type=float, default=2.0,
                        help="fairness.queue.max_seat_hold_s of the queue-on control plane "
                        "(simulated seconds; the hold0 phase's is 0)")
    parser.add_argument("--seed", default="18")
    parser.add_argument("--phases", type=phase_names, default="alone,off,on",
                        help="which phases to run (comma-separated: alone, off, on, hold0, "
                        "pod; the first three by default)")
    parser.add_argument("--pod-workers", type=int, default=2,
                        help="http.workers of the pod phase's pod (beside one worker)")
    parser.add_argument("--why", action="store_true",
                        help="print each control plane's answers, refusals and learned costs")
    return parser


def main() -> None:
    args = parser().parse_args()
    result = common.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
