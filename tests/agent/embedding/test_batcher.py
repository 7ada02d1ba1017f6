"""Natural micro-batching: coalescing, failures, the lone caller, the gathering window."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.embedding import batcher as batcher_mod
from agent.embedding import errors


async def test_concurrent_calls_are_coalesced_into_batches():
    batches: list[int] = []

    async def run(texts: list[str]) -> np.ndarray:
        batches.append(len(texts))
        await asyncio.sleep(0.01)  # the "model" takes a while: callers pile up
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    batcher = batcher_mod.MicroBatcher(run, max_batch=16, wait_s=0.005)
    results = await asyncio.gather(*(batcher.submit(["x" * i]) for i in range(1, 41)))
    await batcher.close()
    assert [r[0][0] for r in results] == [float(i) for i in range(1, 41)]  # each its own row
    assert sum(batches) == 40 and max(batches) <= 16 and len(batches) <= 5


async def test_a_failed_batch_fails_each_caller_and_the_next_batch_still_runs():
    calls = 0

    async def run(texts: list[str]) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise errors.EmbedderUnavailable("down")
        return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = batcher_mod.MicroBatcher(run, max_batch=4, wait_s=0.0)
    with pytest.raises(errors.EmbedderUnavailable):
        await batcher.submit(["a"])
    assert (await batcher.submit(["b"])).shape == (1, 2)
    await batcher.close()


async def test_a_lone_caller_at_an_idle_model_does_not_wait_for_companions():
    batches: list[list[str]] = []

    async def run(texts: list[str]) -> np.ndarray:
        batches.append(texts)
        await asyncio.sleep(0.02)
        return np.zeros((len(texts), 1), dtype=np.float32)

    batcher = batcher_mod.MicroBatcher(run, max_batch=16, wait_s=60)  # a window never used
    for text in ("a", "b", "c"):  # one caller, one call at a time
        await asyncio.wait_for(batcher.submit([text]), timeout=5)
    # "d" finds the model idle and runs alone; "e" and "f" arrive meanwhile and go next
    first = asyncio.create_task(batcher.submit(["d"]))
    await asyncio.sleep(0.005)
    rest = [asyncio.create_task(batcher.submit([t])) for t in ("e", "f")]
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=5)
    await batcher.close()
    assert batches == [["a"], ["b"], ["c"], ["d"], ["e", "f"]]


async def test_after_a_shared_batch_the_window_lets_returning_callers_fill_the_next():
    batches: list[int] = []

    async def run(texts: list[str]) -> np.ndarray:
        batches.append(len(texts))
        await asyncio.sleep(0.02)
        return np.zeros((len(texts), 1), dtype=np.float32)

    async def caller(batcher: batcher_mod.MicroBatcher, i: int) -> None:
        for _ in range(3):  # each caller sends again after its own network round trip
            await batcher.submit([str(i)])
            await asyncio.sleep(0.005 * (i + 1))

    for wait_s in (5.0, 0.0):  # the window ends early once max_batch texts are there
        batches.clear()
        batcher = batcher_mod.MicroBatcher(run, max_batch=8, wait_s=wait_s)
        await asyncio.wait_for(asyncio.gather(*(caller(batcher, i) for i in range(8))), 10)
        await batcher.close()
        if wait_s:
            assert batches == [8, 8, 8]
        else:  # the first caller back finds the model idle and runs alone, and so on
            assert batches[0] == 8 and len(batches) > 3 and max(batches[1:]) < 8


class GatedModel:
    """A "model" that runs one batch at a time and holds each until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, texts: list[str]) -> np.ndarray:
        self.batches.append(texts)
        self.started.set()
        await self.gate.wait()
        return np.zeros((len(texts), 1), dtype=np.float32)


async def test_a_cancelled_caller_leaves_the_queue_and_is_never_computed():
    model = GatedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=8, wait_s=0.0)
    first = asyncio.create_task(batcher.submit(["running"]))
    await model.started.wait()  # "running" is on the model; the next callers queue
    gone = [asyncio.create_task(batcher.submit([f"abandoned {i}"])) for i in range(3)]
    kept = asyncio.create_task(batcher.submit(["kept"]))
    await asyncio.sleep(0)
    assert batcher.queued == 4
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    assert batcher.queued == 1  # the three left at once, not when the model got free
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, kept), 5)
    await batcher.close()
    assert model.batches == [["running"], ["kept"]]


async def test_a_full_queue_sheds_the_call_at_once_and_keeps_the_rest():
    model = GatedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=8, wait_s=0.0, max_queued=4)
    first = asyncio.create_task(batcher.submit(["running"]))
    await model.started.wait()
    waiting = [asyncio.create_task(batcher.submit(["a", "b"])) for _ in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued == 4
    with pytest.raises(errors.Overloaded, match="4 texts queued, at most 4"):
        await batcher.submit(["one too many"])
    assert batcher.queued == 4  # nothing of the refused call was queued
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
    # an empty queue takes any call, even one over the bound: one call at the limit runs
    assert (await asyncio.wait_for(batcher.submit(["x"] * 6), 5)).shape == (6, 1)
    await batcher.close()
