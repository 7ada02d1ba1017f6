"""Stopping background tasks, in one place (as kopf's ``_cogs/aiokits/aiotasks.py``).

Every component that runs a loop in a task stops it the same way: cancel it, then wait
until it has ended, so that nothing the loop still uses is closed under it. The task's
own ``CancelledError`` ends here (so does a cancellation of the caller that arrives while
it waits: a stop, once begun, runs to its end).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop(*tasks: asyncio.Task[Any] | asyncio.Future[Any] | None,
               quiet: bool = False) -> None:
    """Cancel every task (``None`` are skipped), then wait for each to end.

    A task that had already failed raises its exception here, unless ``quiet``: loops
    that count and log their own failures, whose last error must not stop a shutdown.
    """
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    ignored: tuple[type[BaseException], ...] = (
        (asyncio.CancelledError, Exception) if quiet else (asyncio.CancelledError,))
    for task in live:
        with contextlib.suppress(*ignored):
            await task
