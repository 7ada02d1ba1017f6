"""The pod's ``/metrics`` (issue 21): the primary answers its own metrics merged with its
serving workers', which it reads from their unix sockets. Counts are summed, fleet gauges
are the primary's, per-process gauges summed, a worker's own series kept; a worker that
does not answer is left out (and reported) without failing the scrape, and the pod's
counters never go back."""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane import metrics as metrics_mod
from controlplane.api import app as app_mod
from controlplane.api import observability, worker_metrics
from controlplane.api import services as services_mod
from controlplane.core import cache_feedback
from tests.controlplane import cp_testing as t

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
REQ = "synapse_requests_total"
REQ_LABELS = {"model": t.MODEL, "status": "200", "tenant": "a", "route": "/v1/chat/completions"}


def samples(text: str | bytes) -> Samples:
    """Every sample of an exposition (which must parse as the text format)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


def count(m: metrics_mod.Metrics, n: int, tenant: str = "a") -> None:
    m.requests.labels(**{**REQ_LABELS, "tenant": tenant}).inc(n)


def worker_text(m: metrics_mod.Metrics) -> worker_metrics.Families:
    return worker_metrics.parse(generate_latest(m.registry).decode())


@pytest.fixture
def sock_dir() -> Iterator[pathlib.Path]:
    # unix socket paths are limited to about 100 bytes: pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="wm", dir="/tmp") as d:
        yield pathlib.Path(d)


# -- the merge rule ------------------------------------------------------------------------

def test_counts_are_summed_fleet_gauges_are_the_primarys_per_process_gauges_summed() -> None:
    primary = metrics_mod.Metrics(CollectorRegistry())
    worker = metrics_mod.Metrics(CollectorRegistry())
    count(primary, 2)
    count(worker, 3)
    count(worker, 1, tenant="b")                      # a series only the worker has
    for m, seconds in ((primary, (0.003,)), (worker, (0.003, 20.0))):
        for s in seconds:
            m.request_duration.labels(t.MODEL, "miss", "/v1/completions").observe(s)
        m.backends.labels("ready").set(2)             # the fleet, as both see it
        m.agent_streams.set(1)                        # relayed: every process counts it
        m.queue_depth.labels("interactive", "a").set(2)
    worker.queue_depth.labels("interactive", "a").set(3)
    only = Counter("synapse_worker_only_total", "Seen by the worker alone.",
                   registry=worker.registry)
    only.inc(4)

    got = samples(worker_metrics.render(worker_metrics.merge(
        worker_metrics.own_families(primary.registry), [worker_text(worker)])))

    assert value(got, REQ, **REQ_LABELS) == 5
    assert value(got, REQ, **{**REQ_LABELS, "tenant": "b"}) == 1
    hist = {"model": t.MODEL, "cache": "miss", "route": "/v1/completions"}
    assert value(got, "synapse_request_duration_seconds_bucket", **hist, le="0.005") == 2
    assert value(got, "synapse_request_duration_seconds_bucket", **hist, le="+Inf") == 3
    assert value(got, "synapse_request_duration_seconds_count", **hist) == 3
    assert value(got, "synapse_request_duration_seconds_sum", **hist) == pytest.approx(20.006)
    assert value(got, "synapse_backends", state="ready") == 2
    assert value(got, "synapse_agent_streams") == 1
    assert value(got, "synapse_queue_depth", **{"class": "interactive", "tenant": "a"}) == 5
    assert value(got, "synapse_worker_only_total") == 4
    # one _created per series (the primary's), none for what only a worker has
    created = {k for k in got if k[0] == "synapse_requests_created"}
    assert created == {("synapse_requests_created", frozenset(REQ_LABELS.items()))}


def test_the_output_keeps_help_and_type() -> None:
    primary = metrics_mod.Metrics(CollectorRegistry())
    worker = metrics_mod.Metrics(CollectorRegistry())
    count(worker, 1)
    text = worker_metrics.render(worker_metrics.merge(
        worker_metrics.own_families(primary.registry), [worker_text(worker)])).decode()
    assert "# TYPE synapse_requests_total counter\n" in text
    assert "# HELP synapse_requests_total Requests answered, by model" in text
    assert "# TYPE synapse_request_duration_seconds histogram\n" in text
    assert "# TYPE synapse_queue_depth gauge\n" in text


def test_live_precision_is_recomputed_from_every_process_verdicts() -> None:
    primary = metrics_mod.Metrics(CollectorRegistry())
    worker = metrics_mod.Metrics(CollectorRegistry())
    primary.cache_feedback.labels(t.MODEL, "semantic", "right", "a").inc(3)
    worker.cache_feedback.labels(t.MODEL, "semantic", "wrong", "a").inc(1)
    worker.cache_feedback.labels(t.MODEL, "semantic", "right", "b").inc(2)
    worker.cache_feedback.labels(t.MODEL, "exact", "wrong", "a").inc(5)   # not semantic
    primary.cache_live_precision.labels(t.MODEL, "estimate").set(1.0)  # its own 3 of 3
    got = samples(worker_metrics.render(worker_metrics.merge(
        worker_metrics.own_families(primary.registry), [worker_text(worker)])))
    estimate, lower, upper, _ = cache_feedback.live_interval({"a": (3, 1), "b": (2, 0)})
    assert (estimate, lower) != pytest.approx(cache_feedback.wilson(5, 6)[:2])  # per tenant
    for bound, want in (("estimate", estimate), ("lower", lower), ("upper", upper)):
        assert value(got, "synapse_cache_live_precision", model=t.MODEL,
                     bound=bound) == pytest.approx(want)


# -- over the workers' sockets ---------------------------------------------------------------

@pytest.fixture
async def primary(sock_dir: pathlib.Path) -> AsyncIterator[services_mod.Services]:
    token = sock_dir / "token"
    token.write_text("metrics-secret\n")
    svc = services_mod.build(t.settings(metrics={"bearer_token_file": str(token)}))
    yield svc


async def scrape(url: str, token: str | None = "metrics-secret") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as resp:
        return resp.status, await resp.read()


async def test_the_primary_answers_the_pods_sums_and_reports_a_missing_worker(
        primary: services_mod.Services, sock_dir: pathlib.Path) -> None:
    workers = [services_mod.build(t.settings()) for _ in range(2)]
    paths = [sock_dir / f"metrics-{i}.sock" for i in (1, 2, 3)]   # 3 never starts
    runners = [await observability.serve_worker_metrics(w, p)
               for w, p in zip(workers, paths, strict=False)]
    runner = web.AppRunner(app_mod.create_metrics_app(primary), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    primary.worker_metrics_sockets = tuple(paths)   # set once the app runs, as main does
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    try:
        count(primary.metrics, 1)
        count(workers[0].metrics, 10)
        count(workers[1].metrics, 100)
        workers[1].metrics.queue_depth.labels("batch", "a").set(4)
        assert paths[0].stat().st_mode & 0o777 == 0o600

        assert (await scrape(url, token=None))[0] == 401    # the token still guards it
        status, body = await scrape(url)
        assert status == 200
        got = samples(body)
        assert value(got, REQ, **REQ_LABELS) == 111
        assert value(got, "synapse_queue_depth", **{"class": "batch", "tenant": "a"}) == 4
        assert value(got, "synapse_workers", state="answered") == 3
        assert value(got, "synapse_workers", state="missing") == 1
    finally:
        for r in (runner, *runners):
            await r.cleanup()


async def test_without_sockets_the_exposition_is_the_process_own(
        primary: services_mod.Services) -> None:
    app = app_mod.create_metrics_app(primary)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        count(primary.metrics, 2)
        status, body = await scrape(f"http://127.0.0.1:{runner.addresses[0][1]}/metrics")
        assert status == 200
        got = samples(body)
        assert value(got, REQ, **REQ_LABELS) == 2
        assert not any(name == "synapse_workers" for name, _ in got)
    finally:
        await runner.cleanup()


async def test_a_hung_worker_is_left_out_within_the_timeout(sock_dir: pathlib.Path) -> None:
    hung = sock_dir / "metrics-1.sock"
    held: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)                       # reads nothing, answers nothing

    server = await asyncio.start_unix_server(never_answer, path=str(hung))
    try:
        own = metrics_mod.Metrics(CollectorRegistry())
        count(own, 7)
        pod = worker_metrics.PodMetrics(timeout_s=0.05)
        got = samples(await pod.exposition(own, [hung]))
        assert value(got, REQ, **REQ_LABELS) == 7
        assert value(got, "synapse_workers", state="answered") == 1
        assert value(got, "synapse_workers", state="missing") == 1
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_the_pods_counters_never_go_back_when_a_worker_misses_or_restarts(
        sock_dir: pathlib.Path) -> None:
    path = sock_dir / "metrics-1.sock"
    own = metrics_mod.Metrics(CollectorRegistry())
    count(own, 1)
    pod = worker_metrics.PodMetrics(timeout_s=1.0)

    async def pod_requests() -> tuple[float, float]:
        got = samples(await pod.exposition(own, [path]))
        return value(got, REQ, **REQ_LABELS), value(got, "synapse_workers", state="missing")

    first = services_mod.build(t.settings())
    count(first.metrics, 5)
    runner = await observability.serve_worker_metrics(first, path)
    assert await pod_requests() == (6, 0)
    await runner.cleanup()                        # the worker is gone: its counts stand
    assert await pod_requests() == (6, 1)

    restarted = services_mod.build(t.settings())  # a new process: its counts start again
    count(restarted.metrics, 2)
    runner = await observability.serve_worker_metrics(restarted, path)
    try:
        assert await pod_requests() == (8, 0)
        count(restarted.metrics, 1)
        assert await pod_requests() == (9, 0)
    finally:
        await runner.cleanup()


async def test_a_worker_answering_something_else_is_left_out(sock_dir: pathlib.Path) -> None:
    path = sock_dir / "metrics-1.sock"
    async def garbled(_: web.Request) -> web.Response:
        return web.Response(text="not { metrics")

    app = web.Application()
    app.router.add_get("/metrics", garbled)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        own = metrics_mod.Metrics(CollectorRegistry())
        got = samples(await worker_metrics.PodMetrics().exposition(own, [path]))
        assert value(got, "synapse_workers", state="missing") == 1
    finally:
        await runner.cleanup()
