"""One backend's life under the agent: the :class:`Runner`, and the :class:`Hooks` it reports to.

A runner owns one backend: spawn → ``starting`` (polling ``/health`` until 200 or the
start-up deadline) → ``ready`` ⇄ ``unhealthy`` (liveness probes; ``unhealthy_after``
failures in a row) → exit → restart after the policy's backoff (:mod:`agent.core.backoff`).
Past ``crashloop_restarts`` restarts in ``crashloop_window_s`` the phase is ``crashloop``
and the engine is retried every ``crashloop_retry_s`` (its start-up included: ``crashloop``
until it is ready), since the cause may go away; :meth:`Runner.reset` (a DesiredBackends
command that names the backend in ``retry``: an operator deployed it again) retries at
once. ``failed`` means the command cannot be executed at all (no such binary) and waits
for :meth:`Runner.reset`; a config change restarts the agent. An engine that stays
unhealthy for ``unhealthy_restart_s``, or is not ready by the deadline, is killed and goes
through the same restart path. ``external`` backends have no process: they are only
probed.

The port is the engine's own, checked twice (:mod:`agent.process`, psutil, in a thread):

* before a start, the port must be free to bind: one held by another process would make
  the engine fail to bind while that process answers the probes. A port the agent chose
  itself (the spec names none) is replaced by a free one; a port the spec names is a
  failed start (the reason names the holder) and goes through the restart path, so the
  engine starts once the port is free again.
* a ``/health`` 200 counts only while the engine's process tree (the engine, or a child
  such as vLLM's API server) listens on the port: else some other process answered
  (one that took the port after the check), and tenants' prompts and the engine key
  must not go to it. A process sharing the port with the engine (``SO_REUSEPORT``) is
  not detected: the engine's tree listens too. Where psutil may not read the engine's
  sockets, the answer alone counts, with one warning. The check is a walk of the
  process and socket tables (hundreds of ms on a busy host), so it runs when the
  backend would become ready, then at most every :data:`OWNER_RECHECK_S` while it
  answers (every probe interval while a stranger answers, or while the sockets cannot
  be read: an answer trusted unchecked is not one to keep); a failed probe forgets it.
* ``own_port`` false (:class:`agent.config.BackendSettings`: a wrapper such as
  ``docker run``, whose engine listens outside the agent's process tree): neither
  check is made, and any answer on the port counts.

A vLLM that generates gets one warm-up request before it is reported ready
(:data:`WARMUP_PATH`, :func:`warmup_body`: one token and its logprob, with the engine
key). vLLM compiles its rank-counting kernel for logprobs (``batched_count_greater_than``
in ``vllm/v1/sample/ops/logprobs.py``, ``torch.compile`` with Inductor) on the first
request that asks for logprobs, even with ``--enforce-eager``; the compile runs inside the
engine core's step, so every request on the engine waits behind it. Without the warm-up,
one tenant's first logprobs request stalled every tenant of a fresh engine, and how long
its first answer took told that tenant whether anyone had asked for logprobs since the
engine started. The request is bounded by ``warmup_timeout_s``; when it fails or times
out the backend is ready anyway, with one warning: ``/health`` passed, so the engine
serves, and a request it refuses (``--max-logprobs 0``, a changed served name) would be
refused again after any restart; the cost of going ready is the stall the warm-up
would have hidden, once. TEI, the simulator, external backends and a vLLM that only
pools get none. Each vLLM keeps its own Inductor cache across restarts
(:class:`agent.engine_env.CompileCache`), so a restarted engine's warm-up loads the
kernel instead of compiling it again; a temporary one (when the configured cache cannot
be used) is reused across restarts and removed by :meth:`Runner.stop`.

Engine ``/metrics`` are scraped by a separate loop per runner (generation backends only)
and interpreted by :mod:`agent.core.engine_metrics`, off the event loop. At most
``synapse_common.read_limits.METRICS_MAX_BYTES`` are read (the control plane's prober reads
an upstream's to the same bound); a longer body is a failed scrape, with one warning: an
``external`` engine is any server at a URL, and its exposition, read whole and parsed on
the loop that reports the node, would hold and stall the agent. Every phase change calls
the hooks' ``on_change`` so the reporter sends a report at once.

When the engine becomes ready the runner also asks it its context length
(:mod:`agent.engine_context`: vLLM's ``/v1/models``, bounded, else the spec's explicit
length); a stopped engine's is forgotten, and the next start asks again. While ready it
asks again at the next probes after a read that got no answer (as it asks for the tasks
it could not learn), the length last read standing meanwhile, and every
:data:`CONTEXT_RECHECK_S` after one that did: an external engine replaced behind the same
URL may have another length. One small bounded read a minute per backend. Those reads
while ready run beside the probes (one at a time, cancelled when the engine stops), not
in their loop: a ``/v1/models`` that takes its whole timeout would otherwise hold every
probe that long, and an engine gone unhealthy would be noticed that much later.

No request to an engine follows a redirect (``/health``, ``/metrics``, the warm-up, the
tasks' ``/openapi.json``, ``/v1/models``; the control plane's prober follows none
either): a ``/health`` that redirects is not a 200, a ``/metrics`` that does is a failed
scrape. An external server's redirect would otherwise send the agent, with the engine key
of a backend that has one, to any URL it names.

The engine key (:mod:`synapse_common.engine_key`, when the agent has a token) goes to
each engine the runner starts through its environment (:func:`agent.core.commands.
environment`), and with every call the runner makes to it (``/health``, ``/metrics``,
``/openapi.json``, ``/v1/models``): those paths are open on vLLM and TEI, but an engine
that guards them too (llama-server guards ``/metrics``) is still probed. ``external``
backends get no key.
The engine's own output is written with the key masked (TEI prints its arguments, key
included, at start), so it reaches neither the log file nor the reported last lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
from collections.abc import Callable

import aiohttp

from agent import engine_context, engine_env, engine_tasks, process
from agent import metrics as agent_metrics
from agent.config import SupervisorSettings
from agent.core import backoff, commands, engine_metrics, types
from agent.core.types import Phase
from synapse_common import aiotasks, ports, read_limits, tasks
from synapse_common import clock as clocks
from synapse_common import engine_key as engine_keys

log = logging.getLogger("agent.supervisor")
LIVE = (Phase.STARTING, Phase.READY, Phase.UNHEALTHY)
STARTUP_POLL_S = 0.25
OWNER_RECHECK_S = 30.0  # while ready: how long an ownership answer stands
CONTEXT_RECHECK_S = 60.0  # while ready: how long a context length read stands
WARMUP_PATH = "/v1/completions"
WARMUP_REASON = "warming up: one request asking for logprobs"


def warmup_body(spec: types.EngineSpec) -> dict[str, object]:
    """The warm-up request: one greedy token of a fixed prompt, with its logprob (the
    request that makes vLLM compile its logprobs kernel)."""
    return {"model": spec.models[0], "prompt": "Hello", "max_tokens": 1, "logprobs": 1,
            "temperature": 0}


class Hooks:
    """What runners report upwards: state changes and counters."""

    def __init__(self, metrics: agent_metrics.Metrics, node: str,
                 on_change: Callable[[], None]) -> None:
        self.metrics = metrics
        self.node = node
        self.on_change = on_change

    def restarted(self, backend: str) -> None:
        self.metrics.backend_restarts.labels(self.node, backend).inc()

    def scrape_failed(self, backend: str) -> None:
        self.metrics.engine_scrape_errors.labels(self.node, backend).inc()


class Runner:
    def __init__(self, spec: types.EngineSpec, cfg: SupervisorSettings,
                 session: aiohttp.ClientSession, hooks: Hooks, advertise_host: str,
                 managed: bool = False, timing: clocks.Time = clocks.Time(),
                 engine_key: str | None = None,
                 owns: Callable[[int, int], bool | None] = process.tree_listens,
                 secret_env: frozenset[str] = frozenset()) -> None:
        self.spec = spec
        self._secret_env = secret_env   # not inherited by the engine (agent.process)
        # never in reports or logs; external backends are not ours to key
        self._key = engine_key if spec.engine != "external" else None
        self._auth = engine_keys.headers(self._key)
        self.cfg = cfg
        self.managed = managed
        self._session = session
        self._hooks = hooks
        self._advertise_host = advertise_host
        self._time = timing
        self.port = spec.port or (0 if spec.engine == "external" else ports.free_port(cfg.engine_host))
        if spec.engine == "external":
            self.probe_url = self.url = (spec.url or "").rstrip("/")
        else:
            self.probe_url = f"http://{_dialable(cfg.engine_host)}:{self.port}"
            self.url = f"http://{advertise_host}:{self.port}"
        self.phase = Phase.STARTING
        self.reason = "not started"
        self.restarts = 0
        self.last_restart_ms = 0
        self.started_ms = 0
        self.pid = 0
        self.snapshot: types.EngineSnapshot | None = None
        self.snapshot_at = 0.0
        self.hit_rate = 0.0
        self.metrics_ok = False
        # a scrape since the last that worked was over the bound (warned once)
        self._warned_too_long = False
        self.tasks: tuple[str, ...] = spec.tasks or (spec.task,)
        self._tasks_known = bool(spec.tasks)
        self.max_model_len = 0   # the running engine's (agent.engine_context); 0 = unknown
        self._context_read_at: float | None = None  # when it answered; None: ask again
        self._context_read: asyncio.Task[None] | None = None  # a read while ready
        self.sink = process.LogSink(pathlib.Path(cfg.log_dir) / f"{spec.name}.log",
                                    cfg.log_max_bytes, cfg.log_tail_lines,
                                    secrets=(self._key,) if self._key else ())
        self._policy = backoff.RestartPolicy(
            timing.monotonic, backoff.Backoff(cfg.backoff_initial_s, cfg.backoff_max_s),
            cfg.crashloop_restarts, cfg.crashloop_window_s, cfg.crashloop_retry)
        self._engine: process.EngineProcess | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._exit_reason = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._stranger = ""            # who answered the last probe, when not our engine
        self._ownership_warned = False
        self._owns = owns              # process.tree_listens (blocking, run in a thread)
        self._owner: tuple[float, bool, str] | None = None  # (stands until, owned, stranger)
        self._compile_cache = engine_env.CompileCache(cfg, spec.name)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        main = self._run_external() if self.spec.engine == "external" else self._run_process()
        self._tasks = [asyncio.create_task(main, name=f"runner-{self.spec.name}")]
        if self.spec.task == "generate":
            self._tasks.append(asyncio.create_task(self._scrape_loop()))

    async def stop(self) -> None:
        """Stop for good: SIGTERM, SIGKILL after ``stop_grace_s``; ends in ``stopped``, its
        temporary compile cache (if it had one) removed."""
        self._stopping = True
        self._wake.set()
        if self._engine is not None:
            await self._engine.terminate(self.cfg.stop_grace_s)
        # A process runner's loop ends by itself once its engine exited; an external
        # runner only probes, so its loop is cancelled like the scrape loop.
        keep = 0 if self.spec.engine == "external" else 1
        for task in self._tasks[:keep]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await aiotasks.stop(*self._tasks[keep:])
        await self._stop_context_read()
        # The engine has exited: a temporary compile cache it used goes with it.
        await asyncio.to_thread(self._compile_cache.remove)
        self._set(Phase.STOPPED, "stopped")
        self.sink.close()

    def reset(self) -> None:
        """Leave ``crashloop``/``failed`` and try again (an operator asked for it)."""
        if self.phase in (Phase.CRASHLOOP, Phase.FAILED):
            self._policy.reset()
            self._wake.set()

    def _set_port(self, port: int) -> None:
        self.port = port
        self.probe_url = f"http://{_dialable(self.cfg.engine_host)}:{port}"
        self.url = f"http://{self._advertise_host}:{port}"

    def _set(self, phase: Phase, reason: str) -> None:
        if (phase, reason) == (self.phase, self.reason):
            return
        if phase != self.phase:
            level = logging.WARNING if phase in (Phase.CRASHLOOP, Phase.FAILED,
                                                 Phase.UNHEALTHY) else logging.INFO
            log.log(level, "backend %s: %s → %s (%s)", self.spec.name, self.phase.value,
                    phase.value, reason)
        changed = phase != self.phase
        self.phase, self.reason = phase, reason
        if changed:
            self._hooks.on_change()

    def _now_ms(self) -> int:
        return int(self._time.wall() * 1000)

    async def _sleep_or_wake(self, seconds: float | None) -> None:
        if self._stopping:
            return  # stop() may have set the event before this sleep began
        self._wake.clear()
        await self._time.sleep(seconds, self._wake)

    # -- process backends --------------------------------------------------------------
    def _argv(self) -> list[str]:
        argv = commands.build(self.spec, self.cfg.engine_host, self.port,
                              simulator_command=self.cfg.simulator_command,
                              vllm_command=self.cfg.vllm_command,
                              tei_command=self.cfg.tei_command,
                              guarded=bool(self._key),
                              on_cpu=engine_env.on_cpu(self.cfg, self.cfg.vllm_command))
        assert argv is not None
        return argv

    def _env(self) -> dict[str, str]:
        """The node's defaults for the engine kind (vLLM's CPU variables and its compile
        cache), then the spec's."""
        base = ({**engine_env.vllm_environment(self.cfg, self.cfg.vllm_command),
                 **self._compile_cache.environment()}
                if self.spec.engine == "vllm" else {})
        return {**base, **commands.environment(self.spec, self._key,
                                               os.environ.get("PYTHONPATH", ""))}

    async def _spawn(self) -> bool:
        argv = self._argv()
        try:
            self._engine = await process.EngineProcess.spawn(argv, self._env(), self.sink,
                                                             withheld=self._secret_env)
        except OSError as exc:
            self._set(Phase.FAILED, f"cannot run {argv[0]}: {exc.strerror or exc}")
            return False
        self.pid, self.started_ms = self._engine.pid, self._now_ms()
        self._exit_reason = ""
        if self.phase == Phase.CRASHLOOP:   # crashloop until a retry is ready
            self._set(Phase.CRASHLOOP, "retrying: waiting for /health")
        else:
            self._set(Phase.STARTING, "waiting for /health")
        return True

    async def _port_taken(self) -> str | None:
        """Why the engine's port cannot be used now (None: it can). A port the agent chose
        is replaced by a free one instead."""
        holder = await asyncio.to_thread(process.port_holder, self.cfg.engine_host, self.port)
        if holder is None:
            return None
        if self.spec.port is None:
            old = self.port
            self._set_port(ports.free_port(self.cfg.engine_host))
            log.warning("backend %s: port %d is held by %s; using port %d", self.spec.name,
                        old, holder, self.port)
            return None
        return f"port {self.port} is held by {holder}, not by an engine of this agent"

    async def _run_process(self) -> None:
        spawned_before = False
        while not self._stopping:
            taken = await self._port_taken() if self.spec.own_port else None
            if taken:
                self.sink.note(taken)
                await self._after_exit(taken, loaded=False)
                continue
            if spawned_before:
                self.restarts += 1
                self.last_restart_ms = self._now_ms()
                self._hooks.restarted(self.spec.name)
            spawned_before = True
            if not await self._spawn():
                await self._sleep_or_wake(None)  # until reset() or stop()
                continue
            assert self._engine is not None
            if self._stopping:  # stop() arrived while the process was being spawned
                await self._engine.terminate(self.cfg.stop_grace_s)
            probe = asyncio.create_task(self._probe_process(self._engine))
            code = await self._engine.wait()
            await aiotasks.stop(probe)
            await self._stop_context_read()
            self._engine, self.pid, self.snapshot, self.metrics_ok = None, 0, None, False
            self.max_model_len, self._context_read_at = 0, None
            self._owner = None
            if self._stopping:
                break
            await self._after_exit(self._exit_reason or f"exited with code {code}")

    async def _after_exit(self, why: str, *, loaded: bool = True) -> None:
        """Wait out the restart policy's delay (``loaded``: the failed start loaded the
        model, so a crash loop's retry waits its longer period)."""
        decision = self._policy.on_exit(loaded=loaded)
        self.sink.note(f"{why}; {'crashloop: ' if decision.crashloop else ''}{decision.reason}")
        self._set(Phase.CRASHLOOP if decision.crashloop else Phase.UNHEALTHY,
                  f"{why}; {decision.reason}")
        await self._sleep_or_wake(decision.delay_s)

    async def _probe_process(self, engine: process.EngineProcess) -> None:
        deadline = self._time.monotonic() + self.cfg.startup_deadline_s
        while not await self._probe():
            if self._stranger:
                self._set(self.phase, self._stranger)
            if self._time.monotonic() > deadline:
                self._exit_reason = (f"not ready within {self.cfg.startup_deadline_s:g}s"
                                     + (f" ({self._stranger})" if self._stranger else ""))
                engine.kill()
                return
            await self._time.sleep(min(STARTUP_POLL_S, self.cfg.probe_interval_s))
        self._policy.on_ready()
        await self._learn_tasks()
        await self._learn_context()
        await self._warm_up()
        self._set(Phase.READY, "health check passed")
        if await self._liveness() == "restart":
            engine.kill()

    async def _liveness(self) -> str:
        failures, unhealthy_since = 0, 0.0
        while True:
            await self._time.sleep(self.cfg.probe_interval_s)
            if await self._probe():
                failures = 0
                self._set(Phase.READY, "health check passed")
                if not self._tasks_known:
                    await self._learn_tasks()
                if self._context_due():
                    self._read_context_aside()
                continue
            failures += 1
            if failures < self.cfg.unhealthy_after:
                continue
            if self.phase != Phase.UNHEALTHY:
                unhealthy_since = self._time.monotonic()
                self._set(Phase.UNHEALTHY, f"{failures} health checks failed")
            elif self._time.monotonic() - unhealthy_since >= self.cfg.unhealthy_restart_s:
                self._exit_reason = (f"unhealthy for {self.cfg.unhealthy_restart_s:g}s")
                return "restart"

    async def _learn_tasks(self) -> None:
        """What the engine serves (agent.engine_tasks): asked before it is reported ready,
        and at the next probes while the engine could not answer."""
        found = await engine_tasks.learn(self._session, self.spec, self.probe_url, self._auth)
        if found is None:
            return
        self._tasks_known = True
        if found != self.tasks:
            self.tasks = found
            self._hooks.on_change()

    async def _learn_context(self) -> None:
        """The context length the engine settled on (module docstring); when the engine
        gives no answer, the length last read stands (else the spec's explicit one)."""
        found = await engine_context.learn(
            self._session, self.spec, self.probe_url, self.cfg.probe_timeout_s, self._auth)
        if found is None:
            self._context_read_at = None
            found = self.max_model_len or commands.max_model_len(self.spec)
        else:
            self._context_read_at = self._time.monotonic()
        if found != self.max_model_len:
            self.max_model_len = found
            self._hooks.on_change()

    def _read_context_aside(self) -> None:
        """A context read beside the probes (module docstring), unless one is under way."""
        if self._context_read is None or self._context_read.done():
            self._context_read = asyncio.create_task(
                self._learn_context(), name=f"context-{self.spec.name}")

    async def _stop_context_read(self) -> None:
        """The read beside the probes cancelled: what it would learn is of an engine gone."""
        read, self._context_read = self._context_read, None
        await aiotasks.stop(read, quiet=True)

    def _context_due(self) -> bool:
        read_at = self._context_read_at
        return read_at is None or self._time.monotonic() - read_at >= CONTEXT_RECHECK_S

    async def _warm_up(self) -> None:
        """The warm-up request (module docstring) for a vLLM that generates, before it is
        ready; a failure is logged and the engine goes ready anyway."""
        if (self.spec.engine != "vllm" or self.cfg.warmup_timeout_s <= 0
                or tasks.GENERATE not in self.tasks):
            return
        self._set(self.phase, WARMUP_REASON)
        why = await self._warmup_failure()
        if why:
            log.warning("backend %s: warm-up request failed (%s); ready without it: the "
                        "first request asking for logprobs will stall the engine while vLLM "
                        "compiles", self.spec.name, why)

    async def _warmup_failure(self) -> str:
        """Why the warm-up request failed ("" when it was answered 200)."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.warmup_timeout_s)
        try:
            async with self._session.post(self.probe_url + WARMUP_PATH, timeout=timeout,
                                          json=warmup_body(self.spec), headers=self._auth,
                                          allow_redirects=False) as r:
                await r.read()
                return "" if r.status == 200 else f"HTTP {r.status}"
        except TimeoutError:
            return f"no answer within {self.cfg.warmup_timeout_s:g}s"
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def _probe(self) -> bool:
        """``/health`` answered 200, by our own engine for a process backend."""
        self._stranger = ""
        if not await self._health():
            self._owner = None  # whoever answers next is checked again
            return False
        if self.spec.engine == "external" or not self.spec.own_port:
            return True
        return await self._owned()

    async def _owned(self) -> bool:
        """Whether our engine answered: checked when the backend would become ready, then
        at most every :data:`OWNER_RECHECK_S` while it answers (psutil walks the process
        and socket tables, hundreds of ms on a busy host), and every probe interval while a
        stranger answers or the engine's sockets cannot be read (trusted unverified, so a
        stranger is caught soon once they can be). A failed probe forgets the answer."""
        now, cached = self._time.monotonic(), self._owner
        if cached is not None and now < cached[0]:
            self._stranger = cached[2]
            return cached[1]
        found = await self._answered_by_our_engine()
        stands = OWNER_RECHECK_S if found else self.cfg.probe_interval_s
        owned = found is not False      # unreadable: the answer alone counts
        self._owner = (now + stands, owned, self._stranger)
        return owned

    async def _health(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)
        try:
            async with self._session.get(self.probe_url + "/health", timeout=timeout,
                                         headers=self._auth, allow_redirects=False) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def _answered_by_our_engine(self) -> bool | None:
        """Whether the engine's process tree listens on its port; None when psutil cannot
        read its sockets (warned once until they can be read again)."""
        pid, port = self.pid, self.port
        owned = await asyncio.to_thread(self._owns, pid, port) if pid else False
        if owned is None:
            if not self._ownership_warned:
                self._ownership_warned = True
                log.warning("backend %s: cannot read the sockets of engine pid %d; its "
                            "port's answers are trusted without checking who listens",
                            self.spec.name, pid)
            return None
        if self._ownership_warned:
            self._ownership_warned = False
            log.info("backend %s: the sockets of engine pid %d can be read again; who "
                     "listens on its port is checked", self.spec.name, pid)
        if not owned:
            who = await asyncio.to_thread(process.listener, port, pid) if pid else None
            self._stranger = (f"port {port} is answered by {who or 'another process'}, "
                              "not by this engine")
        return owned

    # -- external backends -------------------------------------------------------------
    async def _run_external(self) -> None:
        self._set(Phase.STARTING, "probing " + self.url)
        while not self._stopping:
            if await self._probe():
                await self._learn_tasks()
                await self._learn_context()
                self._set(Phase.READY, "health check passed")
                await self._liveness()  # external backends are never restarted
                await self._stop_context_read()
            await self._sleep_or_wake(self.cfg.probe_interval_s)

    # -- engine metrics ----------------------------------------------------------------
    async def _scrape_loop(self) -> None:
        while True:
            await self._time.sleep(self.cfg.scrape_interval_s)
            alive = self.pid != 0 or self.spec.engine == "external"
            if alive and self.phase in (Phase.READY, Phase.UNHEALTHY):
                await self.scrape()

    async def scrape(self) -> None:
        """Read and interpret the engine's ``/metrics``: at most
        ``read_limits.METRICS_MAX_BYTES`` of it (a longer one is a failed scrape, warned
        once until a scrape works again), parsed off the event loop."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)
        try:
            async with self._session.get(self.probe_url + "/metrics", timeout=timeout,
                                         headers=self._auth, allow_redirects=False) as r:
                if r.status != 200:
                    self._scrape_failed(f"HTTP {r.status}", warn=self.metrics_ok)
                    return
                body = await engine_tasks.read_at_most(r, read_limits.METRICS_MAX_BYTES)
            if body is None:
                self._scrape_failed(f"over {read_limits.METRICS_MAX_BYTES} bytes",
                                    warn=self.metrics_ok or not self._warned_too_long)
                self._warned_too_long = True
                return
            snap = await asyncio.to_thread(_parse_metrics, body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._scrape_failed(str(exc), warn=self.metrics_ok)
            return
        self._warned_too_long = False
        rate = engine_metrics.prefix_hit_rate(self.snapshot, snap)
        if rate is not None:
            self.hit_rate = rate
        self.snapshot, self.snapshot_at, self.metrics_ok = snap, self._time.monotonic(), True

    def _scrape_failed(self, why: str, *, warn: bool) -> None:
        if self._stopping:
            return  # the engine is going away on purpose
        if warn:
            log.warning("backend %s: /metrics scrape failed: %s", self.spec.name, why)
        self.metrics_ok = False
        self._hooks.scrape_failed(self.spec.name)

    # -- reporting ---------------------------------------------------------------------
    def in_flight(self) -> float | None:
        """running + waiting from the last scrape; ``None`` when unknown."""
        if not self.metrics_ok or self.snapshot is None:
            return None
        return (self.snapshot.running or 0.0) + (self.snapshot.waiting or 0.0)

    def status(self, draining: bool) -> types.BackendStatus:
        snap = self.snapshot or types.EngineSnapshot()
        phase = Phase.DRAINING if draining and self.phase in LIVE else self.phase
        return types.BackendStatus(
            name=self.spec.name, url=self.url, models=self.spec.models,
            engine=self.spec.engine, task=self.spec.task, phase=phase,
            phase_reason=self.reason, waiting=int(snap.waiting or 0),
            running=int(snap.running or 0), kv_usage=float(snap.kv_usage or 0.0),
            kv_capacity_tokens=snap.kv_capacity_tokens or 0,
            kv_block_size=snap.block_size or 0, prefix_hit_rate=self.hit_rate,
            restarts=self.restarts, last_restart_unix_ms=self.last_restart_ms,
            started_unix_ms=self.started_ms, pid=self.pid,
            last_log_lines=tuple(self.sink.lines()[-10:]),
            memory_reserved_bytes=self.spec.memory_required_bytes,
            metrics_ok=self.metrics_ok, managed=self.managed, tasks=self.tasks,
            max_num_seqs=commands.max_num_seqs(self.spec), max_model_len=self.max_model_len)


def _parse_metrics(body: bytes) -> types.EngineSnapshot:
    """A ``/metrics`` body read as what the engine reports; run in a thread, as decoding
    and parsing a body up to the bound would hold the event loop."""
    return engine_metrics.parse(body.decode("utf-8", "replace"))


def _dialable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
