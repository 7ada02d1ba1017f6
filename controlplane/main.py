"""``synapse controlplane``: the OpenAI-compatible API, router, cache and gRPC server.

One process, one uvloop event loop: the aiohttp API and the ``grpc.aio`` server (agent
streams; the Admin service joins as one more registration) share the registry; with
``metrics.port`` set, ``/metrics`` listens on a port of its own. With ``http.workers``
above one, this process is the pod's primary and starts the serving workers
(:mod:`controlplane.workers`: the same command with ``--worker-index``). The HTTP server closes
slow clients (:mod:`controlplane.api.server`). aiohttp's own access log is off: Synapse
writes its own, one structured line per API request (:mod:`controlplane.core.access_log`,
``access_log`` settings).

SIGTERM: ``/ready`` answers 503 at once, and the process goes on accepting and serving for
``http.drain_delay_s`` (Kubernetes removes a terminating pod's endpoints, but kube-proxy
and ingress controllers learn it a moment later: connections in that moment would be
refused). It is the process's rather than a chart ``preStop`` sleep so that every way of
running it (the chart, the kustomize manifests, a plain container) drains the same, and
the pod's serving workers, which get the SIGTERM from the primary, drain with it; SIGINT
(Ctrl-C at a terminal) skips it, in the workers too (:data:`workers.STOP_NO_DRAIN`). From SIGTERM on every answer says ``Connection: close``
and its connection closes after it, so clients that pool connections open new ones,
which go to other pods. Then the listener closes and requests in flight get
``http.shutdown_grace_s``; what still runs then is ended cleanly
(:mod:`controlplane.api.server`: a stream with its error event, an unanswered request
with 503 ``server_shutting_down``), and the resources close. A second signal (SIGTERM or
SIGINT) to the primary skips what is left of the drain and the grace: what runs is ended
so at once, in the workers too (:data:`workers.HURRY`; a worker takes SIGTERMs, its
primary's and a signalled process group's, as one stop).
SIGHUP (the operator's terminal or ssh session closed) is a SIGTERM: the same drain, the
usage flushed, in the workers too (a worker takes the group's SIGHUP as its one stop);
under ``nohup`` it stays ignored.
``/metrics`` on ``metrics.port`` is not drained: a scrape gets
:data:`METRICS_STOP_GRACE_S` after the API's grace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import pathlib
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from controlplane import config, workers
from controlplane.adapters import agent_relay, node_embed
from controlplane.api import admin_grpc, grpc_server, ops, readiness
from controlplane.api import app as app_mod
from controlplane.api import server as server_mod
from controlplane.api import services as services_mod
from controlplane.core import cache_port
from synapse_common import cli

log = logging.getLogger("synapse.controlplane")
GC_YOUNG_THRESHOLD = 20_000
GRPC_STOP_GRACE_S = 1.0   # after HTTP is done: only agent streams and Admin calls remain
METRICS_STOP_GRACE_S = 1.0  # for a scrape in flight when the API's grace is over
FAILED_START_CLEANUP_S = 5.0  # to stop what a start that failed had started
END_TASKS_POLL_S = 0.2


def build_parser(prog: str = "synapse controlplane") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the Synapse control plane: OpenAI-compatible HTTP API, "
        "predicted-TTFT router, response cache, agent registry and Admin gRPC service.")
    cli.add_common_args(parser)
    parser.add_argument("--http-port", type=int, help="override http.port")
    parser.add_argument("--grpc-port", type=int, help="override grpc.port")
    # Set by the pod's primary when it starts a serving worker (controlplane.workers).
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-parent", type=int, help=argparse.SUPPRESS)
    return parser


def build_response_cache(settings: config.ControlPlaneSettings,
                         services: services_mod.Services) -> cache_port.ResponseCache:
    """>>> THE RESPONSE CACHE IS CONSTRUCTED HERE (cache engineer's spot). <<<

    ``services.registry.ready_embed_nodes()`` lists the agents serving ``Node.Embed``
    (name, address, embed_models); ``services.metrics`` holds the cache metrics.
    Built here: L1 in-process unless ``redis.url``; L2 Milvus Lite at ``<data_dir>/l2.db``
    unless ``cache.milvus_uri``, and none without ``cache.semantic_enabled``; embeddings
    through a ready agent's ``Node.Embed``.
    """
    c = settings.cache
    if not c.enabled:
        return cache_port.NullCache()
    from controlplane import cache_wiring, feedback_wiring
    from controlplane.adapters import embedder
    from controlplane.core import response_cache

    tenants = services_mod.tenant_count(services.tenants)
    store = cache_wiring.build_l1(settings, tenants=tenants)
    nodes = services.registry.ready_embed_nodes
    embed = embedder.NodeEmbedder(
        lambda: [n.address for n in nodes() if c.embed_model in n.embed_models],
        c.embed_model, timeout_s=c.semantic_budget_ms / 1000,
        key_of=services.registry.node_key_at,
        credentials=node_embed.Credentials.load(settings.grpc.node_ca_file,
                                                settings.grpc.node_server_name),
        pin_of=services.registry.node_pin_at,
        plain_text=not settings.grpc.node_tls_required)
    try:
        judges, pinned_embedder = feedback_wiring.load_judges(c)
    except feedback_wiring.VerifierConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(cli.EXIT_CONFIG) from None
    # No semantic layer, no store: nothing would read it, and a Lite file is one
    # process's (a pod's second worker could not open it to evict a wrong answer). A cache
    # pinned to one embedder knows its vectors' dimension: a node's answer of another
    # cannot create the collection with it.
    l2 = cache_wiring.build_l2(settings, dim=judges.fitted.dim if judges.others is None
                               else None) if c.semantic_enabled else None
    options = response_cache.Options(
        ttl_s=c.ttl_s, temperature_ceiling=c.temperature_ceiling,
        default_temperature=c.default_temperature, l1_budget_s=c.l1_budget_ms / 1000,
        semantic_budget_s=c.semantic_budget_ms / 1000, top_k=c.top_k,
        embed_model=c.embed_model, semantic_enabled=c.semantic_enabled,
        target_precision=c.target_precision,
        model_target_precision={m.name: m.cache_target_precision for m in settings.models
                                if m.cache_target_precision is not None},
        embedder_id=pinned_embedder)
    tiered = response_cache.TieredCache(
        options=options, l1=store, metrics=services.metrics, l2=l2, embedder=embed,
        verifier_model=judges)
    return feedback_wiring.with_feedback(tiered, settings, services.metrics, tenants=tenants)


def grpc_registrations(services: services_mod.Services,
                       relay: agent_relay.AgentRelay | None = None,
                       ) -> list[grpc_server.Registration]:
    """The gRPC services of this process: agents' Connect and, when enabled, Admin."""
    registrations = [grpc_server.control_plane(services, relay)]
    if services.settings.admin.enabled:
        registrations.append(admin_grpc.admin(services))
    return registrations


def _ssl_context(http: config.HttpSettings) -> ssl.SSLContext | None:
    if not (http.tls_cert_file and http.tls_key_file):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(http.tls_cert_file, http.tls_key_file)
    return ctx


def check_tls_files(settings: config.ControlPlaneSettings) -> None:
    """A ValueError naming the setting when a TLS file of ``http`` or ``grpc`` cannot be
    read, ``http``'s pair does not load, or ``grpc.node_ca_file`` holds no CA (else the
    process would fail later, at listen or at the first Node call, with an error that
    names neither)."""
    for section in ("http", "grpc"):
        for field in ("tls_cert_file", "tls_key_file"):
            path = getattr(getattr(settings, section), field)
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise ValueError(f"{section}.{field}: cannot read {path} "
                                     f"({exc.strerror or type(exc).__name__})") from None
    try:
        _ssl_context(settings.http)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"http.tls_cert_file / http.tls_key_file: not a certificate and "
                         f"its key ({exc.strerror or type(exc).__name__})") from None
    node_embed.Credentials.load(settings.grpc.node_ca_file, settings.grpc.node_server_name)


async def serve(settings: config.ControlPlaneSettings, services: services_mod.Services,
                role: workers.Role = workers.Role(), worker_argv: Sequence[str] = ()) -> None:
    app = app_mod.create_app(settings, services=services)
    h = settings.http
    runner = server_mod.Runner(app, h, on_cut=functools.partial(_cut, services),
                               access_log=None, handler_cancellation=True,
                               shutdown_timeout=h.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, h.host, h.port, ssl_context=_ssl_context(h), backlog=2048,
                       reuse_port=True if role.count > 1 else None)
    metrics_runner: web.AppRunner | None = None
    pod: workers.PodLink | None = None
    try:
        if role.primary:
            await site.start()
        metrics_runner = await _serve_metrics(settings, services) if role.primary else None
        pod = await workers.join(services, role) if role.count > 1 else None
        server, grpc_port = await _start_grpc(settings, services, role)
        if not role.primary:
            # the shared port once this worker sees the primary's fleet and its siblings'
            # routing (else it would route blind to their prefixes, tickets and served log)
            await workers.wait_for_fleet(services, role, settings.registry.sync_grace_s)
            assert pod is not None
            if not await pod.wait_joined(settings.registry.sync_grace_s):
                log.warning("serving worker %d takes requests before the mesh joins all "
                            "its siblings", role.index)
            await site.start()
    except BaseException:
        await _undo_start(runner, metrics_runner, pod)
        raise
    g = settings.grpc
    http_port = runner.addresses[0][1] if runner.addresses else h.port
    # Start-up objects (modules, settings, stubs) never die: keep them out of every future
    # collection, so a full GC pass does not stall requests for milliseconds.
    gc.collect()
    gc.freeze()
    # Every request allocates a few hundred short-lived containers, nearly all freed by
    # reference counting; at the default threshold (700) the young generation was
    # collected every couple of requests, a few per cent of the CPU per request.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    stop = asyncio.Event()
    hurry = asyncio.Event()         # a second signal: no more drain, no more grace
    signals: list[signal.Signals] = []
    loop = asyncio.get_running_loop()
    if role.primary:
        for sig in (signal.SIGTERM, signal.SIGINT, *hangup()):
            loop.add_signal_handler(sig, _on_signal, sig, signals, stop, hurry)
    else:
        # Ctrl-C, and a SIGTERM to the pod's whole process group (systemd, kill -- -PGID),
        # reach the workers as well as the primary, which then signals them too: a worker
        # takes any number of SIGTERMs as one stop and ignores SIGINT, and its primary
        # says what more it means by signals of their own (workers.STOP_NO_DRAIN,
        # workers.HURRY). Counted as a second signal, the group's and the primary's
        # SIGTERM cut every request at once.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        for sig in (signal.SIGTERM, *hangup()):
            loop.add_signal_handler(sig, _stop_once, sig, signals, stop)
        loop.add_signal_handler(workers.STOP_NO_DRAIN, _stop_once, workers.STOP_NO_DRAIN,
                                signals, stop)
        loop.add_signal_handler(workers.HURRY, _on_signal, workers.HURRY, [workers.HURRY],
                                stop, hurry)
    pool = None
    watch: asyncio.Task[None] | None = None
    if role.primary and role.count > 1:
        pool = workers.Pool(role, worker_argv, http_port, stop_grace_s=stop_grace_s(h))
        pool.start()
        watch = asyncio.create_task(_set_when(pool.failed, stop))
    if role.primary:
        log.info("control plane %s listening: http %s:%s, grpc %s:%s (policy %s, %d %s)",
                 services.replica, h.host, http_port, g.host, grpc_port,
                 settings.router.policy, role.count,
                 "process" if role.count == 1 else "processes")
    else:
        log.info("serving worker %d of %d (%s) listening: http %s:%s", role.index,
                 role.count, services.replica, h.host, http_port)
    drain = 0.0
    try:
        await stop.wait()
        _begin_stopping(services, runner)               # /ready: 503 from now on
        drain = 0.0 if NO_DRAIN & set(signals) else h.drain_delay_s
        log.info("stopping: serving %gs more (http.drain_delay_s), then up to %gs for "
                 "requests in flight (http.shutdown_grace_s); a second signal cuts them "
                 "now", drain, h.shutdown_grace_s)
    finally:
        _begin_stopping(services, runner)
        if watch is not None:
            watch.cancel()
        stopping = (asyncio.create_task(pool.stop(drain=not NO_DRAIN & set(signals)))
                    if pool is not None else None)
        hurrying = asyncio.create_task(_hurry_on(hurry, runner, pool))
        if stop.is_set() and drain > 0:
            # still accepting while endpoints go (a second signal ends the wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), drain)
        # HTTP first: stop accepting and let in-flight requests finish while the agents'
        # streams — and so the routing table — are still up. Stopping gRPC first ended
        # every agent stream at once and answered 503 "no backend" for the whole grace.
        # The primary keeps them up until its workers have stopped too.
        await runner.cleanup()
        # (alongside the rest of the stop: within the pod's grace, a stalled scrape too)
        scrapes = (asyncio.create_task(metrics_runner.cleanup())
                   if metrics_runner is not None else None)
        if stopping is not None:
            await stopping
        if pod is not None:
            await pod.close()
        await server.stop(GRPC_STOP_GRACE_S)
        if scrapes is not None:
            await scrapes
        hurrying.cancel()


async def _undo_start(runner: server_mod.Runner, metrics_runner: web.AppRunner | None,
                      pod: workers.PodLink | None) -> None:
    """A start that failed (a port taken): stop what had started, within
    :data:`FAILED_START_CLEANUP_S`. The app's background loops (the fleet's intent reload,
    the stats fan-out) are stopped by its cleanup rather than left to the event loop's
    final cancellation, which waits for ever on a task that outlives one cancel: a Redis
    call whose read time-out ends at that cancel's moment turns it into its time-out
    error, and the loop that counts errors goes on."""
    async def undo() -> None:
        if pod is not None:
            await pod.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
    try:
        async with asyncio.timeout(FAILED_START_CLEANUP_S):
            await undo()
    except Exception as exc:
        log.warning("stopping after a failed start: %s", exc or type(exc).__name__)
    await _end_tasks(FAILED_START_CLEANUP_S)


async def _end_tasks(bound_s: float) -> None:
    """Cancel every other task of the loop, again while any is left, for up to
    ``bound_s`` (a task that took a cancel for its own time-out gets another)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while (left := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
                    and not t.done()]) and loop.time() < deadline:
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=min(END_TASKS_POLL_S, deadline - loop.time()))
    for task in left:
        log.warning("a task outlived the failed start's cleanup: %s", task.get_name())


# A stop on these skips the drain: Ctrl-C at a terminal, and a worker told so by its primary.
NO_DRAIN = frozenset({signal.SIGINT, workers.STOP_NO_DRAIN})


def stop_grace_s(http: config.HttpSettings) -> float:
    """The most a process's graceful stop takes: the drain delay, the grace, the cut's
    own time and the gRPC server's stop."""
    return http.drain_delay_s + http.shutdown_grace_s + server_mod.CUT_S + GRPC_STOP_GRACE_S


def _cut(services: services_mod.Services) -> None:
    """The shutdown grace is over: handlers cancelled from now on were cut by the server."""
    readiness.state(services).cut = True


def _begin_stopping(services: services_mod.Services, runner: server_mod.Runner) -> None:
    """``/ready`` answers 503, and every answer closes its connection
    (:meth:`controlplane.api.server.LaneServer.drain`)."""
    readiness.state(services).stopping = True
    runner.drain()


def hangup() -> tuple[signal.Signals, ...]:
    """SIGHUP, unless this process was started with it ignored (``nohup``: the operator
    asked it to outlive the terminal, and a handler would undo that)."""
    return () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)


def _on_signal(sig: signal.Signals, seen: list[signal.Signals], stop: asyncio.Event,
               hurry: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second %s: ending the requests in flight now", sig.name)
        hurry.set()
    seen.append(sig)
    stop.set()


def _stop_once(sig: signal.Signals, seen: list[signal.Signals], stop: asyncio.Event) -> None:
    """A serving worker's stop: the first signal counts, more are the same stop."""
    if not stop.is_set():
        seen.append(sig)
        stop.set()


async def _hurry_on(hurry: asyncio.Event, runner: server_mod.Runner,
                    pool: workers.Pool | None) -> None:
    """A second signal skips the rest of the drain (the caller's wait) and the grace:
    what runs is cut now, as at the grace's end, here and in the pod's workers."""
    await hurry.wait()
    runner.hurry()
    if pool is not None:
        pool.hurry()


async def _start_grpc(settings: config.ControlPlaneSettings, services: services_mod.Services,
                      role: workers.Role) -> tuple[grpc_server.Server, int]:
    """The primary's gRPC server on ``grpc.port`` (agents, whose streams it copies to its
    workers, and Admin); a worker's on its private socket (the copied streams alone)."""
    g = settings.grpc
    if not role.primary:
        return await grpc_server.start(
            f"unix:{role.socket('grpc', role.index)}", None,
            [grpc_server.control_plane(services, relayed=True)],
            max_message_bytes=g.max_message_bytes)
    relay = (agent_relay.AgentRelay([str(p) for p in role.others("grpc")],
                                    settings.auth.agent_token_value)
             if role.count > 1 else None)
    return await grpc_server.start(
        g.host, g.port, grpc_registrations(services, relay),
        max_message_bytes=g.max_message_bytes, tls_cert_file=g.tls_cert_file,
        tls_key_file=g.tls_key_file)


async def _set_when(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()


async def _serve_metrics(settings: config.ControlPlaneSettings,
                         services: services_mod.Services) -> web.AppRunner | None:
    """``/metrics`` on ``metrics.port`` (same host as the API), when set."""
    port = settings.metrics.port
    if port is None:
        return None
    # Scrapes are not drained: a scraper that stops reading a large /metrics must not
    # hold the process past the pod's termination grace (aiohttp's default is 60 s).
    runner = server_mod.Runner(app_mod.create_metrics_app(services), settings.http,
                               access_log=None, shutdown_timeout=METRICS_STOP_GRACE_S)
    await runner.setup()
    await web.TCPSite(runner, settings.http.host, port).start()
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("metrics on %s:%s/metrics", settings.http.host, bound)
    return runner


def _role(args: argparse.Namespace, settings: config.ControlPlaneSettings) -> workers.Role:
    """This process's place in its pod (ValueError naming ``http.workers``)."""
    if args.worker_index is not None:
        return workers.Role(args.worker_index, args.worker_count or 1,
                            pathlib.Path(args.worker_dir))
    n = workers.count(settings)
    return workers.Role(0, n, workers.private_directory(n) if n > 1 else None)


def main(argv: list[str] | None = None, prog: str = "synapse controlplane") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.worker_parent is not None:
        workers.exit_with_parent(args.worker_parent)
    settings = cli.bootstrap(config.ControlPlaneSettings, args,
                             {"http.port": args.http_port, "grpc.port": args.grpc_port})
    for check in (config.open_agent_door, config.redis_url_problem):
        if (problem := check(settings)) is not None:
            cli.fail(f"config error: {problem}")
    try:
        role = _role(args, settings)
        if not role.primary:
            base = settings.replica_id or socket.gethostname()
            settings = settings.model_copy(update={"replica_id": role.replica(base)})
        check_tls_files(settings)
        services = services_mod.build(settings, commands_agents=role.primary)
        ops.prepare(services)   # tracing, access log: ValueError naming tracing.enabled
        if role.primary:        # once per pod
            configured = services_mod._tenant_settings(settings.auth)   # key_file's too
            for warning in config.start_warnings(settings, configured):
                log.warning("%s", warning)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return cli.EXIT_CONFIG
    services.cache = build_response_cache(settings, services)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # Windows: the default loop
        pass
    worker_argv = [*argv, "--worker-count", str(role.count)]
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(settings, services, role, worker_argv))
    except OSError as exc:
        print(f"synapse controlplane: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":     # how the primary starts a serving worker
    sys.exit(main())
