"""Each tenant's share of the event loop: cheap tenants never wait, an expensive one gets
spaced turns (its share fixed, whoever else is active), and the serving path measures and
charges every request's synchronous work."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client import CollectorRegistry

from controlplane import metrics as metrics_mod
from controlplane.adapters import l1
from controlplane.core import cache_port, loop_share, response_cache
from tests.clock import ManualClock
from tests.controlplane import cp_testing as cp
from tests.controlplane.test_cache_support import answer, chat

TWO = {"heavy": 1.0, "quiet": 1.0}     # two configured tenants of equal weight


def test_cheap_requests_never_wait() -> None:
    share = loop_share.LoopShare(TWO, clock=ManualClock())
    for _ in range(100):
        assert share.wait_s("quiet") == 0.0 and share.wait_s("heavy") == 0.0
        share.charge("quiet", 0.0005)
        share.charge("heavy", 0.0005)
    assert share.rationed() == []


def test_the_only_tenant_has_the_whole_loop() -> None:
    share = loop_share.LoopShare({"heavy": 1.0}, clock=ManualClock())
    for _ in range(20):
        assert share.wait_s("heavy") == 0.0
        share.charge("heavy", 0.1)
    assert share.rationed() == []


def served(share: loop_share.LoopShare, clock: ManualClock, tenant: str, costs: list[float],
           ) -> list[float]:
    """Requests of ``tenant`` sent together, as the serving path runs them: each asks for
    its turn, waits, asks again after each wait, and charges its cost as soon as a turn
    comes; the times (from now) at which each was served."""
    start = clock.now
    wake = [clock.now] * len(costs)     # when each asks next
    out: dict[int, float] = {}
    while len(out) < len(costs):
        i = min((j for j in range(len(costs)) if j not in out), key=lambda j: (wake[j], j))
        clock.now = max(clock.now, wake[i])
        wait = share.wait_s(tenant)
        assert wait is not None
        if wait:
            share.waited(tenant)
            wake[i] = clock.now + wait
            continue
        out[i] = clock.now - start
        share.charge(tenant, costs[i])
    return [out[i] for i in range(len(costs))]


def test_an_expensive_tenant_takes_turns_of_its_share() -> None:
    clock = ManualClock()
    share = loop_share.LoopShare(TWO, clock=clock, burst_s=0.0)
    share.charge("heavy", 0.1)          # 0.1 s of work: its clock is 0.2 s ahead
    assert share.wait_s("quiet") == 0.0     # never the cheap tenant
    # four of its requests sent at once are served a turn apart (each one's work times
    # the two tenants sharing the loop), after the one it owes
    assert served(share, clock, "heavy", [0.1] * 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # the same whether or not another tenant is active: its own waits tell a tenant
    # nothing of the others; and time it was idle buys it nothing ahead
    clock.now += 5.0
    assert served(share, clock, "heavy", [0.1] * 2) == pytest.approx([0.0, 0.2])
    # its debt repaid, it is forgotten; a cheap request does not start a clock again
    clock.now += 0.2
    assert share.wait_s("heavy") == 0.0 and share.rationed() == []
    share.charge("heavy", 0.001)
    assert share.rationed() == []
    share.charge("heavy", 0.1)
    clock.now += 0.3                # repaid, then a cheap request: forgotten at once
    share.charge("heavy", 0.001)
    assert share.rationed() == []


def test_one_slow_parse_does_not_space_a_burst_of_cheap_requests() -> None:
    """A clock started by one slow parse (a collection pause, a busy machine) used to
    reserve that cost for every request of the burst behind it: a legitimate tenant's
    burst was spaced, and refused past ``max_waiting``."""
    clock = ManualClock()
    share = loop_share.LoopShare(TWO, clock=clock, max_waiting=4)
    share.charge("heavy", 0.02)             # one slow parse: 0.04 s ahead, under the burst
    # forty requests at once ask before any of their bodies has arrived (each turn taken
    # before its body is read), then are parsed as their bodies come
    assert [share.wait_s("heavy") for _ in range(40)] == [0.0] * 40
    for _ in range(40):
        clock.now += 0.001
        assert share.wait_s("heavy") == 0.0
        share.charge("heavy", 0.0003)
    assert share.rationed() == ["heavy"]


def test_cheap_requests_between_expensive_ones_do_not_buy_the_loop() -> None:
    # an expensive request, then cheap ones: each pays its own (small) work, and the
    # expensive one's debt stays until repaid by time
    clock = ManualClock()
    share = loop_share.LoopShare(TWO, clock=clock, burst_s=0.0)
    share.charge("heavy", 0.1)
    for _ in range(20):
        share.charge("heavy", 0.0001)
    assert share.wait_s("heavy") == pytest.approx(0.2 + 20 * 0.0002, abs=1e-9)


def test_a_tenants_share_is_its_weight_over_the_configured_weights() -> None:
    share = loop_share.LoopShare({"big": 3.0, "small": 1.0, "third": 1.0},
                                 clock=ManualClock(), burst_s=0.0)
    assert share.share("big") == pytest.approx(0.6) and share.share("small") == 0.2
    assert share.share("not configured") == 1.0
    share.charge("big", 0.1)
    share.charge("small", 0.1)
    share.charge("not configured", 0.1)     # never rationed
    assert share.wait_s("big") == pytest.approx(0.1 / 0.6)
    assert share.wait_s("small") == pytest.approx(0.1 / 0.2)
    assert share.wait_s("not configured") == 0.0
    assert share.rationed() == ["big", "small"]


def test_a_turn_beyond_the_longest_wait_is_refused() -> None:
    clock = ManualClock()
    share = loop_share.LoopShare(TWO, clock=clock, burst_s=0.0, max_wait_s=0.5)
    share.charge("heavy", 0.2)
    assert share.wait_s("heavy") == pytest.approx(0.4)
    share.waited("heavy")
    share.charge("heavy", 0.1)
    assert share.wait_s("heavy") is None
    clock.now += 0.2
    assert share.wait_s("heavy") == pytest.approx(0.4)


def test_no_more_than_max_waiting_requests_of_a_tenant_wait_at_once() -> None:
    # a waiting request may hold its body: the waits are bounded in number too
    share = loop_share.LoopShare(TWO, clock=ManualClock(), burst_s=0.0, max_waiting=2)
    share.charge("heavy", 0.1)
    assert [share.wait_s("heavy") for _ in range(3)] == pytest.approx([0.2, 0.2, None])
    share.waited("heavy")
    assert share.wait_s("heavy") == pytest.approx(0.2)


async def test_the_serving_path_charges_each_requests_work_and_a_refusal_is_a_429() -> None:
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.round_robin(b1)) as running:
        real = running.services.loop_share
        assert real.share("a") == real.share("b") == 0.5   # the configured tenants'
        charged: list[tuple[str, float]] = []
        charge = real.charge
        real.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value,misc]
        client, other = running.client(), running.client(cp.KEY_B)
        try:
            await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hello"}])
            # its parse at once, the rest (prompt, route) when it ends
            assert len(charged) == 2 and {t for t, _ in charged} == {"a"}
            assert charged[0][1] > 0 and charged[1][1] > 0
            # an expensive tenant's second request at once waits its turn, then is served
            real.charge = charge  # type: ignore[method-assign]
            real.charge("a", 0.1)
            assert real.rationed() == ["a"]     # 0.2 s owed, less the 0.05 s burst
            started = asyncio.get_running_loop().time()
            for _ in range(2):
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hello"}])
            assert asyncio.get_running_loop().time() - started >= 0.15
            assert real._waiting == {}      # its wait ended and was counted off
            waited = running.services.metrics.loop_share_wait.labels("a")._value.get()
            assert waited > 0.1
            # a tenant whose turn is too far off is refused before its body is read
            real.wait_s = lambda tenant: None if tenant == "a" else 0.0  # type: ignore[method-assign]
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hello"}])
            assert "share of the control plane's CPU" in str(info.value)
            assert info.value.response.headers["Retry-After"] == "10"
            await other.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hello"}])
        finally:
            await client.close()
            await other.close()



async def test_an_anthropic_message_is_charged_its_parse_prompt_and_route() -> None:
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.round_robin(b1)) as running:
        share = running.services.loop_share
        charged: list[tuple[str, float]] = []
        charge = share.charge
        share.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value,misc]
        async with anthropic.AsyncAnthropic(base_url=running.url, api_key=cp.KEY_A,
                                            max_retries=0, timeout=20) as client:
            await client.messages.create(model="llama", max_tokens=8,
                                         messages=[{"role": "user", "content": "Hi"}])
        assert len(charged) == 2 and {t for t, _ in charged} == {"a"}
        assert charged[0][1] > 0 and charged[1][1] > 0


async def test_the_cache_measures_its_work_on_the_body_in_every_decision() -> None:
    class Ticking:
        """A monotonic clock that moves a quarter second at each reading."""

        def __init__(self) -> None:
            self.now = 0.0

        def __call__(self) -> float:
            self.now += 0.25
            return self.now
    cache = response_cache.TieredCache(
        options=response_cache.Options(l1_budget_s=2.0, temperature_ceiling=0.7),
        l1=l1.MemoryL1(1000, 10**7), metrics=metrics_mod.Metrics(CollectorRegistry()),
        monotonic=Ticking())
    miss = await cache.lookup(chat("hi"))     # read before and after the keys: one tick
    assert (miss.status, miss.work_s) == ("miss", 0.25)
    cache.store(miss, answer("hello"))
    await cache.drain()
    hit = await cache.lookup(chat("hi"))
    assert (hit.status, hit.work_s) == ("hit-exact", 0.25)
    bypass = await cache.lookup(chat("hi", cache_control="no-cache"))
    assert (bypass.status, bypass.work_s) == ("bypass", 0.25)


async def test_the_serving_path_charges_the_caches_work_on_the_body() -> None:
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.round_robin(b1)) as running:
        svc = running.services
        charged: list[tuple[str, float]] = []
        charge = svc.loop_share.charge
        svc.loop_share.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value,misc]
        lookup = svc.cache.lookup

        async def costly(request: cache_port.CacheRequest) -> cache_port.CacheDecision:
            return dataclasses.replace(await lookup(request), work_s=0.25)
        svc.cache.lookup = costly  # type: ignore[method-assign]
        client = running.client()
        try:
            await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hello"}])
        finally:
            await client.close()
        assert {t for t, _ in charged} == {"a"} and charged[-1][1] >= 0.25   # at its end


async def test_a_burst_sent_together_is_spaced_by_each_parse_not_let_through_at_once() -> None:
    """A request's parse used to be charged only when the request ended: a tenant without
    a clock could send many expensive bodies at once, every one found no clock, and
    every other tenant waited behind all their parses (probe finding: 1.7 s stalls)."""
    weights = {"http": {"max_body_bytes": 4 * 1024 * 1024, "max_json_containers": 400_000},
               "auth": {"tenants": [
        {"name": "a", "keys": [cp.KEY_A], "weight": 1},     # a tenth of the loop: each
        {"name": "b", "keys": [cp.KEY_B], "weight": 9}]}}   # parse moves its clock 10x
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(
            cp.round_robin(b1, **weights)) as running:
        share = running.services.loop_share
        assert share.share("a") == pytest.approx(0.1)
        share.burst_s = 0.0         # no allowance: the second parse must wait its turn
        body = ('{"model": "llama", "messages": [{"role": "user", "content": "hello"}], '
                '"pad": [' + "[]," * 300_000 + "[]]}").encode()      # under the stand-in's 1 MB

        async def one() -> int:
            async with aiohttp.ClientSession() as s:   # a connection each: all at once
                async with s.post(f"{running.url}/v1/chat/completions", data=body, headers={
                        "Authorization": f"Bearer {cp.KEY_A}",
                        "Content-Type": "application/json"}) as r:
                    await r.read()
                    return r.status
        statuses = await asyncio.gather(*(one() for _ in range(4)))
        waited = running.services.metrics.loop_share_wait.labels("a")._value.get()
        assert waited > 0 or 429 in statuses, statuses
        assert set(statuses) <= {200, 429}


async def test_a_body_still_arriving_takes_its_turn_again_before_its_parse() -> None:
    """A request that passed its turn before its body had come waits for the parses its
    tenant was charged meanwhile (the aiohttp path: a chunked body, sent in two parts)."""
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.round_robin(b1)) as running:
        share = running.services.loop_share
        share.burst_s = 0.0
        first_part = asyncio.Event()
        rest = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b'{"model": "llama", '
            first_part.set()
            await rest.wait()
            yield b'"messages": [{"role": "user", "content": "hello"}]}'

        async def send() -> int:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{running.url}/v1/chat/completions", data=body(), headers={
                        "Authorization": f"Bearer {cp.KEY_A}",
                        "Content-Type": "application/json"}) as r:
                    await r.read()
                    return r.status
        sent = asyncio.create_task(send())
        await first_part.wait()
        await asyncio.sleep(0.2)        # its head is in and its first turn taken: no clock
        assert share.rationed() == []
        share.charge("a", 0.15)         # its tenant's other parse, meanwhile: 0.3 s owed
        started = asyncio.get_running_loop().time()
        rest.set()
        assert await sent == 200
        assert asyncio.get_running_loop().time() - started >= 0.25
        waited = running.services.metrics.loop_share_wait.labels("a")._value.get()
        assert waited >= 0.25


async def test_a_body_re_encoded_for_the_engine_is_charged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that did not ask for usage is re-encoded to ask for it, an Anthropic
    message as a chat, a passthrough call's body for its backend: work on the loop as
    much as the parse."""
    from controlplane.api import calls
    from controlplane.core import stream_usage
    encode, body_for = stream_usage.upstream_body, calls.body_for

    def slow(real):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(0.1)
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(stream_usage, "upstream_body", slow(encode))
    monkeypatch.setattr(calls, "body_for", slow(body_for))
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.round_robin(b1)) as running:
        share = running.services.loop_share
        charged: list[tuple[str, float]] = []
        charge = share.charge
        share.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value,misc]
        client = running.client()
        try:
            stream = await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hello"}], stream=True)
            async for _ in stream:
                pass
        finally:
            await client.close()
        assert charged[-1][1] >= 0.1, charged      # at its end
        charged.clear()
        async with anthropic.AsyncAnthropic(base_url=running.url, api_key=cp.KEY_A,
                                            max_retries=0, timeout=20) as anthropic_client:
            await anthropic_client.messages.create(
                model="llama", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
        assert charged[-1][1] >= 0.1, charged
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.settings(
            upstreams=[{"name": "b1", "url": b1.url, "models": [cp.MODEL], "tasks": ["score"]}],
            router={"policy": "round_robin"})) as running:
        share = running.services.loop_share
        charged.clear()         # a passthrough call's body for its backend
        share.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value,misc]
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{running.url}/v1/score",
                              json={"model": "llama", "text_1": "a", "text_2": "b"},
                              headers={"Authorization": f"Bearer {cp.KEY_A}"}) as r:
                await r.read()
        assert charged[-1][1] >= 0.1, charged
