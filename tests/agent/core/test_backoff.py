"""Restart policy: capped jittered backoff and crash-loop detection, on an injected clock."""

from __future__ import annotations

import random

from agent.core import backoff
from tests.clock import ManualClock


def test_delays_double_from_one_second_to_a_sixty_second_cap_with_jitter():
    b = backoff.Backoff(1.0, 60.0, random.Random(7))
    assert [b.base(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    delays = [b.delay(n) for n in range(8) for _ in range(50)]
    assert all(0.8 * b.base(n) <= d <= min(60, 1.2 * b.base(n))
               for n, d in zip([n for n in range(8) for _ in range(50)], delays, strict=True))
    assert len({round(d, 6) for d in delays[:50]}) > 10  # actually jittered
    assert b.delay(10_000) <= 60  # no overflow on absurd attempt counts


def _policy(clock: ManualClock, threshold: int = 5, window: float = 600.0,
            retry: float = 0.0) -> backoff.RestartPolicy:
    return backoff.RestartPolicy(clock, backoff.Backoff(1.0, 60.0, random.Random(1)),
                                 threshold, window, retry)


def test_five_restarts_in_ten_minutes_then_crashloop_retried_at_the_cap_until_reset():
    clock = ManualClock(1000.0)
    policy = _policy(clock)
    decisions = []
    for _ in range(6):
        decisions.append(policy.on_exit())
        clock.now += 30
    assert [d.crashloop for d in decisions] == [False] * 5 + [True]
    for n, d in enumerate(decisions[:5]):  # 1, 2, 4, 8, 16 s, each ±20 %
        assert 0.8 * 2**n <= d.delay_s <= 1.2 * 2**n
    assert "5 restarts within 600s; retry in" in decisions[5].reason
    # A crash loop is still retried (its cause may go away), at the cap, jittered down only.
    later = [policy.on_exit() for _ in range(20)]
    assert all(d.crashloop and 48 <= d.delay_s <= 60 for d in [decisions[5], *later])
    assert len({round(d.delay_s, 6) for d in later}) > 5
    policy.reset()
    first = policy.on_exit()
    assert not first.crashloop and first.delay_s <= 1.2


def test_a_crashloop_retried_every_cap_seconds_stays_a_crashloop_and_ends_once_it_runs():
    clock = ManualClock(1000.0)
    policy = _policy(clock, threshold=3, window=600)
    for _ in range(3):
        assert not policy.on_exit().crashloop
    for _ in range(30):  # failing at each retry for half an hour: still a crash loop
        decision = policy.on_exit()
        assert decision.crashloop
        clock.now += decision.delay_s
    policy.on_ready()
    clock.now += 601  # up for longer than the window: its restarts fell out of it
    decision = policy.on_exit()
    assert not decision.crashloop and decision.delay_s <= 1.2


def test_restarts_spread_wider_than_the_window_never_crashloop():
    clock = ManualClock(1000.0)
    policy = _policy(clock, threshold=3, window=100)
    for _ in range(10):
        assert not policy.on_exit().crashloop
        clock.now += 51  # at most two restarts in any 100 s window


def test_backoff_ladder_restarts_after_a_long_healthy_run():
    clock = ManualClock(1000.0)
    policy = _policy(clock, threshold=100)
    for _ in range(6):
        policy.on_exit()
    assert policy.on_exit().delay_s >= 48  # deep in the ladder: near the cap
    policy.on_ready()
    clock.now += 61  # ready for longer than the cap
    assert policy.on_exit().delay_s <= 1.2


def test_a_crashloop_retried_at_its_own_longer_period_stays_a_crashloop_until_it_runs():
    # Retries every 300 s leave fewer than five restarts in a 600 s window: the engine is
    # still crash-looping (not back on the one-minute ladder) until it runs for a while.
    clock = ManualClock(1000.0)
    policy = _policy(clock, threshold=5, window=600, retry=300)
    for _ in range(5):
        decision = policy.on_exit()
        assert not decision.crashloop
        clock.now += decision.delay_s
    retries = []
    for _ in range(12):   # an hour of failed retries
        retries.append(policy.on_exit())
        clock.now += retries[-1].delay_s
    assert all(d.crashloop and 240 <= d.delay_s <= 300 for d in retries)
    assert "still failing; retry in" in retries[-1].reason
    policy.on_ready()
    clock.now += 61   # up for longer than the backoff's cap: the loop is over
    decision = policy.on_exit()
    assert not decision.crashloop and decision.delay_s <= 1.2


def test_a_crashloop_start_that_loaded_nothing_is_retried_at_the_backoff_cap():
    """A start refused because its port is taken loads no model: waiting the crash loop's
    long period for it would only delay the engine once the port is free."""
    clock = ManualClock(1000.0)
    policy = _policy(clock, threshold=2, window=600, retry=300)
    for _ in range(2):
        policy.on_exit(loaded=False)
    refused = policy.on_exit(loaded=False)
    assert refused.crashloop and 48 <= refused.delay_s <= 60
    assert 240 <= policy.on_exit().delay_s <= 300
