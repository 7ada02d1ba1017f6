"""A backend's context length (``max_model_len``) in the agent's report: asked of the
running engine (vLLM's ``/v1/models``, which the simulator imitates) when it becomes
ready, read to a bound with no redirect followed, a missing or nonsensical value read as
unknown; else the spec's explicit length; forgotten when the engine stops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import convert, engine_context, metrics
from agent import runner as runners
from agent.core import commands, types
from agent.core.types import Phase
from synapse_common import engine_key
from tests import harness
from tests.agent.conftest import STAND_IN, engine_command
from tests.agent.supervisor_testing import supervisor_settings
from tests.http_standins import served

KEY = engine_key.derive("agent-token-for-the-engine-context-tests")


def _runner(tmp_path, session: aiohttp.ClientSession, spec: types.EngineSpec,
            **settings: Any) -> runners.Runner:
    hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n", lambda: None)
    cfg = supervisor_settings(tmp_path, vllm_command=STAND_IN, warmup_timeout_s=0,
                              **settings)
    return runners.Runner(spec, cfg, session, hooks, "127.0.0.1", engine_key=KEY)


async def _ready(r: runners.Runner) -> types.BackendStatus:
    r.start()
    await harness.until(lambda: r.phase == Phase.READY, 30, "ready")
    return r.status(draining=False)


async def test_a_simulator_reports_the_length_it_lists_itself(tmp_path) -> None:
    """No length in the spec: only the engine knows the one it settled on (the
    simulator, like vLLM, caps its own by its KV cache), and its report carries it."""
    spec = types.EngineSpec(name="s", engine="simulator", model="m")
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec, simulator_command=engine_command())
        try:
            status = await _ready(r)
            async with session.get(r.probe_url + "/v1/models",
                                   headers=engine_key.headers(KEY)) as resp:
                listed = (await resp.json())["data"][0]["max_model_len"]
            assert listed > 0 and status.max_model_len == listed
            assert convert.backend(status).max_model_len == listed
        finally:
            await r.stop()
        assert r.status(draining=False).max_model_len == 0    # a stopped engine's is not


@pytest.mark.parametrize(("extra", "length", "expected"), [
    ((), 2048, 2048), (("--max-model-len", "8k"), 2048, 8000),
    (("--max-model-len=auto",), 2048, 0), ((), None, 0)],
    ids=["spec", "extra-args-win", "auto-is-no-length", "none"])
async def test_an_engine_that_lists_no_length_reports_the_specs_explicit_one(
        tmp_path, extra: tuple[str, ...], length: int | None, expected: int) -> None:
    """The stand-in vLLM serves no ``/v1/models``: the length vLLM was told is reported
    (its extra arguments win, as in vLLM's parser), and none when it was told none."""
    spec = types.EngineSpec(name="v", engine="vllm", model="m", max_model_len=length,
                            extra_args=extra)
    assert commands.max_model_len(spec) == expected
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec)
        try:
            assert (await _ready(r)).max_model_len == expected
        finally:
            await r.stop()


async def test_an_external_backend_reports_what_its_listing_says(tmp_path) -> None:
    listed = {"object": "list", "data": [{"id": "m", "max_model_len": 32768}]}
    async with served(_engine(lambda: web.json_response(listed))) as url, \
            aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, types.EngineSpec(name="x", engine="external",
                                                        model="m", url=url))
        try:
            assert (await _ready(r)).max_model_len == 32768
        finally:
            await r.stop()


def _engine(models: Callable[[], web.StreamResponse]) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def listing(request: web.Request) -> web.StreamResponse:
        return models()

    async def elsewhere(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m", "max_model_len": 4096}]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", listing)
    app.router.add_get("/elsewhere", elsewhere)
    return app


def _listing(*entries: dict[str, Any]) -> Callable[[], web.StreamResponse]:
    return lambda: web.json_response({"object": "list", "data": list(entries)})


@pytest.mark.parametrize(("answer", "expected"), [
    (_listing({"id": "m", "max_model_len": 4096}), 4096),
    # one engine, one length; the smallest is the one every request fits
    (_listing({"id": "m", "max_model_len": 4096}, {"id": "alias", "max_model_len": 2048},
              {"id": "not-ours", "max_model_len": 16}), 2048),
    (_listing({"id": "not-ours", "max_model_len": 4096}), 0),
    (_listing({"id": "m"}), 0),
    (_listing({"id": "m", "max_model_len": None}), 0),
    (_listing({"id": "m", "max_model_len": True}), 0),
    (_listing({"id": "m", "max_model_len": 4096.5}), 0),
    (_listing({"id": "m", "max_model_len": "4096"}), 0),
    (_listing({"id": "m", "max_model_len": 0}), 0),
    (_listing({"id": "m", "max_model_len": -1}), 0),
    (_listing({"id": "m", "max_model_len": 2**31}), 0),
    (_listing({"id": ["m"], "max_model_len": 4096}), 0),
    (lambda: web.json_response({"data": {"m": 4096}}), 0),
    (lambda: web.json_response([1, 2]), 0),
    (lambda: web.Response(body=b"[" * 100_000), 0),          # nested past the parser
    (lambda: web.Response(body=b"not json"), 0),
    (lambda: web.json_response({"error": "no"}, status=404), 0),
    (lambda: web.json_response({"error": "no"}, status=500), None),   # no answer: ask again
    (lambda: web.Response(status=302, headers={"Location": "/elsewhere"}), 0),  # not followed
    (lambda: web.Response(body=json.dumps({"data": [{"id": "m", "max_model_len": 4096}],
                                           "pad": "x" * engine_context.MAX_BYTES})), 0),
], ids=["listed", "smallest-of-ours", "not-ours", "absent", "null", "bool", "fraction",
        "string", "zero", "negative", "over-2**31-1", "list-id", "data-not-a-list",
        "not-an-object", "nested", "not-json", "status-404", "status-500", "redirect",
        "over-the-bound"])
async def test_only_a_sane_length_for_the_backends_models_is_taken(
        answer: Callable[[], web.StreamResponse], expected: int | None) -> None:
    """An ``external`` engine is any server at a URL: whatever it answers, the agent
    reads a bounded body and reports a length or none."""
    async with served(_engine(answer)) as url, aiohttp.ClientSession() as session:
        assert await engine_context.ask(session, url, ("m", "alias"), 10) == expected


async def test_an_engine_that_does_not_answer_in_time_gave_no_answer() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"data": [{"id": "m", "max_model_len": 4096}]})

    app = web.Application()
    app.router.add_get("/v1/models", slow)
    async with served(app) as url, aiohttp.ClientSession() as session:
        assert await engine_context.ask(session, url, ("m",), 0.2) is None
