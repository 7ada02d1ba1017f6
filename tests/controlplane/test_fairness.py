"""Tenants sharing a fleet, through real control planes and the official openai client:
token limits and budgets across two replicas sharing a private Redis, usage equal to the
answers' usage (streams that did not ask for it included, cache hits as saved), the fair
queue putting an interactive request ahead of a batch flood, and coalescing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from controlplane import ctl
from controlplane import metrics as metrics_mod
from controlplane.adapters import l1, usage_journal
from controlplane.api import admin_grpc, fairness_wiring, grpc_server
from controlplane.api import app as app_mod
from controlplane.core import fairness, pricing, response_cache, token_limits, usage_book
from synapse_common.ports import free_port
from tests import harness
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t

HI = [{"role": "user", "content": "hi"}]
USAGE = (5, 3)                      # what the stand-in backend reports (prompt, completion)


def settings(**sections: Any) -> Any:
    # A slow probe round: a busy machine must not flap the one backend.
    return t.settings(**{"registry": {"upstream_probe_interval_s": 5.0}, **sections})


@contextlib.asynccontextmanager
async def ready(s: Any, **kw: Any) -> AsyncIterator[t.RunningCP]:
    async with t.running(s, **kw) as cp:
        await harness.until(lambda: app_mod.routable_count(cp.services) > 0, 20, "a backend")
        yield cp


@contextlib.asynccontextmanager
async def admin_of(cp: t.RunningCP) -> AsyncIterator[int]:
    """The replica's Admin gRPC service on a free port."""
    server, port = await grpc_server.start("127.0.0.1", 0, [admin_grpc.admin(cp.services)])
    try:
        yield port
    finally:
        await server.stop(0)


def book(cp: t.RunningCP) -> usage_book.UsageBook:
    b = fairness_wiring.get(cp.services).book
    assert b is not None
    return b


async def accounted(cp: t.RunningCP, tenant: str) -> usage_book.Counts:
    return usage_book.totals(await book(cp).query(tenant))


async def settled(cp: t.RunningCP, tenant: str, requests: int) -> usage_book.Counts:
    """The tenant's usage once ``requests`` requests are accounted (settlement runs just
    after the answer's last byte)."""
    for _ in range(500):
        counts = await accounted(cp, tenant)
        if counts.requests >= requests:
            return counts
        await asyncio.sleep(0.01)
    raise AssertionError(f"{requests} requests of {tenant} were never accounted")


def tiered() -> response_cache.TieredCache:
    return response_cache.TieredCache(
        options=response_cache.Options(semantic_enabled=False), l1=l1.MemoryL1(1000, 10**7),
        metrics=metrics_mod.Metrics(CollectorRegistry()))


@contextlib.asynccontextmanager
async def cached_replica(mode: str) -> AsyncIterator[
        tuple[t.RunningCP, t.FakeBackend, response_cache.TieredCache, openai.AsyncOpenAI]]:
    """One replica with an in-process response cache in front of one stand-in backend of
    ``mode``, and tenant a's client (closed at the end)."""
    cache = tiered()
    async with t.backends(("one", mode)) as (backend,):
        s = settings(upstreams=[t.upstream("one", backend.url)])
        async with ready(s, cache=cache) as cp:
            client = cp.client()
            yield cp, backend, cache, client
            await client.close()


async def test_admission_charges_each_sequence_its_completion_estimate() -> None:
    """A request of n choices generates n sequences: one chat of n=64 and max_tokens=32
    was charged 32 completion tokens while vLLM ran 64 (probe 68, F1)."""
    rule = token_limits.ScopeRule("a", "", tokens_per_minute=10_000)
    fair = fairness.Fairness(
        {"a": fairness.TenantPolicy(tenant=rule)},
        token_limits.TokenLimiter(token_limits.LocalTokenStore(ManualClock())),
        pricing.PriceTable({}), None, None, fairness.Options(default_completion_tokens=100))
    charge = await fair.admit("a", t.MODEL, 10, 32, sequences=4)
    assert (charge.prompt_tokens, charge.completion_tokens) == (10, 4 * 32)
    charge = await fair.admit("a", t.MODEL, 10, 0, sequences=3)    # no max_tokens
    assert charge.completion_tokens == 3 * 100
    assert (await fair.admit("a", t.MODEL, 10, 32)).completion_tokens == 32


async def test_n_choices_are_charged_n_times_and_more_than_max_n_is_a_400() -> None:
    tenants = [{"name": "a", "keys": [t.KEY_A], "tokens_per_minute": 1000}]
    async with t.backends(("one", "slow")) as (backend,):
        s = settings(auth={"tenants": tenants}, upstreams=[t.upstream("one", backend.url)])
        async with ready(s) as cp:
            client = cp.client(t.KEY_A)
            tiny = {"model": "llama", "max_tokens": 1, "messages": HI}
            held = [client.chat.completions.create(  # 4 choices x 300 > the minute's 1000
                        model="llama", messages=HI, max_tokens=300, n=4, stream=True),
                    client.completions.create(      # a batch of 2 prompts x 2 choices
                        model="llama", prompt=["a", "b"], n=2, max_tokens=300, stream=True)]
            for done, pending in enumerate(held, start=1):
                # An answer in flight holds its estimate: every sequence's max_tokens ...
                stream = await pending
                await anext(stream)
                with pytest.raises(openai.RateLimitError) as refused:
                    await client.chat.completions.create(**tiny)
                assert "1000 tokens per minute" in refused.value.message
                async for _ in stream:
                    pass
                # ... and once it ends, the engine's usage is what it costs, as any answer.
                await settled(cp, "a", done)
            await client.chat.completions.create(**tiny, n=3)
            assert json.loads(backend.bodies[-1])["n"] == 3
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(**tiny, n=9)
            assert bad.value.param == "n" and "http.max_n" in bad.value.message
            await client.close()


async def test_token_limit_and_budget_hold_across_two_replicas_sharing_redis(
        redis_server: harness.RedisServer) -> None:
    tenants = [{"name": "a", "keys": [t.KEY_A], "tokens_per_minute": 1000},
               {"name": "b", "keys": [t.KEY_B], "budget": {"tokens": 50, "period": "day"}}]
    s = settings(auth={"tenants": tenants}, redis={"url": redis_server.url, "timeout_s": 1.0})
    async with t.backends(("one", "slow")) as (backend,):
        s = s.model_copy(update={"upstreams": t.settings(
            upstreams=[t.upstream("one", backend.url)]).upstreams})
        async with ready(s) as cp1, ready(s) as cp2, admin_of(cp2) as admin_port:
            a1, a2 = cp1.client(t.KEY_A), cp2.client(t.KEY_A)
            big = {"model": "llama", "max_tokens": 900, "messages": HI}
            # An answer in flight on replica 1 holds its estimate (prompt + 900) ...
            stream = await a1.chat.completions.create(**big, stream=True)
            await anext(stream)
            with pytest.raises(openai.RateLimitError) as refused:
                await a2.chat.completions.create(**big)
            assert refused.value.code == "rate_limit_exceeded"
            assert "1000 tokens per minute" in refused.value.message
            assert int(refused.value.response.headers["Retry-After"]) >= 1
            async for _ in stream:
                pass
            # ... and once it ends, what it really used (its usage) is all it costs.
            await settled(cp1, "a", 1)
            await a2.chat.completions.create(**big)

            b1, b2 = cp1.client(t.KEY_B), cp2.client(t.KEY_B)
            small = {"model": "llama", "max_tokens": 10, "messages": HI}
            answered = 0
            with pytest.raises(openai.RateLimitError) as over:
                for i in range(20):
                    await (b1 if i % 2 else b2).chat.completions.create(**small)
                    answered += 1
                    for cp in (cp1, cp2):
                        await book(cp).flush()
                    await settled(cp1, "b", answered)
            # 8 tokens each: the 7th starts at 48 of 50, the 8th finds the budget spent.
            assert answered == 7 and over.value.code == "budget_exceeded"
            assert int(over.value.response.headers["Retry-After"]) >= 1
            for client in (b1, b2):
                with pytest.raises(openai.RateLimitError):
                    await client.chat.completions.create(**small)
            for cp in (cp1, cp2):
                await book(cp).flush()
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = await asyncio.to_thread(ctl.main, [
                    "--server", f"127.0.0.1:{admin_port}", "get", "usage", "--tenant", "b",
                    "-o", "json"], {"SYNAPSE_ADMIN_TOKEN": t.ADMIN})
            assert code == 0, err.getvalue()
            rows = json.loads(out.getvalue())
            assert [(r["tenant"], r["requests"], r["prompt_tokens"], r["completion_tokens"])
                    for r in rows] == [("b", 7, 7 * USAGE[0], 7 * USAGE[1])]
            for c in (a1, a2, b1, b2):
                await c.close()


async def test_usage_equals_the_answers_usage_and_cache_hits_count_as_saved() -> None:
    async with cached_replica("ok") as (cp, backend, cache, client):
        ask = {"model": "llama", "temperature": 0}
        plain = await client.chat.completions.create(
            **ask, messages=[{"role": "user", "content": "one"}])
        asked = [c async for c in await client.chat.completions.create(
            **ask, messages=[{"role": "user", "content": "two"}], stream=True,
            stream_options={"include_usage": True})]
        silent = [c async for c in await client.chat.completions.create(
            **ask, messages=[{"role": "user", "content": "three"}], stream=True)]
        # The engine was asked for usage the client did not want; the client never sees it.
        assert json.loads(backend.bodies[-1])["stream_options"] == {"include_usage": True}
        assert all(c.usage is None for c in silent) and silent[-1].choices
        await cache.drain()
        hit = await client.chat.completions.with_raw_response.create(
            **ask, messages=[{"role": "user", "content": "one"}])
        assert hit.headers["x-synapse-cache"] == "hit-exact"
        replay = [c async for c in await client.chat.completions.create(
            **ask, messages=[{"role": "user", "content": "three"}], stream=True,
            stream_options={"include_usage": True})]
        seen = [plain.usage, asked[-1].usage, hit.parse().usage, replay[-1].usage]
        assert all(u is not None for u in seen)
        counts = await settled(cp, "a", 5)
        engine = [plain.usage, asked[-1].usage]
        assert counts.prompt_tokens == sum(u.prompt_tokens for u in engine) + USAGE[0]
        assert counts.completion_tokens == (sum(u.completion_tokens for u in engine)
                                            + USAGE[1])
        assert counts.cache_hit_tokens == sum(u.total_tokens for u in seen[2:])
        assert counts.requests == 5 and counts.errors == 0
        m = cp.services.metrics.tokens
        assert m.labels("a", t.MODEL, "prompt")._value.get() == counts.prompt_tokens
        assert m.labels("a", t.MODEL, "cache_hit")._value.get() == counts.cache_hit_tokens
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{cp.url}/api/v1/stats",
                                headers={"Authorization": f"Bearer {t.ADMIN}"}) as r:
                today = (await r.json())["fairness"]["usage_today"][f"a/{t.MODEL}"]
        assert today == counts.as_dict()


async def test_stats_answer_without_usage_when_redis_is_down() -> None:
    # Nothing listens there: every Redis call of this replica fails.
    s = settings(redis={"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_s": 0.2})
    async with t.backends(("one", "ok")) as (backend,):
        s = s.model_copy(update={"upstreams": t.settings(
            upstreams=[t.upstream("one", backend.url)]).upstreams})
        async with ready(s) as cp:
            client = cp.client()
            await client.chat.completions.create(model="llama", messages=HI)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{cp.url}/api/v1/stats",
                                    headers={"Authorization": f"Bearer {t.ADMIN}"}) as r:
                    assert r.status == 200, await r.text()
                    snap = await r.json()
            assert snap["fairness"]["usage_today"] is None
            assert "usage store unreachable" in snap["fairness"]["usage_error"]
            assert snap["fairness"]["queue_waiting"] == {}
            assert snap["fleet_error"]      # the rest of the stats: this replica's own
            async with admin_of(cp) as admin_port:
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = await asyncio.to_thread(ctl.main, [
                        "--server", f"127.0.0.1:{admin_port}", "get", "usage"],
                        {"SYNAPSE_ADMIN_TOKEN": t.ADMIN})
            assert code != 0 and "usage store is unreachable" in err.getvalue(), err.getvalue()
            await client.close()


async def test_a_batch_flood_does_not_delay_an_interactive_request_beyond_one_slot() -> None:
    tenants = [{"name": "noisy", "keys": [t.KEY_A], "priority": "batch"},
               {"name": "quiet", "keys": [t.KEY_B], "priority": "interactive"}]
    # Bound 0: a backend with anything in flight has no room, so it serves one at a time.
    fair = {"queue": {"enabled": True, "max_queue_wait_s": 0.0, "poll_interval_s": 0.02}}
    async with t.backends(("one", "slow")) as (backend,):
        s = settings(upstreams=[t.upstream("one", backend.url)], auth={"tenants": tenants},
                     fairness=fair)
        async with ready(s) as cp:
            noisy, quiet = cp.client(t.KEY_A), cp.client(t.KEY_B)
            gate = fairness_wiring.get(cp.services).gate
            assert gate is not None

            async def batch(i: int) -> None:
                with contextlib.suppress(openai.APIError):
                    async for _ in await noisy.chat.completions.create(
                            model="llama", stream=True,
                            messages=[{"role": "user", "content": f"batch {i}"}]):
                        pass

            flood = [asyncio.create_task(batch(i)) for i in range(6)]
            await harness.until(lambda: gate.depth(t.MODEL) == 5, 20, "the flood to queue")
            answer = await quiet.chat.completions.with_raw_response.create(
                model="llama", messages=[{"role": "user", "content": "interactive"}])
            assert answer.status_code == 200
            received = [json.loads(b)["messages"][0]["content"] for b in backend.bodies]
            # The backend served one batch request, then the interactive one.
            assert received[:2] == ["batch 0", "interactive"], received
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
            await noisy.close()
            await quiet.close()


async def test_a_request_the_queue_held_settles_its_tenants_place_by_what_it_used() -> None:
    fair = {"queue": {"enabled": True, "max_queue_wait_s": 0.0, "poll_interval_s": 0.02}}
    async with t.backends(("one", "slow")) as (backend,):
        s = settings(upstreams=[t.upstream("one", backend.url)], fairness=fair)
        async with ready(s) as cp:
            client = cp.client(t.KEY_A)
            gate = fairness_wiring.get(cp.services).gate
            assert gate is not None
            settled_calls: list[tuple[Any, ...]] = []
            settle = gate.settle
            gate.settle = lambda *a: (settled_calls.append(a), settle(*a))[1]  # type: ignore

            async def streamed(text: str) -> None:
                async for _ in await client.chat.completions.create(
                        model="llama", stream=True, stream_options={"include_usage": True},
                        messages=[{"role": "user", "content": text}]):
                    pass

            first = asyncio.create_task(streamed("first"))
            await harness.until(lambda: len(backend.bodies) == 1, 20, "the first to run")
            second = asyncio.create_task(streamed("second"))    # no room: it queues
            await harness.until(lambda: gate.depth(t.MODEL) == 1, 20, "the second to queue")
            await asyncio.gather(first, second)
            # only the held request settles, by the engine's usage (prompt + completion)
            assert len(settled_calls) == 1, settled_calls
            model, tenant, _, _, charged, used = settled_calls[0]
            assert (model, tenant, used) == (t.MODEL, "a", sum(USAGE)) and charged > used
            await client.close()


async def test_fifty_identical_requests_make_one_backend_call() -> None:
    async with cached_replica("slow") as (cp, backend, _, client):
        ask = {"model": "llama", "temperature": 0, "messages": HI}

        async def streamed() -> tuple[str, str]:
            raw = await client.chat.completions.with_raw_response.create(**ask, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                            if c.choices])
            return raw.headers["x-synapse-cache"], text

        async def whole() -> tuple[str, str]:
            raw = await client.chat.completions.with_raw_response.create(**ask)
            return raw.headers["x-synapse-cache"], raw.parse().choices[0].message.content

        answers = await asyncio.gather(*(streamed() if i % 2 else whole()
                                         for i in range(50)))
        assert len(backend.bodies) == 1
        assert {text for _, text in answers} == {"hello from one"}
        assert sorted(status for status, _ in answers) == ["hit-exact"] * 49 + ["miss"]
        counts = await settled(cp, "a", 50)
        assert counts.prompt_tokens == USAGE[0] and counts.cache_hit_tokens == 49 * 8


async def test_an_admin_invalidation_drops_the_answers_the_coalescer_holds() -> None:
    """A landed answer is kept a few seconds for requests that arrive before its cache
    write; after an invalidation it must not answer either."""
    async with cached_replica("ok") as (cp, backend, cache, client):
        ask = {"model": "llama", "temperature": 0, "messages": HI}
        first = await client.chat.completions.with_raw_response.create(**ask)
        assert first.headers["x-synapse-cache"] == "miss"
        await cache.drain()
        async with admin_of(cp) as admin_port:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = await asyncio.to_thread(ctl.main, [
                    "--server", f"127.0.0.1:{admin_port}", "cache", "invalidate",
                    "--tenant", "a"], {"SYNAPSE_ADMIN_TOKEN": t.ADMIN})
            assert code == 0, err.getvalue()
        again = await client.chat.completions.with_raw_response.create(**ask)
        assert again.headers["x-synapse-cache"] == "miss" and len(backend.bodies) == 2


async def test_followers_of_a_failed_request_go_on_their_own() -> None:
    async with cached_replica("break") as (_, backend, _, client):
        async def one() -> None:
            stream = await client.chat.completions.create(
                model="llama", temperature=0, messages=HI, stream=True)
            with contextlib.suppress(openai.APIError):
                async for _ in stream:
                    pass

        await asyncio.gather(*(one() for _ in range(5)))
        # A cut stream is never an answer to copy: every request went to the backend.
        assert len(backend.bodies) == 5


PRICED = {"prices": {t.MODEL: {"prompt_per_million": 1_000_000.0,
                               "completion_per_million": 2_000_000.0}}}


async def _stream_until_content(url: str, body: dict[str, Any]) -> bytes:
    """Stream a chat answer as tenant a, reading until a content delta arrived, then close
    the connection (a client that went away mid-stream)."""
    got = b""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
            assert r.status == 200
            while b'"content"' not in got:
                got += await r.content.readany()
            r.close()           # the socket, not the rest of the body
    return got


async def test_a_stream_its_client_cut_is_billed_for_its_prompt_and_the_deltas_sent() -> None:
    async with t.backends(("one", "slow")) as (backend,):
        s = settings(upstreams=[t.upstream("one", backend.url)], fairness=PRICED)
        async with ready(s) as cp:
            got = await _stream_until_content(cp.url, {
                "model": "llama", "max_tokens": 250, "stream": True, "messages": HI})
            counts = await settled(cp, "a", 1)
    # One content delta ("hello") reached the client before it went away; the engine's
    # usage never came, so the request is billed from the control plane's own counts.
    assert got.count(b'"content"') == 1
    assert counts.prompt_tokens > 0 and counts.completion_tokens == 1
    assert counts.cost == pytest.approx(counts.prompt_tokens + 2 * counts.completion_tokens)
    assert counts.estimated == 1 and counts.requests == 1 and counts.errors == 1
    m = cp.services.metrics.tokens
    assert m.labels("a", t.MODEL, "completion")._value.get() == 1
    assert m.labels("a", t.MODEL, "prompt")._value.get() == counts.prompt_tokens


async def test_a_stream_the_engine_cut_is_estimated_and_a_refused_request_costs_nothing(
        ) -> None:
    async with t.backends(("one", "break")) as (backend,):
        s = settings(upstreams=[t.upstream("one", backend.url)], fairness=PRICED)
        async with ready(s) as cp:
            async with aiohttp.ClientSession() as http:
                async with http.post(
                        f"{cp.url}/v1/chat/completions",
                        json={"model": "llama", "stream": True, "messages": HI},
                        headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                    text = await r.text()
            assert "hello" in text and "error" in text      # cut after one content delta
            counts = await settled(cp, "a", 1)
            assert counts.prompt_tokens > 0 and counts.completion_tokens == 1
            assert counts.cost > 0 and counts.estimated == 1 and counts.errors == 1
            backend.mode = "500"        # the engine refused: no tokens, nothing estimated
            with pytest.raises(openai.APIStatusError):
                await cp.client(t.KEY_B).chat.completions.create(
                    model="llama", messages=HI, stream=True)
            refused = await settled(cp, "b", 1)
    assert (refused.prompt_tokens, refused.completion_tokens, refused.cost,
            refused.estimated) == (0, 0, 0.0, 0)


async def test_embeddings_spend_the_tenants_budget_like_every_other_call() -> None:
    """/v1/embeddings skipped the token limits, the budget and the usage book: a tenant
    whose budget was spent went on embedding without limit (probe finding)."""
    tenants = [{"name": "a", "keys": [t.KEY_A], "budget": {"tokens": 3, "period": "day"}},
               {"name": "b", "keys": [t.KEY_B]}]
    async with t.backends(("e", "ok")) as (backend,):
        s = t.settings(auth={"tenants": tenants},
                       upstreams=[t.upstream("e", backend.url, task="embed")])
        async with t.running(s) as cp:
            client = cp.client(t.KEY_A)
            answered = 0
            with pytest.raises(openai.RateLimitError) as over:
                for _ in range(10):     # the stand-in reports 1 token each
                    await client.embeddings.create(model="llama", input="hello")
                    answered += 1
            assert over.value.code == "budget_exceeded" and answered == 3
            await client.close()
            await cp.client(t.KEY_B).embeddings.create(model="llama", input="hello")


async def test_usage_a_stop_could_not_store_is_kept_on_disk_and_stored_by_the_next_start(
        tmp_path: Any, redis_server: harness.RedisServer) -> None:
    """Probe finding: a replica stopped while Redis was unreachable lost its last counts
    (requests served, never billed), with a debug line only."""
    dead = f"redis://127.0.0.1:{free_port()}/0"      # nothing listens there
    async with t.backends(("one", "ok")) as (backend,):
        upstreams = t.settings(upstreams=[t.upstream("one", backend.url)]).upstreams
        s = settings(redis={"url": dead, "timeout_s": 0.2}, data_dir=str(tmp_path))
        async with ready(s.model_copy(update={"upstreams": upstreams})) as cp:
            client = cp.client()
            for _ in range(3):
                await client.chat.completions.create(model="llama", messages=HI)
            await harness.until(lambda: sum(
                c["requests"] for c in book(cp).pending().values()) == 3, 10, "accounted")
            await client.close()
        (kept,) = tmp_path.glob(usage_journal.FILE + ".kept-*")
        assert kept.stat().st_mode & 0o777 == 0o600
        s = settings(redis={"url": redis_server.url}, data_dir=str(tmp_path))
        async with ready(s.model_copy(update={"upstreams": upstreams})) as cp:
            assert (await accounted(cp, "a")).requests == 3
            await harness.until(lambda: not kept.exists(), 10, "deleted once stored")
            assert book(cp).pending() == {}
            assert (await accounted(cp, "a")).requests == 3     # now from Redis


def test_the_usage_journal_adds_up_the_stops_and_skips_what_it_cannot_read(
        tmp_path: Any) -> None:
    path = tmp_path / "sub" / usage_journal.FILE
    usage_journal.keep(path, [usage_book.Batch("x", {
        ("2026-12-06", "a", "m"): {"requests": 2, "cost": 0.5}})])
    usage_journal.keep(path, [usage_book.Batch("y", {
        ("2026-12-06", "a", "m"): {"requests": 1, "cost": 0.25},
        ("2026-12-06", "b", "m"): {"requests": 4}})])
    with open(path.with_name(usage_journal.FILE + ".kept-by-hand"), "w") as fh:
        fh.write("{not json\n")
    assert path.parent.stat().st_mode & 0o777 == 0o700
    carried = usage_journal.take(path)
    assert carried.rows == {("2026-12-06", "a", "m"): {"requests": 3, "cost": 0.75},
                            ("2026-12-06", "b", "m"): {"requests": 4}}
    assert carried.unreadable == 1
    carried.done()
    assert not list(path.parent.iterdir())
    assert usage_journal.take(path).rows == {}


def test_the_usage_journal_skips_values_no_store_can_hold(tmp_path: Any) -> None:
    # A file an older release wrote from an engine's 2**64 (or one edited by hand) must
    # not poison the store: every later flush would fail, the other tenants' rows with it.
    path = tmp_path / usage_journal.FILE
    with open(path, "w") as fh:
        fh.write('[["2026-12-06", "a", "m", {"requests": 1, "prompt_tokens": '
                 f'{2**64}, "cost": Infinity}}], ["2026-12-06", "b", "m", {{"requests": 2, '
                 '"completion_tokens": -5}]]\n')
        fh.write(f'[["2026-12-06", "b", "m", {{"requests": {2**63 - 1}}}]]\n')
    carried = usage_journal.take(path)
    assert carried.rows == {("2026-12-06", "a", "m"): {"requests": 1},
                            ("2026-12-06", "b", "m"): {"requests": 2**63 - 1}}
    assert carried.unreadable == 3


@contextlib.asynccontextmanager
async def usageless_engine() -> AsyncIterator[str]:
    """An engine whose whole answers carry no usage: a chat completion and a Responses
    answer (as vLLM's background mode answers before it generates), and /tokenize."""
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": "c", "object": "chat.completion", "created": 1,
                                  "model": body["model"], "choices": [{
                                      "index": 0, "finish_reason": "stop", "message": {
                                          "role": "assistant", "content": "hi"}}]})

    async def responses(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": "resp_1", "object": "response", "created_at": 1,
                                  "model": body["model"], "status": "queued", "output": [],
                                  "usage": None})

    async def tokenize(request: web.Request) -> web.Response:
        return web.json_response({"count": 2, "max_model_len": 4096, "tokens": [1, 2]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/health", health)
    async with t.served(app) as url:
        yield url


async def test_a_generating_answer_without_usage_is_billed_its_admitted_estimate() -> None:
    """A 200 whole answer without usage was booked as no tokens at cost 0 (probe 82, F2):
    on a path that generates it is billed the estimate it was admitted with (prompt and
    max_tokens), counted estimated; a /tokenize answer without usage counts no tokens."""
    key_c = "sk-tenant-c-0123456789"
    tenants = [{"name": n, "keys": [k]} for n, k in (("a", t.KEY_A), ("b", t.KEY_B),
                                                     ("c", key_c))]
    async with usageless_engine() as url:
        s = settings(auth={"tenants": tenants}, fairness=PRICED, upstreams=[{
            **t.upstream("bare", url), "tasks": ["generate", "responses", "tokenize"]}])
        async with ready(s) as cp, aiohttp.ClientSession() as http:
            for key, path, body in (
                    (t.KEY_A, "/v1/chat/completions",
                     {"model": "llama", "max_tokens": 40, "messages": HI}),
                    (t.KEY_B, "/v1/responses",
                     {"model": "llama", "max_output_tokens": 30, "input": "hi"}),
                    (key_c, "/tokenize", {"model": "llama", "prompt": "hi there"})):
                async with http.post(f"{cp.url}{path}", json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200, await r.text()
            chat, resp, tok = [await settled(cp, n, 1) for n in ("a", "b", "c")]
    assert chat.prompt_tokens > 0 and chat.completion_tokens == 40
    assert chat.cost == pytest.approx(chat.prompt_tokens + 2 * 40)
    assert (chat.estimated, chat.errors) == (1, 0)
    assert resp.prompt_tokens > 0 and resp.completion_tokens == 30 and resp.estimated == 1
    assert (tok.prompt_tokens, tok.completion_tokens, tok.cost, tok.estimated) == (0, 0, 0.0, 0)


@pytest.mark.parametrize(("prompt", "saved"), [
    (2**63, 5), (2**31 - 1, 2**31 - 1 + 5), (2**31, 5), (-7, 5),
    (True, 5), ("7", 5), (7.5, 5), (7.0, 12), (None, 5)])
def test_a_cache_hit_counts_the_stored_usage_by_the_engines_rule(prompt: Any, saved: int) -> None:
    """A cached answer's usage is what the engine sent; a hit counts each of its counts only
    when usage.count_of takes it (as from_tail takes an engine's), else that count as 0,
    so a count no store can hold, stored with the answer, never reaches the usage rows."""
    fair = fairness.Fairness.__new__(fairness.Fairness)     # only what cache_hit touches
    fair.book = usage_book.UsageBook(usage_book.MemoryUsageStore())
    fair._observer = fairness.TokenObserver()
    fair.cache_hit("a", "m", {"object": "chat.completion",
                              "usage": {"prompt_tokens": prompt, "completion_tokens": 5}})
    (counts,) = fair.book.pending().values()
    assert counts["cache_hit_tokens"] == saved and counts["requests"] == 1
