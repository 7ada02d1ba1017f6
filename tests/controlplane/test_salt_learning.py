"""Backends whose own ``/openapi.json`` says whether they take ``cache_salt``
(:mod:`controlplane.api.salt_learning`): an agent's ``external`` backend is salted, or
warned of with its counts hidden, as a kind-less static upstream is; and a pod's serving
workers leave those warnings to its primary. The test plays the agent over a real gRPC
stream; the backends are small real servers (:mod:`tests.controlplane.test_upstream_kinds`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from controlplane.core import registry as registry_mod
from controlplane.core import types
from protos.synapse.v1 import common_pb2, controlplane_pb2
from synapse_common import clock as clocks
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane.test_grpc_server import Agent, register
from tests.controlplane.test_upstream_kinds import (
    MSGS,
    CachingEngine,
    SwappedEngine,
    plain_and_sglang,
)

SHARED = "share its prefix cache"
READY = common_pb2.BACKEND_PHASE_READY


def external(seq: int, url: str, phase: int = READY) -> controlplane_pb2.AgentMessage:
    """A report of one external generating backend, ``x``, at ``url``."""
    return controlplane_pb2.AgentMessage(report=controlplane_pb2.Report(
        sequence=seq, backends=[common_pb2.BackendState(
            name="x", url=url, models=[t.MODEL], phase=phase,
            task=common_pb2.BACKEND_TASK_GENERATE,
            engine=common_pb2.ENGINE_KIND_EXTERNAL)]))


def backend(cp: t.RunningCP) -> types.BackendState:
    node = cp.services.registry.node("gpu-1")
    assert node is not None
    (found,) = node.backends
    return found


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and SHARED in r.getMessage()]


@contextlib.asynccontextmanager
async def agent_of(cp: t.RunningCP) -> AsyncIterator[Agent]:
    agent = Agent(cp.grpc_port)
    await agent.send(register())
    try:
        yield agent
    finally:
        await agent.close()


async def reported(agent: Agent, msg: controlplane_pb2.AgentMessage) -> None:
    await agent.send(msg)
    assert (await agent.receive()).ack.sequence == msg.report.sequence


async def back_from_unhealthy(agent: Agent, cp: t.RunningCP, url: str,
                              meanwhile: Callable[[], None]) -> None:
    """The external backend at ``url`` reported and its document read (it takes
    ``cache_salt``); then ``meanwhile`` (the server behind the URL changes), and it is
    reported unhealthy and, once the documents' loop has seen it gone, back."""
    await reported(agent, external(1, url))
    await harness.until(lambda: backend(cp).takes_salt, 20, "its document read")
    meanwhile()
    await reported(agent, external(2, url, common_pb2.BACKEND_PHASE_UNHEALTHY))
    await harness.until(lambda: not backend(cp).takes_salt, 20,
                        "the documents' loop to see it gone (and unsalt it)")
    await reported(agent, external(3, url))


async def cached(cp: t.RunningCP, key: str, stream: bool) -> int:
    client = cp.client(key)
    if not stream:
        whole = await client.chat.completions.create(model="llama", messages=MSGS)
        usage = whole.usage
    else:
        chunks = [c async for c in await client.chat.completions.create(
            model="llama", messages=MSGS, stream=True,
            stream_options={"include_usage": True})]
        usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == 300
    details = usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


async def test_an_agents_external_vllm_learns_from_its_openapi_that_it_takes_the_salt(
        caplog: pytest.LogCaptureFixture) -> None:
    """An agent's ``external`` backend was never salted, whatever it was: the report
    carries no kind that says. Its own document shows the field: salted per tenant."""
    caplog.set_level(logging.INFO)
    engine = SwappedEngine()
    async with engine.running() as url, t.running(t.settings(), with_grpc=True) as cp, \
            agent_of(cp) as agent:
        await reported(agent, external(1, url))
        await harness.until(lambda: backend(cp).takes_salt, 20, "its document read")
        assert not backend(cp).shares_cache
        assert await cached(cp, t.KEY_A, stream=False) == 272, "a salted server's own count"
        assert engine.salts[-1] is not None
        await reported(agent, external(2, url))
        assert backend(cp).takes_salt, "kept for the reports that follow"
        await cached(cp, t.KEY_B, stream=False)
        assert engine.salts[-1] not in (None, engine.salts[0]), "b's own partition"
        assert "backend x of node gpu-1 takes cache_salt" in caplog.text
        assert not warnings(caplog)


async def test_an_agents_external_server_without_the_salt_is_warned_of_and_hidden(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two tenants shared such a backend's prefix cache unwarned, and its answers told
    each how much of its prompt the other had sent (272 cached tokens)."""
    engine = CachingEngine()        # no /openapi.json: a 404
    async with engine.running() as url, t.running(t.settings(), with_grpc=True) as cp, \
            agent_of(cp) as agent:
        await reported(agent, external(1, "http://user:hunter2@" + url.removeprefix("http://")))
        await harness.until(lambda: bool(warnings(caplog)), 20, "the warning")
        (warned,) = warnings(caplog)
        assert warned.startswith("backend x of node gpu-1 (engine external, and its "
                                 "/openapi.json shows no cache_salt)"), warned
        assert "hunter2" not in caplog.text and "127.0.0.1" not in warned
        for key in (t.KEY_A, t.KEY_B):
            for stream in (False, True):
                assert await cached(cp, key, stream) == 0
        assert engine.salts == [None] * 4, "sent no field it may refuse"
        await reported(agent, external(2, url))     # another URL: read there
        await reported(agent, external(3, url))
        await asyncio.sleep(0.5)
        assert len(warnings(caplog)) == 1, "one warning while it says the same"


class HeldDocument(CachingEngine):
    """A server whose ``/openapi.json`` answers (a 404) only once ``released``."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_get("/openapi.json", self.document)

    async def document(self, request: web.Request) -> web.Response:
        await self.released.wait()
        return web.json_response({}, status=404)


async def test_an_agents_external_backends_counts_are_hidden_before_its_document_says(
        ) -> None:
    """Unsalted until its document says otherwise, and so hidden from its first report."""
    engine = HeldDocument()
    async with engine.running() as url, t.running(t.settings(), with_grpc=True) as cp, \
            agent_of(cp) as agent:
        try:
            await reported(agent, external(1, url))
            assert backend(cp).shares_cache and not backend(cp).takes_salt
            assert await cached(cp, t.KEY_B, stream=False) == 0
            assert await cached(cp, t.KEY_B, stream=True) == 0
        finally:
            engine.released.set()


async def test_an_agents_external_backend_is_read_again_when_it_comes_back(
        caplog: pytest.LogCaptureFixture) -> None:
    """Another server may answer at its URL after it was unhealthy: one without the
    field must not be sent ``cache_salt`` nor have its counts shown."""
    engine = SwappedEngine()
    async with engine.running() as url, t.running(t.settings(), with_grpc=True) as cp, \
            agent_of(cp) as agent:
        await back_from_unhealthy(agent, cp, url, lambda: setattr(engine, "takes", False))
        await harness.until(lambda: bool(warnings(caplog)), 20, "read again, and warned")
        assert not backend(cp).takes_salt and backend(cp).shares_cache
        assert await cached(cp, t.KEY_A, stream=False) == 0
        assert engine.salts[-1] is None


def test_what_a_document_said_holds_at_its_url_only() -> None:
    reg = registry_mod.Registry(clocks.monotonic, 30.0)
    reg.register(types.NodeInfo("gpu-1"))
    at = {"a": types.BackendState("gpu-1/x", "gpu-1", "x", "http://a", (t.MODEL,),
                                  engine="external", shares_cache=True)}
    at["b"] = types.BackendState("gpu-1/x", "gpu-1", "x", "http://b", (t.MODEL,),
                                 engine="external", shares_cache=True)

    def marks() -> tuple[bool, bool]:
        node = reg.node("gpu-1")
        assert node is not None
        return node.backends[0].takes_salt, node.backends[0].shares_cache

    reg.report("gpu-1", [at["a"]])
    reg.set_agent_salted("gpu-1", "x", "http://a", True, True)
    assert marks() == (True, False)
    reg.report("gpu-1", [at["a"]])
    assert marks() == (True, False)
    reg.report("gpu-1", [at["b"]])
    assert marks() == (False, True), "another URL, maybe another server"
    reg.report("gpu-1", [])
    reg.report("gpu-1", [at["a"]])
    assert marks() == (False, True), "forgotten once no report named it"
    reg.set_agent_salted("gpu-1", "x", "http://a", True, True)
    reg.set_agent_salted("gpu-1", "x", "http://a", False, True)
    assert marks() == (False, True), "a server swapped behind the URL is shared again"


async def test_a_serving_worker_leaves_the_sharing_warnings_to_its_primary(
        caplog: pytest.LogCaptureFixture) -> None:
    """With ``http.workers: N`` every process logged each warning: N of them per pod."""
    caplog.set_level(logging.DEBUG)
    engine = CachingEngine()
    async with engine.running() as url:
        s = plain_and_sglang(url, "other")
        for primary in (False, True):
            caplog.clear()
            async with t.running(s, with_grpc=True, primary=primary) as cp:
                await harness.until(lambda: "static/plain (no kind" in caplog.text, 20,
                                    "the kind-less upstream's document read")
                assert len(warnings(caplog)) == (2 if primary else 0), warnings(caplog)
                async with agent_of(cp) as agent:
                    await reported(agent, external(1, url))
                    await harness.until(lambda: "backend x of node gpu-1 (engine"
                                        in caplog.text, 20, "the external one's read")
                assert len(warnings(caplog)) == (3 if primary else 0), warnings(caplog)


class MovedDocument(SwappedEngine):
    """A server whose ``/openapi.json`` may redirect (``moved``): an answer that says
    nothing for certain."""

    def __init__(self) -> None:
        super().__init__()
        self.moved = False

    async def document(self, request: web.Request) -> web.Response:
        if self.moved:
            raise web.HTTPFound("/elsewhere")
        return await super().document(request)


async def test_an_agents_external_backend_back_with_no_certain_document_is_unsalted(
        ) -> None:
    """Back from unhealthy with a document that answered a 302, the backend kept its
    earlier "takes cache_salt": the salt sent and its counts shown for as long as the re-read said nothing for certain."""
    engine = MovedDocument()
    async with engine.running() as url, t.running(t.settings(), with_grpc=True) as cp, \
            agent_of(cp) as agent:
        await back_from_unhealthy(agent, cp, url, lambda: setattr(engine, "moved", True))
        assert not backend(cp).takes_salt and backend(cp).shares_cache
        await asyncio.sleep(0.5)        # its re-read answered nothing certain
        assert not backend(cp).takes_salt and backend(cp).shares_cache
        assert await cached(cp, t.KEY_A, stream=False) == 0
        assert engine.salts[-1] is None
        engine.moved = False
        await harness.until(lambda: backend(cp).takes_salt, 20, "a certain answer")


async def test_a_kindless_upstream_back_with_no_certain_document_is_unsalted(
        caplog: pytest.LogCaptureFixture) -> None:
    """The same for a kind-less static upstream: its earlier verdict was kept."""
    caplog.set_level(logging.INFO)
    engine = MovedDocument()
    async with engine.running() as url:
        s = t.settings(upstreams=[{"name": "plain", "url": url, "models": [t.MODEL]}])
        async with t.running(s) as cp:

            def plain() -> types.BackendState:
                (found,) = cp.services.registry.static_backends()
                return found

            await harness.until(lambda: plain().takes_salt, 20, "its document read")
            engine.up, engine.moved = False, True
            await harness.until(lambda: "static/plain is unhealthy" in caplog.text, 20,
                                "down")
            engine.up = True
            await harness.until(lambda: caplog.text.count("static/plain is healthy") == 2, 20,
                                "back")
            assert not plain().takes_salt and plain().shares_cache
            await asyncio.sleep(0.5)        # its re-reads answered nothing certain
            assert not plain().takes_salt and plain().shares_cache
            assert await cached(cp, t.KEY_A, stream=False) == 0
            assert engine.salts[-1] is None
            engine.moved = False
            await harness.until(lambda: plain().takes_salt, 20, "a certain answer")
