"""Upstreams of every kind (issue 17): the kind decides the probe and the metrics, the
model name is mapped both ways, a ``/v1`` base URL is the same server, and the key
reaches the upstream and nowhere else. Ollama is a stand-in that follows Ollama's
documented API (:mod:`tests.ollama_standin`); the hosted API a small server that wants
its key; the engine metrics come from the engine simulator and, in ``tests/engines``,
from the real vLLM and llama-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
from collections.abc import AsyncIterator, Callable

import aiohttp
import openai
import pytest
from aiohttp import web

from controlplane import config, errors
from controlplane.adapters import prober as prober_mod
from controlplane.adapters import upstream as upstream_mod
from controlplane.api import services as services_mod
from controlplane.api import upstream_wiring
from controlplane.core import types, upstream_kinds, upstream_metrics
from simulator import app as sim_app
from simulator import config as sim_config
from synapse_common import read_limits
from tests import fleet, harness
from tests.clock import ManualClock, SteppedSleep
from tests.controlplane import cp_testing as t
from tests.ollama_standin import OllamaStandIn

KEY = "sk-upstream-proxy-5c1e9a7b3d2f4e60"
MSGS = [{"role": "user", "content": "hi"}]


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


def routable(cp: t.RunningCP, key: str) -> bool:
    return any(b.key == key and not why for b, why in cp.services.registry.all_backends())


# -- Ollama ------------------------------------------------------------------------------


async def test_ollama_is_probed_where_it_answers_and_serves_under_its_own_model_name(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ollama = OllamaStandIn()
    await ollama.start()
    try:
        s = t.settings(upstreams=[{
            "name": "ollama", "url": ollama.url + "/v1/", "kind": "ollama",
            "models": [t.MODEL], "model_names": {t.MODEL: "llama3.1:8b"}, "api_key": KEY}])
        async with t.running(s) as cp:
            await until(lambda: bool(ollama.seen("/api/version")), "a probe of /api/version")
            assert routable(cp, "static/ollama") and not ollama.seen("/health")
            client = cp.client()
            reply = await client.chat.completions.create(model="llama", messages=MSGS)
            assert (reply.model, reply.choices[0].message.content) == \
                ("llama", "Hello from Ollama")
            headers, body = ollama.seen("/v1/chat/completions")[-1]
            assert json.loads(body)["model"] == "llama3.1:8b"
            assert headers["Authorization"] == f"Bearer {KEY}", "the key reached Ollama"
            stream = await client.chat.completions.create(
                model=t.MODEL, messages=MSGS, stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            assert {c.model for c in chunks} == {t.MODEL}
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
                == "Hello from Ollama"
            assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
            text = await client.completions.create(model="llama", prompt="Say hi")
            assert (text.model, text.choices[0].text) == ("llama", "Hello from Ollama")
            await client.close()
            leaked = await _exposed(cp.url)
        assert KEY not in caplog.text and KEY not in leaked, "the key is never logged"
    finally:
        await ollama.stop()


async def _exposed(url: str) -> str:
    """What the control plane shows about itself: metrics, stats, readiness."""
    out = []
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/ready", "/api/v1/stats"):
            async with s.get(url + path, headers={"Authorization": f"Bearer {t.ADMIN}"}) as r:
                out.append(await r.text())
    return "\n".join(out)


async def test_without_its_kind_an_ollama_fails_the_health_probe() -> None:
    ollama = OllamaStandIn()
    await ollama.start()
    try:
        s = t.settings(upstreams=[{"name": "ollama", "url": ollama.url, "models": [t.MODEL]}])
        async with t.running(s) as cp:
            await until(lambda: bool(ollama.seen("/health")), "a probe of /health")
            await until(lambda: not routable(cp, "static/ollama"), "unhealthy")
    finally:
        await ollama.stop()


async def test_a_kindless_upstream_given_with_v1_is_the_same_server() -> None:
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url + "/v1")])) as cp:
            client = cp.client()
            reply = await client.chat.completions.create(model="llama", messages=MSGS)
            assert reply.choices[0].message.content == "hello from one"
            await until(lambda: b.health_hits > 0, "a probe of /health (not /v1/health)")
            await client.close()


# -- a hosted OpenAI-compatible API ------------------------------------------------------


class HostedAPI:
    """Answers ``GET /v1/models`` with the right key only (401 otherwise), or 429."""

    def __init__(self) -> None:
        self.probes: list[str | None] = []
        self.rate_limited = False

    async def models(self, request: web.Request) -> web.Response:
        self.probes.append(request.headers.get("Authorization"))
        if self.rate_limited:
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini"}]})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        async with t.served(app) as url:
            yield f"{url}/v1"


async def test_a_hosted_api_is_probed_with_its_key_at_most_once_a_minute() -> None:
    api = HostedAPI()
    async with api.running() as url:
        hosted = {"name": "hosted", "url": url, "kind": "openai", "models": ["gpt-4o-mini"],
                  "api_key": KEY}
        engine = {"name": "engine", "url": "http://127.0.0.1:9", "kind": "vllm",
                  "models": [t.MODEL], "api_key": KEY}
        svc = services_mod.build(t.settings(upstreams=[hosted, engine],
                                            registry={"upstream_probe_interval_s": 5}))
        targets = {x.key: x for x in upstream_wiring.targets(svc)}
        assert targets["static/hosted"].interval_s == 60.0
        assert targets["static/engine"].interval_s == 5.0
        assert targets["static/engine"].headers == {}, "an engine's health path is public"
        clock = ManualClock()
        stepped = SteppedSleep(clock)
        done = asyncio.Event()

        async def sleep(seconds: float) -> None:     # three virtual minutes, then stop
            if clock.now + seconds > 180:
                done.set()
                await asyncio.Event().wait()
            await stepped(seconds)

        reports: list[tuple[str, bool]] = []
        client = upstream_mod.UpstreamClient(1.0, 2.0, 2.0)
        await client.start()
        run = asyncio.create_task(prober_mod.Prober(
            client, list(targets.values()), lambda k, ok: reports.append((k, ok)),
            clock=clock, sleep=sleep).run())
        await asyncio.wait_for(done.wait(), 60)
        run.cancel()
        await client.close()
        assert api.probes == [f"Bearer {KEY}"] * 4     # at 0, 60, 120 and 180 s
        assert ("static/hosted", True) in reports and ("static/engine", False) in reports
        assert sum(1 for k, _ in reports if k == "static/engine") == 37   # every 5 s


async def test_a_hosted_api_with_a_wrong_key_is_unhealthy_and_429_is_not() -> None:
    api = HostedAPI()
    async with api.running() as url:
        client = upstream_mod.UpstreamClient(1.0, 2.0, 2.0)
        await client.start()
        for key, rate_limited, healthy in [("wrong", False, False), (KEY, True, True),
                                           (KEY, False, True)]:
            api.rate_limited = rate_limited
            u = t.settings(upstreams=[{"name": "h", "url": url, "kind": "openai",
                                       "models": ["m"], "api_key": key}]).upstreams[0]
            backend = types.BackendState(key="static/h", node="static", name="h",
                                         url=upstream_kinds.base_url(url), models=("m",),
                                         api_key=key)
            target = upstream_wiring.target(u, backend, 5.0)
            assert await prober_mod.probe(client, target) is healthy, (key, rate_limited)
        await client.close()


# -- engine metrics by kind --------------------------------------------------------------


SGLANG = """# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 3.0
sglang:num_running_reqs{model_name="m",tp_rank="1"} 2.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 7.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.28
"""
TGI = """# TYPE tgi_queue_size gauge
tgi_queue_size 4
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 6
"""
LLAMACPP = """# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""


def test_each_engine_kind_is_read_with_its_own_names(reference_dir: pathlib.Path) -> None:
    def load(kind: str, text: str) -> types.EngineLoad:
        names = upstream_kinds.KINDS[kind].metrics
        assert names is not None
        return upstream_metrics.parse(text, names)

    assert load("sglang", SGLANG) == types.EngineLoad(waiting=7, running=5, kv_usage=0.28)
    assert load("tgi", TGI) == types.EngineLoad(waiting=4, running=6)
    assert load("llamacpp", LLAMACPP) == types.EngineLoad(waiting=2, running=1)
    vllm = load("vllm", (reference_dir / "vllm_metrics_sample.txt").read_text())
    assert vllm.ok and 0 < vllm.kv_usage < 0.01
    assert load("vllm", "<html>not metrics</html>").ok is False
    assert upstream_kinds.KINDS["ollama"].metrics is None
    assert upstream_kinds.KINDS["openai"].metrics is None


async def test_a_vllm_kind_upstream_gives_the_router_its_engine_load(
        processes: harness.ProcessPool) -> None:
    port = harness.free_port()
    processes.start("sim", fleet.simulator_argv(port, t.MODEL, time_scale=0),
                    ready_url=f"http://127.0.0.1:{port}/health")
    url = f"http://127.0.0.1:{port}"
    s = t.settings(upstreams=[{"name": "vllm", "url": url, "kind": "vllm", "models": [t.MODEL]},
                              {"name": "plain", "url": url, "models": [t.MODEL]}])
    async with t.running(s) as cp:
        def backend(key: str) -> types.BackendState:
            return next(b for b in cp.services.registry.static_backends() if b.key == key)

        await until(lambda: backend("static/vllm").kv_capacity_tokens > 0, "a scrape")
        scraped = backend("static/vllm")
        assert scraped.block_size == 16 and scraped.metrics_ok
        assert scraped.kv_capacity_tokens % scraped.block_size == 0
        assert backend("static/plain").kv_capacity_tokens == 0, "no kind, no metrics"


# -- prefix caches tenants share (probe 82, F1) and keys in refusals (F10) ---------------


@contextlib.asynccontextmanager
async def _simulator() -> AsyncIterator[str]:
    """The engine simulator in this loop (it caches prefixes and takes cache_salt, as vLLM)."""
    app = sim_app.build(sim_config.SimulatorSettings(model=t.MODEL, time_scale=0))
    async with t.served(app) as url:
        yield url


async def _ready(cp: t.RunningCP) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            async with session.get(cp.url + "/ready") as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("never ready")


async def _cached_tokens(cp: t.RunningCP, key: str, prompt: str) -> int:
    client = cp.client(key)
    reply = await client.chat.completions.create(
        model="llama", max_tokens=2, messages=[{"role": "user", "content": prompt}])
    assert reply.usage is not None and reply.usage.prompt_tokens > 200
    details = reply.usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


async def test_a_kindless_vllm_learns_from_its_openapi_that_it_takes_the_salt() -> None:
    """An upstream listed without ``kind`` got no ``cache_salt``, so one prefix cache
    served every tenant: tenant b's first request for a's prompt reported 272 cached
    tokens (and came sooner). Its ``/openapi.json`` shows the field: salted per tenant."""
    async with _simulator() as url:
        s = t.settings(upstreams=[{"name": "plain", "url": url, "models": [t.MODEL]}])
        async with t.running(s) as cp:
            await _ready(cp)    # the first probes, the upstream's /openapi.json read with them
            prompt = "Confidential merger memo " + "lorem ipsum " * 120
            assert await _cached_tokens(cp, t.KEY_A, prompt) == 0
            assert await _cached_tokens(cp, t.KEY_B, prompt) == 0, "a's prompt, cached for b"
            assert await _cached_tokens(cp, t.KEY_A, prompt) > 0, "a's own repeat hits"


class _Answer:
    def __init__(self, status: int, body: bytes = b"{}") -> None:
        self.status, self.body = status, body
        self.chunks = [body]

    async def read(self) -> bytes:
        return self.body

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        return self.chunks.pop(0) if self.chunks else None

    def close(self) -> None:
        pass


async def test_an_upstreams_document_is_read_once_and_a_slow_one_holds_up_no_probe() -> None:
    """The first round waits for the document (``/ready`` then knows what the server
    is); a document that failed is asked for again after a later healthy probe, and that
    fetch, which may take long (vLLM builds the document on its first request), runs
    beside the schedule instead of holding up the probes of every upstream."""
    asked: list[str] = []
    documents: list[tuple[str, int, int]] = []     # key, status, probes before it
    hold = asyncio.Event()

    class Sender:
        async def send(self, method: str, url: str, body: bytes, headers: object,
                       timeout_s: float | None = None) -> _Answer:
            asked.append(url.rsplit("/", 1)[1])
            if url.endswith("/openapi.json"):
                if asked.count("openapi.json") == 1:
                    raise errors.UpstreamConnectError("reset")
                await hold.wait()           # the second fetch takes its time
                return _Answer(200, b'{"paths": {}}')
            return _Answer(200)

    clock = ManualClock()
    rounds = 0

    async def sleep(seconds: float) -> None:
        nonlocal rounds
        rounds += 1
        clock.now += seconds
        if rounds == 6:
            hold.set()
        await asyncio.sleep(0.01)

    async def document(key: str, status: int, body: bytes) -> None:
        documents.append((key, status, asked.count("health")))

    targets = [prober_mod.Target("static/u", "http://u/health", interval_s=1.0,
                                 document_url="http://u/openapi.json")]
    run = asyncio.create_task(prober_mod.Prober(
        Sender(), targets, lambda k, ok: None, on_round=lambda: asked.append("round"),
        on_document=document, clock=clock, sleep=sleep).run())
    await until(lambda: bool(documents), "the document read")
    await until(lambda: asked.count("health") >= 12, "probes after it")
    run.cancel()
    assert asked[:3] == ["health", "openapi.json", "round"], "the first round waited for it"
    assert asked.count("openapi.json") == 2, "asked again once, then never"
    (key, status, probes), = documents
    assert (key, status) == ("static/u", 200)
    assert probes >= 5, "the probes went on while the second fetch was held"


class CachingEngine:
    """A server that takes no ``cache_salt`` (no /openapi.json) and reports cached tokens;
    a prompt of ``refuse`` is refused with a 400 quoting the Authorization it was sent."""

    USAGE = {"prompt_tokens": 300, "completion_tokens": 1, "total_tokens": 301,
             "prompt_tokens_details": {"cached_tokens": 272}}
    EXTRA: dict[str, object] = {}       # more fields of the last chunk / whole answer
    HEADERS: dict[str, str] = {}

    def __init__(self) -> None:
        self.salts: list[str | None] = []    # the cache_salt of each chat request

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.salts.append(body.get("cache_salt"))
        if body["messages"][-1]["content"] == "refuse":
            return web.json_response({"error": {"message": "invalid request for key "
                                                f"{request.headers.get('Authorization')}",
                                                "type": "invalid_request_error"}}, status=400)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                 "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**chunk, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}], "usage": self.USAGE, **self.EXTRA},
                headers=self.HEADERS)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           **self.HEADERS})
        await resp.prepare(request)
        events = [{**chunk, "choices": [{"index": 0, "delta": {"content": "ok"},
                                         "finish_reason": "stop"}]},
                  {**chunk, "choices": [], "usage": self.USAGE, **self.EXTRA}]
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        for at in range(0, len(data), 7):       # the counts cut across reads
            await resp.write(data[at:at + 7])
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        self.routes(app)
        async with t.served(app) as url:
            yield url


def plain_and_sglang(url: str, plain_serves: str) -> config.ControlPlaneSettings:
    """Settings with two static upstreams at ``url``: ``plain`` (no kind, serving
    ``plain_serves``) and ``sgl`` (kind ``sglang``, serving ``other``); the model
    ``t.MODEL`` is also called ``llama``."""
    return t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]}, {"name": "other"}],
                      upstreams=[{"name": "plain", "url": url, "models": [plain_serves]},
                                 {"name": "sgl", "url": url, "kind": "sglang",
                                  "models": ["other"]}])


async def test_an_unsalted_upstream_tenants_share_is_warned_of_and_hides_its_cached_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    engine = CachingEngine()
    async with engine.running() as url:
        async with t.running(plain_and_sglang(url, t.MODEL)) as cp:
            await until(lambda: "static/plain (no kind" in caplog.text,
                        "the warning for the kind-less upstream, once its document was read")
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                      and "share its prefix cache" in r.getMessage()]
            assert len(warned) == 2 and "static/sgl (kind sglang)" in warned[0], warned
            assert "time to the first token" in warned[0]
            client = cp.client()
            for model in ("llama", "other"):
                whole = await client.chat.completions.create(model=model, messages=MSGS)
                assert whole.usage is not None and whole.usage.prompt_tokens == 300
                assert whole.usage.prompt_tokens_details is not None
                assert whole.usage.prompt_tokens_details.cached_tokens == 0, model
                stream = await client.chat.completions.create(
                    model=model, messages=MSGS, stream=True,
                    stream_options={"include_usage": True})
                chunks = [c async for c in stream]
                usage = chunks[-1].usage
                assert usage is not None and usage.prompt_tokens_details is not None
                assert usage.prompt_tokens_details.cached_tokens == 0, model
            # Messages over chat: no cache reads either, the whole prompt is input.
            async with aiohttp.ClientSession() as session, session.post(
                    cp.url + "/v1/messages", json={"model": "llama", "max_tokens": 4,
                                                   "messages": MSGS},
                    headers={"x-api-key": t.KEY_A}) as r:
                usage = (await r.json())["usage"]
            assert usage["input_tokens"] == 300 and usage.get("cache_read_input_tokens") == 0


class TimingEngine(CachingEngine):
    """llama-server's ``timings`` (``cache_n``: the cached tokens; ``prompt_ms``: the
    prefill's time), DeepSeek's hit and miss counts, TGI's timing headers."""

    USAGE = {"prompt_tokens": 300, "completion_tokens": 1, "total_tokens": 301,
             "prompt_cache_hit_tokens": 272, "prompt_cache_miss_tokens": 28}
    EXTRA = {"timings": {"cache_n": 272, "prompt_n": 28, "prompt_ms": 4.2,
                         "predicted_n": 1, "predicted_ms": 9.5}}
    HEADERS = {"x-compute-time": "0.012", "x-queue-time": "0", "x-time-per-token": "9",
               "x-inference-time": "14", "x-compute-type": "gpu"}


async def test_a_shared_upstreams_timings_and_cache_counts_under_other_names_are_hidden(
        ) -> None:
    """Review 90, F2: tenant b saw ``"cached_tokens":0`` beside llama.cpp's
    ``"timings":{"cache_n":272,"prompt_ms":4.2}``, DeepSeek's hit count, and TGI's
    server timings in the headers. Dropped, whole and streamed, for a shared backend."""
    engine = TimingEngine()
    async with engine.running() as url:
        s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]}],
                       upstreams=[{"name": "lcpp", "url": url, "kind": "llamacpp",
                                   "models": [t.MODEL]}])
        async with t.running(s) as cp, aiohttp.ClientSession() as session:
            for stream in (False, True):
                async with session.post(cp.url + "/v1/chat/completions", json={
                        "model": "llama", "messages": MSGS, "stream": stream,
                        "stream_options": {"include_usage": True} if stream else None},
                        headers={"Authorization": f"Bearer {t.KEY_B}"}) as r:
                    assert r.status == 200
                    body = await r.read()
                    names = {k.lower() for k in r.headers}
                assert b"timings" not in body and b"272" not in body, body
                assert b'"prompt_cache_miss_tokens":300' in body, body
                assert not names & {"x-compute-time", "x-queue-time", "x-time-per-token",
                                    "x-inference-time"}, names
                assert "x-compute-type" not in names, "no engine header but Content-Type"


class HostileHeadersEngine(CachingEngine):
    """A compromised engine's headers, each of which a client's SDK or browser acts on."""

    HEADERS = {"Set-Cookie": "session=planted; Path=/", "WWW-Authenticate": "Basic realm=x",
               "Proxy-Authenticate": "Basic", "Location": "http://elsewhere.example/",
               "Refresh": "0; url=http://elsewhere.example/",
               "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true",
               "Strict-Transport-Security": "max-age=0", "Content-Security-Policy": "none",
               "Alt-Svc": 'h2=":4443"', "X-Synapse-Backend": "forged", "X-Request-Id": "forged",
               "Content-Language": "xx", "X-Anything": "1"}


async def test_only_the_content_type_of_an_engine_s_headers_reaches_the_client() -> None:
    """A deny list let Set-Cookie, WWW-Authenticate, Location, Access-Control-*,
    Strict-Transport-Security and the rest through, whole, streamed and translated."""
    engine = HostileHeadersEngine()
    ours = {"content-type", "content-length", "date", "server", "transfer-encoding",
            "cache-control", "x-request-id", "request-id", "connection"}
    async with engine.running() as url:
        s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]}],
                       upstreams=[{"name": "v", "url": url, "kind": "vllm",
                                   "models": [t.MODEL]}])
        async with t.running(s) as cp, aiohttp.ClientSession() as session:
            asks = [("/v1/chat/completions", {"stream": False}),
                    ("/v1/chat/completions", {"stream": True}),
                    ("/v1/messages", {"max_tokens": 4})]
            for path, extra in asks:
                async with session.post(cp.url + path, json={
                        "model": "llama", "messages": MSGS, **extra},
                        headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                    assert r.status == 200, await r.text()
                    names = {k.lower() for k in r.headers}
                    assert r.headers["x-synapse-backend"] == "static/v"
                    assert r.headers["x-request-id"] != "forged"
                    assert r.content_type in ("application/json", "text/event-stream")
                theirs = {n for n in names - ours if not n.startswith("x-synapse")}
                assert theirs == set(), (path, extra, theirs)


async def test_a_relayed_429_keeps_its_retry_after_in_seconds_or_milliseconds() -> None:
    """A hosted provider's 429 is relayed (only a 5xx fails over) and the OpenAI SDK waits
    by its Retry-After / retry-after-ms; the allow list dropped them. Only whole numbers
    pass: anything else an engine could say there stays out."""
    async def chat(request: web.Request) -> web.Response:
        retry = {"Retry-After": "7", "retry-after-ms": "7000"}
        if request.headers.get("Authorization") != "Bearer k":
            return web.json_response({}, status=401)
        if (await request.json())["messages"][0]["content"] == "odd":
            retry = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT",
                     "retry-after-ms": "1; url=http://elsewhere.example/"}
        return web.json_response({"error": {"message": "slow down", "type": "rate_limit"}},
                                 status=429, headers=retry)

    async with t.served(t.hosted_api(chat)) as url:
        s = t.settings(upstreams=[t.hosted("h", url, api_key="k")])
        async with t.running(s) as cp, aiohttp.ClientSession() as session:
            for content, expected in (("hi", ("7", "7000")), ("odd", (None, None))):
                async with session.post(cp.url + "/v1/chat/completions", json={
                        "model": t.MODEL, "messages": [{"role": "user", "content": content}]},
                        headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                    assert r.status == 429
                    assert (r.headers.get("Retry-After"),
                            r.headers.get("retry-after-ms")) == expected


async def test_one_tenant_alone_on_an_upstream_is_not_warned_of(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = CachingEngine()
    async with engine.running() as url:
        s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]}, {"name": "other"}],
                       upstreams=[{"name": "sgl", "url": url, "kind": "sglang",
                                   "models": [t.MODEL]}],
                       auth={"tenants": [{"name": "a", "keys": [t.KEY_A]},
                                         {"name": "b", "keys": [t.KEY_B],
                                          "allowed_models": ["other"]}]})
        async with t.running(s) as cp:
            reply = await cp.client().chat.completions.create(model="llama", messages=MSGS)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            assert reply.usage.prompt_tokens_details.cached_tokens == 272
    assert "share its prefix cache" not in caplog.text


async def test_an_upstreams_refusal_reaches_the_tenant_without_its_api_key() -> None:
    """Masked in a 5xx's detail only: a 400 quoting the key the upstream was sent gave it
    to any tenant, in OpenAI's shape and in Anthropic's (probe 82, F10)."""
    engine = CachingEngine()
    async with engine.running() as url:
        s = t.settings(upstreams=[{"name": "keyed", "url": url, "models": [t.MODEL],
                                   "api_key": KEY}])
        async with t.running(s) as cp:
            refuse = [{"role": "user", "content": "refuse"}]
            with pytest.raises(openai.BadRequestError) as info:
                await cp.client().chat.completions.create(model="llama", messages=refuse)
            assert "invalid request for key Bearer [its api_key]" in str(info.value)
            assert KEY[8:20] not in str(info.value)
            async with aiohttp.ClientSession() as session, session.post(
                    cp.url + "/v1/messages", json={"model": "llama", "max_tokens": 4,
                                                   "messages": refuse},
                    headers={"x-api-key": t.KEY_A}) as r:
                assert r.status == 400
                body = await r.text()
            assert body.startswith('{"type":"error"') and "[its api_key]" in body
            assert KEY[8:20] not in body


class _Endless(_Answer):
    """A 200 whose body never ends (1 MiB a read); reading it whole fails the test."""

    def __init__(self) -> None:
        super().__init__(200)
        self.reads = 0

    async def read(self) -> bytes:
        raise AssertionError("the whole body was read")

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None:
        self.reads += 1
        return b" " * (1 << 20)


async def _documents_read(answers: Callable[[int], _Answer | Exception],
                          health: Callable[[int], int], probes: int,
                          ) -> tuple[list[tuple[int, int]], int]:
    """Runs a prober over one kind-less target for ``probes`` health probes: ``health``
    gives the n-th probe's status, ``answers`` the n-th document fetch's answer. The
    documents given to ``on_document`` (status, size) and how many fetches were made."""
    fetched = 0
    done: list[tuple[int, int]] = []
    probed = 0

    class Sender:
        async def send(self, method: str, url: str, body: bytes, headers: object,
                       timeout_s: float | None = None) -> _Answer:
            nonlocal fetched, probed
            if url.endswith("/openapi.json"):
                fetched += 1
                answer = answers(fetched)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            probed += 1
            return _Answer(health(probed))

    async def document(key: str, status: int, body: bytes) -> None:
        done.append((status, len(body)))

    clock = ManualClock()

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0.01)

    targets = [prober_mod.Target("static/u", "http://u/health", interval_s=1.0, fail_after=1,
                                 document_url="http://u/openapi.json")]
    run = asyncio.create_task(prober_mod.Prober(
        Sender(), targets, lambda k, ok: None, on_document=document,
        clock=clock, sleep=sleep).run())
    await until(lambda: probed >= probes, f"{probes} probes")
    await asyncio.sleep(0.05)
    run.cancel()
    return done, fetched


async def test_a_document_that_said_nothing_for_certain_is_asked_for_again() -> None:
    """Review 90, F5: any answer marked the document read for good, so a vLLM whose
    document answered 503 once (a proxy warming up) was never asked again and stayed
    unsalted, its prefix cache shared, until a restart. Only a 200, or a 404 / 405 (no
    document), is an answer; anything else is asked again after a healthy probe."""
    statuses = {1: 503, 2: 502}
    done, fetched = await _documents_read(
        lambda n: errors.UpstreamReadError("reset") if n == 3
        else _Answer(statuses.get(n, 200), b'{"paths": {}}'), lambda n: 200, 8)
    assert done == [(200, 13)] and fetched == 4
    done, fetched = await _documents_read(lambda n: _Answer(404, b"no"), lambda n: 200, 6)
    assert done == [(404, 2)] and fetched == 1, "no document: asked once"


async def test_a_document_is_read_again_when_its_upstream_comes_back() -> None:
    """Review 90, F5: learnt once, the answer held for good, so another server put
    behind the URL (one without the field) kept being counted as salted and its counts
    were not hidden. An upstream that comes back after being unhealthy is read again."""
    done, fetched = await _documents_read(
        lambda n: _Answer(200, b'{"paths": {}}'), lambda n: 503 if n in (3, 4) else 200, 8)
    assert fetched == 2 and len(done) == 2


async def test_a_documents_read_stops_past_its_limit() -> None:
    """Review 90, F4: the whole body was read (up to 256 MiB), and only then was its
    length checked against the document's 16 MiB."""
    endless = _Endless()
    done, _ = await _documents_read(lambda n: endless, lambda n: 200, 2)
    assert done == [(200, 0)], "too long: no document"
    assert endless.reads == read_limits.OPENAPI_MAX_BYTES // (1 << 20) + 1


class SwappedEngine(CachingEngine):
    """A server whose ``/openapi.json`` shows ``cache_salt`` until it is swapped for one
    without it (down for a while in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.takes = True, True

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_get("/openapi.json", self.document)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=200 if self.up else 503)

    async def document(self, request: web.Request) -> web.Response:
        fields = {"messages": {}, **({"cache_salt": {}} if self.takes else {})}
        return web.json_response({"paths": {"/v1/chat/completions": {"post": {
            "requestBody": {"content": {"application/json": {"schema": {
                "properties": fields}}}}}}}})


async def test_a_server_swapped_behind_an_upstreams_url_is_learnt_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review 90, F5: the document was read once, so a URL that came to point at a
    server without the field kept being sent ``cache_salt`` and counted as salted: no
    warning, its cached counts not hidden. Read again once it is back."""
    engine = SwappedEngine()
    async with engine.running() as url:
        s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]}],
                       upstreams=[{"name": "plain", "url": url, "models": [t.MODEL]}])
        async with t.running(s) as cp:
            await _ready(cp)
            reply = await cp.client().chat.completions.create(model="llama", messages=MSGS)
            assert engine.salts[-1] is not None, "salted: its document shows the field"
            assert "share its prefix cache" not in caplog.text
            engine.up, engine.takes = False, False
            await until(lambda: "static/plain is unhealthy" in caplog.text, "down")
            engine.up = True
            await until(lambda: "static/plain (no kind" in caplog.text, "learnt again")
            reply = await cp.client().chat.completions.create(model="llama", messages=MSGS)
            assert engine.salts[-1] is None, "the new server takes no salt"
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
