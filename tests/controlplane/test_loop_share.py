"""Each tenant's share of the event loop: cheap tenants never wait, an expensive one gets
spaced turns (its share fixed, whoever else is active), and the serving path measures and
charges every request's synchronous work."""

from __future__ import annotations

import asyncio

import openai
import pytest

from controlplane.core import loop_share
from tests.clock import ManualClock
from tests.controlplane import cp_testing as cp


def test_cheap_requests_never_wait() -> None:
    share = loop_share.LoopShare(2, clock=ManualClock())
    for _ in range(100):
        assert share.wait_s("quiet") == 0.0 and share.wait_s("other") == 0.0
        share.charge("quiet", 0.0005)
        share.charge("other", 0.0005)
    assert share.rationed() == []


def test_the_only_tenant_has_the_whole_loop() -> None:
    clock = ManualClock()
    share = loop_share.LoopShare(1, clock=clock)
    for _ in range(20):
        assert share.wait_s("heavy") == 0.0
        share.charge("heavy", 0.1)
    assert share.rationed() == []


def test_an_expensive_tenant_takes_turns_of_its_share() -> None:
    clock = ManualClock()
    share = loop_share.LoopShare(2, clock=clock, burst_s=0.0)
    share.charge("heavy", 0.1)          # it has shown what its requests cost
    # four of its requests arrive at once: each starts a turn after the one before it,
    # a turn being its cost times the two tenants sharing the loop
    assert [share.wait_s("heavy") for _ in range(4)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert share.wait_s("quiet") == 0.0     # never the cheap tenant
    # the turns are the same whether or not another tenant is active: its own waits
    # tell a tenant nothing of the others
    clock.now += 10.0
    assert [share.wait_s("heavy") for _ in range(2)] == pytest.approx([0.0, 0.2])


def test_a_turn_beyond_the_longest_wait_is_refused_and_not_reserved() -> None:
    clock = ManualClock()
    share = loop_share.LoopShare(2, clock=clock, burst_s=0.0, max_wait_s=0.5)
    share.charge("heavy", 0.1)
    assert [share.wait_s("heavy") for _ in range(4)] == pytest.approx([0.0, 0.2, 0.4, None])
    assert share.wait_s("heavy") is None    # the refused ones reserved nothing
    clock.now += 0.2
    assert share.wait_s("heavy") == pytest.approx(0.4)


def test_a_tenant_whose_requests_turn_cheap_stops_taking_turns() -> None:
    share = loop_share.LoopShare(2, clock=ManualClock())
    share.charge("t", 0.05)
    assert share.rationed() == ["t"]
    for _ in range(30):
        share.charge("t", 0.0001)
    assert share.rationed() == []
    assert share.wait_s("t") == 0.0


async def test_the_serving_path_charges_each_requests_work_and_a_refusal_is_a_429() -> None:
    async with cp.backends(("b1", "ok")) as (b1,), cp.running(cp.round_robin(b1)) as running:
        real = running.services.loop_share
        assert real.tenants == 2        # the configured tenants share the loop
        charged: list[tuple[str, float]] = []
        charge = real.charge
        real.charge = lambda tenant, s: charged.append((tenant, s)) or charge(tenant, s)  # type: ignore[method-assign,func-returns-value]
        client, other = running.client(), running.client(cp.KEY_B)
        try:
            await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hello"}])
            assert len(charged) == 1 and charged[0][0] == "a" and charged[0][1] > 0
            # an expensive tenant's second request at once waits its turn, then is served
            real.charge = charge  # type: ignore[method-assign]
            real.charge("a", 0.1)
            assert real.rationed() == ["a"]
            started = asyncio.get_running_loop().time()
            for _ in range(2):
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hello"}])
            assert asyncio.get_running_loop().time() - started >= 0.1
            assert real._waiting == {}      # its wait ended and was counted off
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



def test_no_more_than_max_waiting_requests_of_a_tenant_wait_at_once() -> None:
    # a waiting request may hold its body: the waits are bounded in number too
    share = loop_share.LoopShare(2, clock=ManualClock(), burst_s=0.0, max_waiting=2)
    share.charge("heavy", 0.1)
    assert share.wait_s("heavy") == 0.0     # its turn now: not waiting
    assert share.wait_s("heavy") == pytest.approx(0.2)
    assert share.wait_s("heavy") == pytest.approx(0.4)
    assert share.wait_s("heavy") is None    # a third would wait: refused
    share.waited("heavy")
    assert share.wait_s("heavy") == pytest.approx(0.6)
