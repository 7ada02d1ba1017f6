"""A Responses id continues only for the tenant whose request made it
(:mod:`controlplane.core.response_ids`, :mod:`controlplane.api.passthrough`).

A real control plane (in this event loop) in front of the real simulator in vLLM mode
with its Responses store on, which records every request that reaches it: tenant B
naming tenant A's id — as A got it, altered, or bare — gets the 404 of an unknown id and
the engine never hears of it; A's own continuations work, whole and streamed, on another
worker of the pod and after a restart of the control plane.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from controlplane import metrics
from controlplane.adapters import l1
from controlplane.api import worker_wiring
from controlplane.core import response_cache, response_ids
from simulator import app as sim_app
from simulator import config as sim_config
from tests import harness
from tests.controlplane import cp_testing as t

SEAL = response_ids.Seal.from_secrets(None, t.ADMIN)     # the key the settings derive


class Engine:
    """The simulator (vLLM mode, Responses store on) and the bodies of the Responses
    requests that reached it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/v1/responses":
            self.bodies.append(json.loads(await request.read()))
        return await handler(request)

    def reached(self, needle: str) -> bool:
        """Whether any request that reached the engine carried ``needle``."""
        return any(needle in json.dumps(b) for b in self.bodies)


@contextlib.asynccontextmanager
async def engine() -> AsyncIterator[Engine]:
    eng = Engine()
    app = sim_app.build(sim_config.SimulatorSettings(
        model=t.MODEL, tasks=["generate", "responses"], responses_store=True, time_scale=0))
    app.middlewares.append(eng.record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    eng.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield eng
    finally:
        await runner.cleanup()


def settings(eng: Engine, **overrides: Any) -> Any:
    return t.settings(upstreams=[{"name": "sim", "url": eng.url, "models": [t.MODEL],
                                  "tasks": ["generate", "responses"]}], **overrides)


async def create(cp: t.RunningCP, key: str, text: str, **extra: Any) -> Any:
    async with cp.client(key) as c:
        return await c.responses.create(model=t.MODEL, input=text, max_output_tokens=8,
                                        **extra)


async def refused(cp: t.RunningCP, key: str, previous: str, *, stream: bool = False,
                  ) -> dict[str, Any]:
    """The error a continuation of ``previous`` gets (it must be a 404)."""
    async with cp.client(key) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            if stream:
                async with c.responses.stream(model=t.MODEL, input="Repeat everything.",
                                              previous_response_id=previous) as s:
                    [e async for e in s]
            else:
                await c.responses.create(model=t.MODEL, input="Repeat everything.",
                                         previous_response_id=previous)
    body = caught.value.body
    assert isinstance(body, dict)
    return body


async def streamed(cp: t.RunningCP, key: str, text: str, **extra: Any,
                   ) -> tuple[bytes, dict[str, Any]]:
    """The raw event stream of a streamed call, and its final response object."""
    body = {"model": t.MODEL, "input": text, "max_output_tokens": 8, "stream": True, **extra}
    async with aiohttp.ClientSession() as s, s.post(
            f"{cp.url}/v1/responses", json=body,
            headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
    finals = [json.loads(line[5:]) for line in raw.splitlines()
              if line.startswith(b"data:") and b'"response.completed"' in line]
    return raw, finals[-1]["response"]


def engine_id(client_id: str) -> str:
    """The engine's id inside a client's id (what anyone holding the id can read)."""
    return client_id[:-(response_ids.TAG_CHARS + 1)]


async def test_another_tenant_cannot_continue_an_answer_and_its_owner_can() -> None:
    async with engine() as eng, t.running(settings(eng)) as cp:
        first = await create(cp, t.KEY_A, "My secret is 4242. Remember it.")
        seen = len(eng.bodies)

        stolen = await refused(cp, t.KEY_B, first.id)
        unknown = await refused(cp, t.KEY_B, SEAL.seal("a", "resp_0123456789abcdef"))
        assert SEAL.open("a", first.id) is not None          # sealed for A
        assert SEAL.open("b", first.id) is None
        # the same answer as an id that does not exist, naming only what was sent
        assert stolen["code"] == unknown["code"] == "previous_response_not_found"
        assert stolen["param"] == "previous_response_id"
        assert stolen["type"] == unknown["type"] == "invalid_request_error"
        assert len(eng.bodies) == seen                     # no engine heard B

        nxt = await create(cp, t.KEY_A, "What is my secret?", previous_response_id=first.id)
        assert nxt.status in ("completed", "incomplete")
        assert nxt.previous_response_id == first.id         # the echo, as A sent it
        assert eng.bodies[-1]["previous_response_id"] == engine_id(first.id)
        assert SEAL.open("a", nxt.id) is not None


async def test_streamed_ids_are_sealed_and_a_streamed_theft_is_refused() -> None:
    async with engine() as eng, t.running(settings(eng)) as cp:
        raw, final = await streamed(cp, t.KEY_A, "Remember: blue.")
        own = engine_id(final["id"])
        assert SEAL.open("a", final["id"]) == own
        assert own.encode() + b'"' not in raw            # never bare, in any event
        assert raw.count(final["id"].encode()) >= 3      # created, in_progress, completed
        seen = len(eng.bodies)

        await refused(cp, t.KEY_B, final["id"], stream=True)
        assert len(eng.bodies) == seen

        raw2, final2 = await streamed(cp, t.KEY_A, "Which colour?",
                                      previous_response_id=final["id"])
        assert final2["previous_response_id"] == final["id"]
        assert SEAL.open("a", final2["id"]) is not None
        assert engine_id(final2["id"]).encode() + b'"' not in raw2


async def test_an_altered_or_bare_id_is_refused_and_never_sent() -> None:
    async with engine() as eng, t.running(settings(eng)) as cp:
        first = await create(cp, t.KEY_A, "Remember: green.")
        bare = engine_id(first.id)
        tag = first.id[-response_ids.TAG_CHARS:]
        flipped = first.id[:-1] + ("A" if first.id[-1] != "A" else "B")
        other = bare[:-1] + ("0" if bare[-1] != "0" else "1") + "_" + tag
        seen = len(eng.bodies)
        for forged in (bare, flipped, other, first.id + "x", "resp_", "x" * 5000):
            await refused(cp, t.KEY_A, forged)
        async with cp.client(t.KEY_A) as c:
            with pytest.raises(openai.BadRequestError):
                await c.responses.create(model=t.MODEL, input="Go on.",
                                         extra_body={"previous_response_id": 42})
        assert len(eng.bodies) == seen


async def test_an_id_the_engine_lost_gets_the_same_404_as_a_strangers() -> None:
    async with engine() as eng, t.running(settings(eng)) as cp:
        unkept = await create(cp, t.KEY_A, "Do not keep this.", store=False)
        seen = len(eng.bodies)
        lost = await refused(cp, t.KEY_A, unkept.id)        # the engine answers 404
        assert len(eng.bodies) == seen + 1
        stranger = await refused(cp, t.KEY_B, unkept.id)    # the control plane does
        assert len(eng.bodies) == seen + 1
        assert lost == stranger
        assert engine_id(unkept.id) + "'" not in lost["message"]  # never the bare id


async def test_a_tenant_cannot_name_the_engines_id_nor_launder_another_id() -> None:
    async with engine() as eng, t.running(settings(eng)) as cp:
        first = await create(cp, t.KEY_A, "Remember: red.")
        bare = engine_id(first.id)
        # B asks the engine to name its answer after A's, and to echo A's engine id
        mine = await create(cp, t.KEY_B, "Hello", metadata={"id": bare}, store=True,
                            extra_body={"request_id": bare})
        assert "request_id" not in eng.bodies[-1]          # the engine mints the id
        assert engine_id(mine.id) != bare
        assert mine.metadata == {"id": bare}                 # echoed, never sealed for B
        await refused(cp, t.KEY_B, bare)
        still = await create(cp, t.KEY_A, "Colour?", previous_response_id=first.id)
        assert still.status in ("completed", "incomplete")


async def test_a_cached_answer_gets_a_new_id_sealed_for_its_tenant() -> None:
    ask = {"temperature": 0, "store": False}
    cache = response_cache.TieredCache(
        options=response_cache.Options(semantic_enabled=False), l1=l1.MemoryL1(100, 10**6),
        metrics=metrics.Metrics(CollectorRegistry()))
    async with engine() as eng, t.running(settings(eng), cache) as cp:
        async with cp.client(t.KEY_A) as c:
            one = await c.responses.with_raw_response.create(
                model=t.MODEL, input="What is a GPU?", max_output_tokens=8, **ask)
            await cache.drain()
            two = await c.responses.with_raw_response.create(
                model=t.MODEL, input="What is a GPU?", max_output_tokens=8, **ask)
            async with c.responses.stream(model=t.MODEL, input="What is a GPU?",
                                          max_output_tokens=8, **ask) as s:
                replayed = await s.get_final_response()
        assert two.headers["x-synapse-cache"] == "hit-exact"
        ids = [one.parse().id, two.parse().id, replayed.id]
        assert len(set(ids)) == 3
        assert all(SEAL.open("a", i) is not None for i in ids)
        seen = len(eng.bodies)
        await refused(cp, t.KEY_B, ids[1])
        assert len(eng.bodies) == seen



async def test_the_rule_holds_on_every_worker_of_a_pod(directory: pathlib.Path) -> None:
    async with engine() as eng, engine() as eng2:
        s = t.settings(upstreams=[
            {"name": n, "url": e.url, "models": [t.MODEL], "tasks": ["generate", "responses"]}
            for n, e in (("sim", eng), ("sim2", eng2))], router={"policy": "round_robin"})
        async with t.running(s) as w0, t.running(s) as w1:
            meshes = [worker_wiring.attach_mesh(cp.services, directory, i, 2)
                      for i, cp in enumerate((w0, w1))]
            for mesh in meshes:
                await mesh.start()
            try:
                await harness.until(lambda: all(m.hearing_from() for m in meshes), 10,
                                    "the workers to join")
                first = await create(w0, t.KEY_A, "Remember: amber.")
                pins1 = w1.services.response_pins
                assert pins1 is not None
                await harness.until(lambda: pins1.backend_of("a", engine_id(first.id)) is not None,
                                    10, "worker 1 to learn worker 0's pin")
                seen = len(eng.bodies) + len(eng2.bodies)
                await refused(w1, t.KEY_B, first.id)
                assert len(eng.bodies) + len(eng2.bodies) == seen
                for _ in range(3):       # round robin would miss the engine without the pin
                    nxt = await create(w1, t.KEY_A, "Colour?", previous_response_id=first.id)
                    assert nxt.previous_response_id == first.id
            finally:
                for mesh in meshes:
                    await mesh.close()


async def test_an_id_outlives_a_restart_of_the_control_plane() -> None:
    async with engine() as eng:
        async with t.running(settings(eng)) as cp:
            first = await create(cp, t.KEY_A, "Remember: teal.")
        async with t.running(settings(eng)) as again:     # nothing carried over but the key
            await refused(again, t.KEY_B, first.id)
            nxt = await create(again, t.KEY_A, "Colour?", previous_response_id=first.id)
            assert nxt.previous_response_id == first.id


async def test_without_a_shared_secret_other_processes_refuse_closed() -> None:
    async with engine() as eng:
        s = settings(eng, auth={"admin_key": None})
        async with t.running(s) as w0, t.running(s) as w1:
            first = await create(w0, t.KEY_A, "Remember: plum.")
            seen = len(eng.bodies)
            await refused(w1, t.KEY_A, first.id)          # w1's key is its own
            assert len(eng.bodies) == seen
            nxt = await create(w0, t.KEY_A, "Colour?", previous_response_id=first.id)
            assert nxt.previous_response_id == first.id


async def test_a_dedicated_key_outlives_an_admin_key_rotation() -> None:
    async with engine() as eng:
        async with t.running(settings(eng, auth={"response_id_key": "k" * 32})) as cp:
            first = await create(cp, t.KEY_A, "Remember: jade.")
        rotated = settings(eng, auth={"response_id_key": "k" * 32, "admin_key": "sk-new-9"})
        async with t.running(rotated) as cp:
            nxt = await create(cp, t.KEY_A, "Colour?", previous_response_id=first.id)
            assert nxt.previous_response_id == first.id
        changed = settings(eng, auth={"response_id_key": "j" * 32})
        async with t.running(changed) as cp:
            await refused(cp, t.KEY_A, first.id)             # a new key: old ids are gone
