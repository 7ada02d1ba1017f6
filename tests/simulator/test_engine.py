"""The async engine loop at time scale 0: handles wake on progress and on completion."""

from __future__ import annotations

import asyncio
import time

from simulator import engine, metrics, scheduler
from simulator.config import ProfileSettings
from synapse_common import tokens


def fatal() -> None:
    raise AssertionError("the engine loop died")


def build(**profile: object) -> engine.Engine:
    p = ProfileSettings.model_validate({"num_gpu_blocks": 100, "block_size": 4, **profile})
    s = scheduler.Scheduler(p, time.monotonic)
    return engine.Engine(s, metrics.VllmMetrics(s, "m", p, 400), 0.0, time.monotonic,
                         on_fatal=fatal)


def seq(name: str, prompt_len: int, output_len: int) -> scheduler.Seq:
    ids = list(range(prompt_len))
    return scheduler.Seq(name, prompt_len, tokens.block_hashes(ids, 4), output_len)


async def test_non_streaming_handle_wakes_once_everything_finished() -> None:
    eng = build()
    await eng.start()
    try:
        seqs = [seq("r", 6, 5), seq("r", 6, 9)]
        handle = eng.submit(seqs, stream=False)
        await asyncio.wait_for(handle.wait(), 10)
        assert handle.done and [s.num_generated for s in seqs] == [5, 9]
        assert eng.metrics.ttft.count == 2 and eng.metrics.itl.count == 4 + 8
        assert eng.metrics.e2e.count == 2
    finally:
        await eng.stop()


async def test_streaming_handle_sees_every_token() -> None:
    eng = build()
    await eng.start()
    try:
        one = seq("r", 3, 4)
        handle = eng.submit([one], stream=True)
        seen = []
        while not handle.done:
            await asyncio.wait_for(handle.wait(), 10)
            seen.append(one.num_generated)
        assert seen[-1] == 4 and seen == sorted(seen)
    finally:
        await eng.stop()


async def test_abort_ends_a_waiting_request() -> None:
    eng = build(max_num_seqs=1)
    await eng.start()
    try:
        first = eng.submit([seq("a", 3, 10_000)], stream=True)
        second = eng.submit([seq("b", 3, 5)], stream=False)
        await asyncio.wait_for(first.wait(), 10)
        eng.abort(first)
        await asyncio.wait_for(second.wait(), 10)
        assert first.seqs[0].finish_reason == "abort" and second.done
        assert eng.scheduler.counters.finished["abort"] == 1
    finally:
        await eng.stop()
