"""Natural micro-batching: coalescing, failures, the lone caller, the gathering window."""

from __future__ import annotations

import asyncio
import zlib

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


class SteppedModel:
    """A "model" that runs one batch per permit the test hands out, recording each batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.started = asyncio.Condition()

    async def __call__(self, texts: list[str]) -> np.ndarray:
        async with self.started:
            self.batches.append(texts)
            self.started.notify_all()
        await self.permits.get()
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    async def on_batch(self, count: int) -> None:
        """Wait until ``count`` batches have reached the model."""
        async with self.started:
            await self.started.wait_for(lambda: len(self.batches) >= count)


def _submit(batcher: batcher_mod.MicroBatcher, tenant: str | None,
            texts: list[str]) -> asyncio.Task[np.ndarray]:
    with batcher_mod.tenant_scope(tenant):
        return asyncio.create_task(batcher.submit(texts))


async def test_a_tenants_lookup_rides_the_next_batch_however_much_another_has_queued():
    model = SteppedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=64, wait_s=0.0, max_queued=8192)
    heavy = [_submit(batcher, "a", [f"a{c}-{i}" for i in range(2048)]) for c in range(3)]
    await model.on_batch(1)  # a's first batch is on the model, the rest of its texts wait
    lookup = _submit(batcher, "b", ["b's prompt"])
    model.permits.put_nowait(None)  # a's first batch ends
    await model.on_batch(2)
    assert "b's prompt" in model.batches[1] and len(model.batches[1]) == 64
    model.permits.put_nowait(None)  # the batch b shares with a ends
    assert (await lookup).tolist() == [[10.0]]
    assert batcher.queued > 4000 and not any(t.done() for t in heavy)  # a still waits
    for task in heavy:
        task.cancel()
    await asyncio.gather(*heavy, return_exceptions=True)
    await batcher.close()


async def test_a_tenant_filling_its_queue_is_refused_while_another_is_still_taken():
    model = SteppedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0, max_queued=8)
    running = _submit(batcher, "a", ["running"])
    await model.on_batch(1)
    waiting = [_submit(batcher, "a", ["a"] * 4) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(errors.Overloaded, match="8 texts queued, at most 8"):
        await _submit(batcher, "a", ["one too many"])
    others = [_submit(batcher, "b", ["b1", "b2"]), _submit(batcher, "b", ["b3", "b4"])]
    await asyncio.sleep(0)
    assert batcher.queued == 12  # b's calls queued beside a's full queue
    for _ in range(4):
        model.permits.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(running, *waiting, *others), 5)
    await batcher.close()
    assert model.batches[1] == ["a", "a", "b1", "b2"]  # a's and b's texts share it equally


async def test_invented_tenants_cannot_queue_past_twice_the_bound():
    """Each new tenant's empty queue takes a call, but a holder of the agent's credential
    naming tenants without end stops at the whole queue's hard cap."""
    model = SteppedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0, max_queued=4)
    running = _submit(batcher, "a", ["running"])
    await model.on_batch(1)
    taken = [_submit(batcher, f"invented-{i}", ["x"] * 4) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued == 8
    for i in range(2, 5):
        with pytest.raises(errors.Overloaded, match="busy"):
            await asyncio.wait_for(_submit(batcher, f"invented-{i}", ["x"]), 5)
    assert batcher.queued == 8  # nothing of the refused calls was queued
    for _ in range(8):
        model.permits.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(running, *taken), 5)
    # an empty queue still takes a call over the cap: one call at the per-call limit runs
    assert (await asyncio.wait_for(_submit(batcher, "b", ["y"] * 10), 5)).shape == (10, 1)
    await batcher.close()


async def test_a_cancelled_calls_pieces_not_yet_on_the_model_are_never_computed():
    model = SteppedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0)
    abandoned = _submit(batcher, "a", [f"x{i}" for i in range(12)])
    await model.on_batch(1)
    assert batcher.queued == 8
    abandoned.cancel()
    await asyncio.gather(abandoned, return_exceptions=True)
    assert batcher.queued == 0  # its other pieces left at once
    nxt = _submit(batcher, "a", ["next"])
    model.permits.put_nowait(None)
    model.permits.put_nowait(None)
    await asyncio.wait_for(nxt, 5)
    await batcher.close()
    assert model.batches == [["x0", "x1", "x2", "x3"], ["next"]]


async def test_a_call_larger_than_a_batch_comes_back_whole_and_in_order():
    model = SteppedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0)
    texts = ["x" * i for i in range(1, 11)]
    long_call = _submit(batcher, "a", texts)
    for _ in range(3):
        model.permits.put_nowait(None)
    got = await asyncio.wait_for(long_call, 5)
    await batcher.close()
    assert got[:, 0].tolist() == [float(i) for i in range(1, 11)]
    assert [len(b) for b in model.batches] == [4, 4, 2]


class HashModel(SteppedModel):
    """Each text's row is its own CRC-32 (a value no other text shares); ``short`` rows
    fewer than texts when set."""

    short = 0

    async def __call__(self, texts: list[str]) -> np.ndarray:
        await super().__call__(texts)
        rows = [[float(zlib.crc32(t.encode()))] for t in texts]
        return np.array(rows[:len(rows) - self.short], dtype=np.float64)


def _crc(texts: list[str]) -> list[list[float]]:
    return [[float(zlib.crc32(t.encode()))] for t in texts]


async def test_tenants_sharing_a_batch_each_get_exactly_their_own_texts_rows():
    model = HashModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0)
    first = _submit(batcher, "a", ["first"])
    await model.on_batch(1)   # the model is busy: a's and b's calls queue behind it
    a_texts, b_texts = [f"a-{i}" for i in range(6)], [f"b-{i}" for i in range(5)]
    a, b = _submit(batcher, "a", a_texts), _submit(batcher, "b", b_texts)
    for _ in range(5):
        model.permits.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(first, a, b), 5)
    await batcher.close()
    assert any({t[0] for t in batch} == {"a", "b"} for batch in model.batches[1:])
    assert a.result().tolist() == _crc(a_texts) and b.result().tolist() == _crc(b_texts)


async def test_a_batch_answered_with_a_row_too_few_fails_every_call_in_it():
    """Split anyway, rows shifted onto other callers' texts, across tenants, and the last
    call never resolved (review finding)."""
    model = HashModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0)
    first = _submit(batcher, "a", ["first"])
    await model.on_batch(1)
    # the next batch is a1, a2, b1, b2; a3 waits for the one after
    a, b = _submit(batcher, "a", ["a1", "a2", "a3"]), _submit(batcher, "b", ["b1", "b2"])
    model.permits.put_nowait(None)
    await asyncio.wait_for(first, 5)
    model.short = 1
    model.permits.put_nowait(None)
    got = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 5)
    assert model.batches[1] == ["a1", "a2", "b1", "b2"]
    assert all(isinstance(r, errors.EmbedderUnavailable) for r in got)
    assert "3 rows for 4 texts" in str(got[0])
    assert batcher.queued == 0   # a3 is dropped with its call
    model.short = 0
    model.permits.put_nowait(None)
    after = await asyncio.wait_for(_submit(batcher, "b", ["b3"]), 5)
    assert after.tolist() == _crc(["b3"]) and model.batches[2] == ["b3"]
    await batcher.close()


async def test_an_empty_call_behind_a_full_share_resolves_at_once():
    model = SteppedModel()
    batcher = batcher_mod.MicroBatcher(model, max_batch=4, wait_s=0.0)
    running = _submit(batcher, "a", ["running"])
    await model.on_batch(1)
    full = _submit(batcher, "a", ["x"] * 8)   # the model stays busy: no permit yet
    empty = await asyncio.wait_for(_submit(batcher, "a", []), 5)
    assert len(empty) == 0 and not running.done()
    full.cancel()
    running.cancel()
    await asyncio.gather(full, running, return_exceptions=True)
    await batcher.close()
