"""The runner's probes (when it asks who listens on the engine's port), the warm-up
request a vLLM gets before it is ready, and the compile cache it gets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent import metrics, process
from agent import runner as runners
from agent.core import types
from agent.core.types import Phase
from synapse_common import engine_key
from tests import harness
from tests.agent.conftest import STAND_IN
from tests.agent.supervisor_testing import drive, proc_environ, supervisor_settings
from tests.clock import VirtualTime


async def test_ownership_is_checked_on_becoming_ready_then_every_30s_not_every_probe(
        tmp_path):
    """psutil's walk of the process and socket tables (hundreds of ms on a busy host)
    ran at every liveness probe of every backend (review finding)."""
    vt, checks = VirtualTime(), []

    def owns(pid: int, port: int) -> bool | None:
        checks.append(vt.now)
        return process.tree_listens(pid, port)

    hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n", lambda: None)
    async with aiohttp.ClientSession() as session:
        r = runners.Runner(types.EngineSpec(name="o", engine="simulator", model="m"),
                           supervisor_settings(tmp_path, probe_interval_s=2), session, hooks,
                           "127.0.0.1", timing=vt.time, owns=owns)
        r.start()
        try:
            await drive(vt, lambda: r.phase == Phase.READY, "ready", paced=True)
            assert len(checks) == 1
            ready_at = vt.now
            await drive(vt, lambda: vt.now - ready_at >= 61, "a minute of probes", within=70)
            assert r.phase == Phase.READY
            assert len(checks) == 3   # on becoming ready, then after 30 s twice
            assert checks[2] - checks[1] >= runners.OWNER_RECHECK_S
        finally:
            await r.stop()


async def test_sockets_that_could_not_be_read_are_checked_again_every_probe(tmp_path, caplog):
    """An answer trusted because psutil could not read the engine's sockets is no checked
    answer: it was kept for OWNER_RECHECK_S, so a stranger on the port once they could be
    read again went on getting tenants' prompts until then."""
    vt, checks, readable, interval = VirtualTime(), [], [False], 2

    def owns(pid: int, port: int) -> bool | None:
        checks.append(vt.now)
        return False if readable[0] else None   # readable: another process listens

    hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n", lambda: None)
    caplog.set_level(logging.INFO, logger="agent.supervisor")
    async with aiohttp.ClientSession() as session:
        r = runners.Runner(types.EngineSpec(name="u", engine="simulator", model="m"),
                           supervisor_settings(tmp_path, probe_interval_s=interval), session,
                           hooks, "127.0.0.1", timing=vt.time, owns=owns)
        r.start()
        try:
            await drive(vt, lambda: r.phase == Phase.READY, "ready", paced=True)
            ready_at = vt.now
            await drive(vt, lambda: vt.now - ready_at >= 5, "probes, unreadable", within=10)
            assert r.phase == Phase.READY and len(checks) >= 3     # every probe
            readable[0], readable_at = True, vt.now
            await drive(vt, lambda: r.phase == Phase.UNHEALTHY, "the stranger caught",
                        within=runners.OWNER_RECHECK_S / 2)
            first = next(at for at in checks if at > readable_at)
            assert first - readable_at <= interval
        finally:
            await r.stop()
    said = [rec.getMessage() for rec in caplog.records if "sockets of engine" in rec.getMessage()]
    assert len(said) == 2 and "cannot read" in said[0] and "can be read again" in said[1]


# -- the warm-up request a vLLM gets before it is ready ------------------------------------
KEY = engine_key.derive("agent-token-for-the-runner-warm-up-tests")


def _runner(tmp_path, session: aiohttp.ClientSession, spec: types.EngineSpec,
            **settings: Any) -> runners.Runner:
    hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n", lambda: None)
    cfg = supervisor_settings(tmp_path, vllm_command=STAND_IN, tei_command=STAND_IN,
                    vllm_device="cuda", **settings)
    return runners.Runner(spec, cfg, session, hooks, "127.0.0.1", engine_key=KEY)


def _seen(path: pathlib.Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


async def test_a_vllm_is_ready_only_once_its_warm_up_request_asking_for_logprobs_is_answered(
        tmp_path):
    """vLLM compiles a kernel on the first request that asks for logprobs and every
    request on the engine waits meanwhile: the agent sends that request itself, with the
    engine key, before tenants can be routed to the engine."""
    seen, hold = tmp_path / "seen.jsonl", tmp_path / "hold"
    hold.write_text("1")
    spec = types.EngineSpec(name="v", engine="vllm", model="/models/smol",
                            served_model_names=("smol",), extra_args=(
                                "--completions-file", str(seen), "--completions-hold", str(hold)))
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec)
        r.start()
        try:
            await harness.until(lambda: bool(_seen(seen)), 20, "the warm-up request")
            await asyncio.sleep(0.5)  # five probe intervals: still answering it
            assert (r.phase, r.reason) == (Phase.STARTING, runners.WARMUP_REASON)
            assert _seen(seen) == [{
                "body": {"model": "smol", "prompt": "Hello", "max_tokens": 1, "logprobs": 1,
                         "temperature": 0},
                "authorization": f"Bearer {KEY}"}]
            hold.unlink()
            await harness.until(lambda: r.phase == Phase.READY, 10, "ready")
            assert r.reason == "health check passed" and len(_seen(seen)) == 1
        finally:
            await r.stop()


@pytest.mark.parametrize(("answer", "why", "timeout_s"), [
    (("--completions-hold", "{hold}"), "no answer within 0.5s", 0.5),
    # a time-out far beyond the engine's answer: a loaded machine may take more than half
    # a second to refuse, and the warning would then name the time-out
    (("--completions-status", "400"), "HTTP 400", 30.0),
])
async def test_a_warm_up_that_times_out_or_is_refused_leaves_the_engine_ready_with_a_warning(
        tmp_path, caplog, answer, why, timeout_s):
    """/health passed, so the engine serves: a warm-up it does not answer in time, or
    refuses (a request it would refuse again after any restart), costs one warning, not
    the backend."""
    seen, hold = tmp_path / "seen.jsonl", tmp_path / "hold"
    hold.write_text("1")
    spec = types.EngineSpec(name="w", engine="vllm", model="m", extra_args=(
        "--completions-file", str(seen), *(a.format(hold=hold) for a in answer)))
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec, warmup_timeout_s=timeout_s)
        r.start()
        try:
            await harness.until(lambda: r.phase == Phase.READY, 20, "ready")
            assert len(_seen(seen)) == 1
            warnings = [rec.getMessage() for rec in caplog.records
                        if rec.levelno == logging.WARNING and "warm-up" in rec.getMessage()]
            assert warnings == [f"backend w: warm-up request failed ({why}); ready without "
                                "it: the first request asking for logprobs will stall the "
                                "engine while vLLM compiles"]
        finally:
            await r.stop()


@pytest.mark.parametrize("spec", [
    types.EngineSpec(name="s", engine="simulator", model="m"),
    types.EngineSpec(name="t", engine="tei", model="m", task="embed"),
    types.EngineSpec(name="p", engine="vllm", model="m", task="embed", tasks=("embed",)),
], ids=["simulator", "tei", "pooling-vllm"])
async def test_engines_other_than_a_generating_vllm_get_no_warm_up(tmp_path, spec):
    seen = tmp_path / "seen.jsonl"
    spec = dataclasses.replace(spec, extra_args=("--completions-file", str(seen)))
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec)
        r.start()
        try:
            await harness.until(lambda: r.phase == Phase.READY, 20, "ready")
            assert _seen(seen) == []
        finally:
            await r.stop()


async def test_an_external_backend_gets_no_warm_up(tmp_path):
    posts: list[str] = []

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def completions(request: web.Request) -> web.Response:
        posts.append(await request.text())
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    site = web.AppRunner(app)
    await site.setup()
    port = harness.free_port()
    await web.TCPSite(site, "127.0.0.1", port).start()
    spec = types.EngineSpec(name="x", engine="external", model="m",
                            url=f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as session:
            r = _runner(tmp_path, session, spec)
            r.start()
            try:
                await harness.until(lambda: r.phase == Phase.READY, 10, "ready")
                assert posts == []
            finally:
                await r.stop()
    finally:
        await site.cleanup()


@pytest.mark.parametrize("own", [(), (("TORCHINDUCTOR_CACHE_DIR", "/srv/inductor"),)],
                         ids=["node-default", "spec-env-wins"])
async def test_a_vllm_compiles_into_its_own_cache_unless_its_spec_names_one(tmp_path, own):
    """A restarted engine finds the logprobs kernel its warm-up compiled before."""
    spec = types.EngineSpec(name="c", engine="vllm", model="m", env=own)
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec, compile_cache_dir=str(tmp_path / "compile"))
        r.start()
        try:
            await harness.until(lambda: r.phase == Phase.READY, 20, "ready")
            expected = own[0][1] if own else str(tmp_path / "compile" / "c")
            assert proc_environ(r.pid)["TORCHINDUCTOR_CACHE_DIR"] == expected
        finally:
            await r.stop()


def _held(directory: pathlib.Path) -> list[str] | None:
    """What the directory holds; None when it is gone."""
    return sorted(os.listdir(directory)) if directory.exists() else None


async def test_a_temporary_compile_cache_serves_every_restart_and_goes_when_the_runner_stops(
        tmp_path):
    """A configured cache that cannot be used (here a file in its place) meant a new
    temporary directory at every restart, none removed: a crash-looping engine left one
    directory of compiled kernels per restart behind."""
    (tmp_path / "compile").mkdir()
    (tmp_path / "compile" / "t").write_text("not a directory")
    spec = types.EngineSpec(name="t", engine="vllm", model="m")
    async with aiohttp.ClientSession() as session:
        r = _runner(tmp_path, session, spec, compile_cache_dir=str(tmp_path / "compile"))
        r.start()
        try:
            await harness.until(lambda: r.phase == Phase.READY, 20, "ready")
            scratch = pathlib.Path(proc_environ(r.pid)["TORCHINDUCTOR_CACHE_DIR"])
            assert _held(scratch) == [] and not scratch.is_relative_to(tmp_path)
            (scratch / "kernel.py").write_text("compiled")
            os.killpg(r.pid, signal.SIGKILL)
            await harness.until(lambda: r.restarts == 1 and r.phase == Phase.READY, 20,
                                "ready after a restart")
            assert proc_environ(r.pid)["TORCHINDUCTOR_CACHE_DIR"] == str(scratch)
            assert _held(scratch) == ["kernel.py"]
        finally:
            await r.stop()
    outlived = _held(scratch) is not None
    shutil.rmtree(scratch, ignore_errors=True)
    assert not outlived, "the temporary compile cache outlived the runner"
