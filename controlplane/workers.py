"""A pod's serving workers: ``http.workers`` processes sharing the HTTP port.

A Python process serves on one core. With ``http.workers`` = N > 1 the control plane
runs as N processes on one pod: the **primary** (index 0), which ``synapse
controlplane`` starts, and N - 1 **serving workers** it starts and supervises. Every
process binds the HTTP port with ``SO_REUSEPORT`` (the kernel spreads connections
over them) and serves the whole API. The pod still looks like one control plane:

* **Agents and the Admin API** talk to the primary's gRPC port only. The primary copies
  every agent stream to each worker (:mod:`controlplane.adapters.agent_relay`), so each
  worker's registry holds the whole fleet, built by the same servicer code.
* **What replicas share through Redis** (operator intent, rate limits, token usage, L1)
  the workers share the same way, which is why more than one worker needs ``redis.url``
  and, with the semantic cache on, an L2 on a Milvus server (a Milvus Lite file is
  opened by one process): :func:`why_one` says which is missing.
* **What replicas do not share** — the router's in-flight ledger, its prefix index,
  session affinity, Responses pins, learned costs and the cache's served log — the
  workers of a pod share through the mesh (:mod:`controlplane.api.worker_wiring`), so a
  prompt's locality and a backend's queue do not split N ways, and cache feedback
  reaches any process.
* **/metrics** on any process answers the pod's sum
  (:mod:`controlplane.api.worker_metrics`); each process serves its own figures on a
  private unix socket.

The private directory (``<tmp>/synapse-workers-*``, mode 0700, removed at exit) holds
every unix socket: only processes of the pod's own user can reach them, which is how
they authenticate each other. A worker exits when its primary is gone; the primary
restarts a worker that died, and stops them all (SIGTERM, then their drain delay and
shutdown grace, as its own) when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Protocol

import aiohttp
from aiohttp import web

from controlplane import config
from controlplane.api import observability, worker_wiring
from controlplane.api import services as services_mod
from controlplane.core.l2 import store as l2_store
from controlplane.settings.server import MAX_WORKERS
from synapse_common import cli, parent_death

log = logging.getLogger("synapse.controlplane.workers")

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
HEALTHY_S = 60.0            # a worker that ran this long restarts without waiting long
STOP_MARGIN_S = 5.0         # beyond a worker's own graceful stop, before it is killed
# What a primary tells its workers besides SIGTERM (stop, draining as it does; any number
# of SIGTERMs is one stop in a worker, which also gets the group's when a whole process
# group is signalled): stop without the drain (the primary stopped on Ctrl-C), and cut
# what runs now (the primary got a second signal).
STOP_NO_DRAIN = signal.SIGUSR1
HURRY = signal.SIGUSR2
SOCKET_PATH_MAX = 107       # bytes of a unix socket's path on Linux (108 with its NUL)
CGROUP = pathlib.Path("/sys/fs/cgroup")
FLEET_POLL_S = 0.05


def cpus(cgroup: pathlib.Path = CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota
    (a container limited to 2 CPUs on a 64-core node sees 64 in its mask; Kubernetes
    limits are quotas). A quota of 1.5 CPUs counts as 1: a second worker would only
    compete with the first for the same time."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        n = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(n, int(quota))) if quota is not None else n


def cpu_quota(cgroup: pathlib.Path = CGROUP) -> float | None:
    """The cgroup's CPU limit in CPUs (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), None when unlimited or unreadable."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def why_one(settings: config.ControlPlaneSettings) -> str | None:
    """Why these settings cannot run more than one worker (None: they can)."""
    if settings.redis.url is None:
        return ("redis.url is not set: rate limits and usage would live in each worker's "
                "memory, each worker enforcing them alone (the operator intent is kept "
                "in data_dir/fleet_intent.json)")
    c = settings.cache
    if c.enabled and c.semantic_enabled and (
            c.milvus_uri is None or l2_store.is_file(c.milvus_uri.get_secret_value())):
        return ("the semantic cache's L2 is a Milvus Lite file (cache.milvus_uri names no "
                "server), which only one process can open")
    return None


def count(settings: config.ControlPlaneSettings, available: int | None = None) -> int:
    """How many processes to run; ValueError naming ``http.workers`` when the settings
    ask for more than one and cannot share what the workers must."""
    wanted = settings.http.workers
    reason = why_one(settings)
    if wanted == "auto":
        n = available if available is not None else cpus()
        if n > 1 and reason is not None:
            log.debug("http.workers auto: one process (%s)", reason)
            return 1
        return max(1, min(n, MAX_WORKERS))
    if wanted > 1 and reason is not None:
        raise ValueError(f"http.workers: {wanted} workers cannot share this configuration: "
                         f"{reason}. Set http.workers: 1, or provide what is missing")
    return wanted


@dataclasses.dataclass(frozen=True, slots=True)
class Role:
    """Which process of the pod this is, and where the pod's private sockets live."""
    index: int = 0
    count: int = 1
    directory: pathlib.Path | None = None

    @property
    def primary(self) -> bool:
        return self.index == 0

    def socket(self, kind: str, index: int) -> pathlib.Path:
        assert self.directory is not None
        return self.directory / f"{kind}-{index}.sock"

    def others(self, kind: str) -> tuple[pathlib.Path, ...]:
        """The ``kind`` sockets of every other process of the pod."""
        return tuple(self.socket(kind, i) for i in range(self.count) if i != self.index)

    def replica(self, base: str) -> str:
        """This process's replica name: the pod's, with ``-w<index>`` for a worker."""
        return base if self.primary else f"{base}-w{self.index}"


def private_directory(count: int) -> pathlib.Path:
    """A new directory (mode 0700) for the sockets of a pod of ``count`` processes;
    ValueError naming the setting when the temporary directory cannot take one (a
    read-only root without a /tmp) or its path is too long for unix sockets."""
    try:
        directory = pathlib.Path(tempfile.mkdtemp(prefix="synapse-workers-"))
    except OSError as exc:
        raise ValueError(f"http.workers: cannot create the workers' socket directory in "
                         f"{tempfile.gettempdir()} ({exc.strerror or exc}); give the "
                         "process a writable temporary directory (TMPDIR) or set "
                         "http.workers: 1") from None
    longest = directory / f"metrics-{count - 1}.sock"      # the longest socket name
    if len(os.fsencode(longest)) > SOCKET_PATH_MAX:
        shutil.rmtree(directory, ignore_errors=True)
        raise ValueError(f"http.workers: the temporary directory {tempfile.gettempdir()} "
                         f"is too deep for unix socket paths ({SOCKET_PATH_MAX} bytes at "
                         "most); set TMPDIR to a shorter path or http.workers: 1")
    return directory


class Pool:
    """The primary's serving workers: started, restarted when they die, stopped."""

    def __init__(self, role: Role, argv: Sequence[str], http_port: int,
                 stop_grace_s: float = 10.0) -> None:
        self._role = role
        # a worker's own graceful stop (drain delay, shutdown grace, cut, gRPC)
        self._stop_grace_s = stop_grace_s
        self._argv = list(argv)
        self._port = http_port
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stop_signal: signal.Signals = signal.SIGTERM
        self._stop_requested = asyncio.Event()
        self.failed = asyncio.Event()   # a worker refused its configuration: stop the pod

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "controlplane.main", *self._argv,
                "--http-port", str(self._port), "--worker-index", str(index),
                "--worker-dir", str(self._role.directory), "--worker-parent", str(os.getpid())]

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i)) for i in range(1, self._role.count)]

    async def _keep(self, index: int) -> None:
        delay = RESTART_FIRST_S
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(*self.command(index))
            self._procs[index] = proc
            if self._stopping:      # spawned while the stop began: stops with the rest
                _signal(proc, self._stop_signal)
            code = await proc.wait()
            if loop.time() - started >= HEALTHY_S:
                delay = RESTART_FIRST_S
            if self._stopping:
                return
            if code == cli.EXIT_CONFIG:
                log.error("serving worker %d refused the configuration: stopping", index)
                self.failed.set()
                return
            log.error("serving worker %d exited with %s; restarting in %.1fs",
                      index, code, delay)
            with contextlib.suppress(TimeoutError):     # no restart once stopping
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            delay = min(RESTART_MAX_S, delay * 2)

    async def stop(self, drain: bool = True) -> None:
        """SIGTERM every worker (each drains and stops as the primary does, at the same
        time; :data:`STOP_NO_DRAIN` without ``drain``), wait for their graceful stop, all
        together under one deadline, kill what is left. No worker is (re)started from now
        on; one being started gets its signal as soon as it is."""
        self._stopping = True
        self._stop_signal = signal.SIGTERM if drain else STOP_NO_DRAIN
        self._stop_requested.set()
        self._signal_all(self._stop_signal)
        # Each keeper returns once its worker has exited (or at once, when none runs).
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._stop_grace_s + STOP_MARGIN_S)
        self._signal_all(signal.SIGKILL)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_MARGIN_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._signal_all(signal.SIGKILL)
        if self._role.directory is not None:
            shutil.rmtree(self._role.directory, ignore_errors=True)

    def hurry(self) -> None:
        """A second signal: every worker cuts its requests now (:data:`HURRY`)."""
        self._signal_all(HURRY)

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in list(self._procs.values()):
            _signal(proc, sig)


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def exit_with_parent(parent: int) -> None:
    """A worker's SIGTERM when the primary that started it (``parent``) dies, however it
    dies (Linux ``PR_SET_PDEATHSIG``, :mod:`synapse_common.parent_death`), so no worker
    outlives its pod's primary."""
    parent_death.die_with(parent, signal.SIGTERM)


class PodLink:
    """This process's links to the rest of its pod, closed when it stops."""

    def __init__(self, runners: Sequence[web.AppRunner], mesh: _Mesh) -> None:
        self._runners = runners
        self._mesh = mesh

    async def wait_joined(self, within_s: float) -> bool:
        """Wait until this process tells and hears every sibling over the mesh; False
        when ``within_s`` passed first."""
        return await self._mesh.wait_joined(within_s)

    async def close(self) -> None:
        await self._mesh.close()
        for runner in self._runners:
            await runner.cleanup()


class _Mesh(Protocol):
    async def wait_joined(self, within_s: float) -> bool: ...

    async def close(self) -> None: ...


def reported_nodes(services: services_mod.Services) -> list[str]:
    """The connected nodes this process has a report from."""
    return sorted(n.info.name for n in services.registry.nodes()
                  if n.connected and (n.backends or n.report is not None))


async def join(services: services_mod.Services, role: Role) -> PodLink:
    """Serve this process's own figures to the others, and join the routing mesh; the
    primary also tells its workers which nodes it has (:func:`wait_for_fleet`)."""
    runners = [await observability.serve_worker_metrics(
        services, role.socket("metrics", role.index))]
    services.worker_metrics_sockets = role.others("metrics")
    if role.primary:
        async def nodes(request: web.Request) -> web.Response:
            return web.json_response(reported_nodes(services))
        app = web.Application()
        app.router.add_get("/nodes", nodes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(role.socket("fleet", 0))).start()
        runners.append(runner)
    assert role.directory is not None
    mesh = worker_wiring.attach_mesh(services, role.directory, role.index, role.count)
    await mesh.start()
    return PodLink(runners, mesh)


async def wait_for_fleet(services: services_mod.Services, role: Role, within_s: float,
                         ) -> bool:
    """A worker's wait, before it takes connections on the shared port, until its registry
    (fed by the primary's relay) holds every node the primary has a report from: else
    the kernel would hand it requests it answers "no backend" for. False when
    ``within_s`` passed first (it then serves with what it has, said in the log)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    connector = aiohttp.UnixConnector(path=str(role.socket("fleet", 0)))
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while loop.time() < deadline:
            try:
                async with session.get("http://primary/nodes") as resp:
                    wanted = set(await resp.json())
            except (aiohttp.ClientError, TimeoutError, ValueError):
                wanted = None
            if wanted is not None and wanted <= set(reported_nodes(services)):
                return True
            await asyncio.sleep(FLEET_POLL_S)
    log.warning("serving worker %d takes requests without the primary's whole fleet view "
                "after %.0fs", role.index, within_s)
    return False
