"""synapse_common.aiotasks.stop: what every component's shutdown relies on."""

from __future__ import annotations

import asyncio

import pytest

from synapse_common import aiotasks


async def test_stop_cancels_and_waits_until_the_loop_has_ended() -> None:
    cleaned = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)      # cleanup that itself awaits
            cleaned.set()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await aiotasks.stop(task, None)
    assert task.cancelled() and cleaned.is_set()


async def test_a_failed_loop_raises_unless_quiet() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    first, second = asyncio.create_task(fails()), asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await aiotasks.stop(first)
    await aiotasks.stop(second, quiet=True)
    assert second.done()
