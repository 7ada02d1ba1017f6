"""The scheduler's logic, driven step by step with a hand-moved clock (no sleeping)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import scheduler as sched
from simulator.config import ProfileSettings
from synapse_common import tokens
from tests.clock import ManualClock


def profile(**changes: object) -> ProfileSettings:
    base = {"prefill_s_per_token": 0.001, "decode_base_s": 0.01, "decode_per_seq_s": 0.001,
            "max_num_seqs": 8, "max_num_batched_tokens": 4096, "num_gpu_blocks": 1000,
            "block_size": 4, "max_model_len": 4000}
    return ProfileSettings.model_validate({**base, **changes})


def make_seq(prompt_ids: list[int], output_len: int, block_size: int = 4,
             name: str = "r") -> sched.Seq:
    return sched.Seq(name, len(prompt_ids), tokens.block_hashes(prompt_ids, block_size),
                     output_len)


def run_step(s: sched.Scheduler, clock: ManualClock) -> sched.StepPlan:
    plan = s.schedule()
    clock.now += plan.duration
    s.complete(plan)
    return plan


def run_until_idle(s: sched.Scheduler, clock: ManualClock, limit: int = 10_000) -> int:
    steps = 0
    while s.has_work:
        run_step(s, clock)
        steps += 1
        assert steps < limit, "scheduler made no progress"
    return steps


def test_a_request_prefills_then_decodes_one_token_per_step() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(), clock)
    seq = make_seq(list(range(10)), output_len=3)
    s.add(seq)
    first = run_step(s, clock)
    assert first.prefill_tokens == 10 and seq.num_generated == 1
    assert first.duration == pytest.approx(10 * 0.001 + 0.01 + 0.001)
    assert seq.first_token == pytest.approx(100.0 + first.duration)
    second = run_step(s, clock)
    assert second.prefill_tokens == 0 and second.duration == pytest.approx(0.011)
    run_step(s, clock)
    assert seq.state is sched.State.FINISHED and seq.finish_reason == "length"
    assert s.counters.prompt_tokens == 10 and s.counters.generation_tokens == 3
    assert s.counters.finished["length"] == 1 and s.pool.usage == 0


def test_decode_step_grows_with_the_running_batch() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(), clock)
    for i in range(3):
        s.add(make_seq([i] * 4, output_len=5, name=f"r{i}"))
    run_step(s, clock)
    assert run_step(s, clock).duration == pytest.approx(0.01 + 3 * 0.001)


def test_max_num_seqs_keeps_the_third_request_waiting_in_fifo_order() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(max_num_seqs=2), clock)
    seqs = [make_seq([i] * 8, output_len=4 + i, name=f"r{i}") for i in range(3)]
    for seq in seqs:
        s.add(seq)
    run_step(s, clock)
    assert [q.request_id for q in s.running] == ["r0", "r1"]
    assert list(s.waiting) == [seqs[2]]
    while seqs[0].state is not sched.State.FINISHED:
        run_step(s, clock)
        assert seqs[2].state is sched.State.WAITING or seqs[0].state is sched.State.FINISHED
    run_step(s, clock)
    assert seqs[2].state is sched.State.RUNNING
    assert seqs[2].admitted is not None and seqs[2].admitted > seqs[2].arrival


def test_a_shared_prefix_is_prefilled_once() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(), clock)
    shared = list(range(400))  # 100 blocks of 4
    first = make_seq([*shared, 1, 2, 3], output_len=2, name="a")
    s.add(first)
    cold = run_step(s, clock)
    run_until_idle(s, clock)
    second = make_seq([*shared, 7, 8, 9, 10, 11], output_len=2, name="b")
    s.add(second)
    warm = run_step(s, clock)
    assert second.num_cached_tokens == 400
    assert warm.prefill_tokens == 405 - 400
    assert warm.duration < cold.duration / 10
    assert s.counters.prefix_hits == 400
    assert s.counters.prefix_queries == 403 + 405


def test_an_identical_prompt_still_recomputes_its_last_block() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(), clock)
    prompt = list(range(16))  # exactly 4 full blocks
    s.add(make_seq(prompt, output_len=1))
    run_until_idle(s, clock)
    again = make_seq(prompt, output_len=1)
    s.add(again)
    plan = run_step(s, clock)
    assert again.num_cached_tokens == 12 and plan.prefill_tokens == 4


def test_cached_blocks_are_evicted_lru_when_space_runs_out() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(num_gpu_blocks=10), clock)
    s.add(make_seq(list(range(32)), output_len=1, name="old"))  # 8 blocks, then cached
    run_until_idle(s, clock)
    s.add(make_seq(list(range(1000, 1024)), output_len=1, name="new"))  # needs 7 blocks
    run_until_idle(s, clock)
    assert s.pool.cached_prefix(tokens.block_hashes(list(range(32)), 4)) < 8


def test_long_prompts_prefill_in_chunks_within_the_token_budget() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(max_num_batched_tokens=8), clock)
    seq = make_seq(list(range(20)), output_len=1)
    s.add(seq)
    plans = [run_step(s, clock) for _ in range(3)]
    assert [p.prefill_tokens for p in plans] == [8, 8, 4]
    assert seq.state is sched.State.FINISHED and seq.first_token == pytest.approx(clock.now)


def test_admission_waits_for_free_blocks() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(num_gpu_blocks=4), clock)
    big = make_seq(list(range(12)), output_len=3, name="big")  # 3 blocks, then a 4th
    small = make_seq(list(range(100, 108)), output_len=1, name="small")  # 2 blocks
    s.add(big)
    s.add(small)
    run_step(s, clock)
    assert small.state is sched.State.WAITING and s.running == [big]
    run_until_idle(s, clock)
    assert small.state is sched.State.FINISHED and small.admitted is not None
    assert big.admitted is not None and small.admitted > big.admitted


def test_decode_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(num_gpu_blocks=6), clock)
    a = make_seq(list(range(8)), output_len=12, name="a")
    b = make_seq(list(range(50, 58)), output_len=12, name="b")
    s.add(a)
    s.add(b)
    run_until_idle(s, clock)
    assert s.counters.preemptions >= 1
    assert a.num_generated == 12 and b.num_generated == 12
    assert a.finish_reason == "length" and b.finish_reason == "length"
    assert a.finished is not None and b.finished is not None and a.finished < b.finished
    assert s.counters.generation_tokens == 24 and s.pool.usage == 0


def test_abort_frees_blocks_and_counts_abort() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(max_num_seqs=1), clock)
    running = make_seq(list(range(40)), output_len=50, name="running")
    waiting = make_seq(list(range(40)), output_len=50, name="waiting")
    s.add(running)
    s.add(waiting)
    run_step(s, clock)
    assert s.pool.usage > 0
    s.abort(running)
    s.abort(waiting)
    assert not s.has_work and s.counters.finished["abort"] == 2
    assert s.pool.num_free == s.pool.num_blocks


def test_progress_callbacks_fire_per_token_and_at_the_end() -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(), clock)
    seen: list[tuple[int, str]] = []
    seq = make_seq(list(range(6)), output_len=3)
    seq.on_progress = lambda q: seen.append((q.num_generated, q.state.value))
    s.add(seq)
    run_until_idle(s, clock)
    assert seen == [(1, "running"), (2, "running"), (3, "finished")]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 12),
                          st.sampled_from(["add", "step", "abort"])), max_size=60),
       st.integers(4, 24), st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_blocks_are_conserved_and_every_request_finishes(
        ops: list[tuple[int, int, int, str]], num_blocks: int, max_seqs: int) -> None:
    clock = ManualClock(100.0)
    s = sched.Scheduler(profile(num_gpu_blocks=num_blocks, max_num_seqs=max_seqs,
                                max_num_batched_tokens=16), clock)
    capacity = num_blocks * 4
    seqs: list[sched.Seq] = []
    for family, prompt_len, output_len, op in ops:
        if op == "add":
            # Families share prefixes, so prefix hits and shared blocks happen.
            prompt = [family * 1000 + i for i in range(min(prompt_len, capacity - output_len))]
            if prompt:
                seqs.append(make_seq(prompt, output_len, name=f"r{len(seqs)}"))
                s.add(seqs[-1])
        elif op == "step":
            run_step(s, clock)
        elif seqs:
            s.abort(seqs[prompt_len % len(seqs)])
        _check_blocks(s)
    run_until_idle(s, clock)
    _check_blocks(s)
    assert s.pool.num_free == num_blocks
    for seq in seqs:
        assert seq.state is sched.State.FINISHED
        assert seq.finish_reason == "abort" or seq.num_generated == seq.output_len


def _check_blocks(s: sched.Scheduler) -> None:
    held: dict[int, int] = {}
    anonymous = 0
    for seq in s.running:
        for ref in seq.blocks:
            if ref is None:
                anonymous += 1
            else:
                held[ref] = held.get(ref, 0) + 1
    assert anonymous + len(held) == s.pool.num_blocks - s.pool.num_free
    for h, n in held.items():
        assert s.pool._refs[h] == n
    assert all(not seq.blocks for seq in s.waiting)
    assert len(s.running) <= s.profile.max_num_seqs
