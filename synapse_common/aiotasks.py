"""Stopping background tasks, in one place (as kopf's ``_cogs/aiokits/aiotasks.py``).

Every component that runs a loop in a task stops it the same way: cancel it, then wait
until it has ended, so that nothing the loop still uses is closed under it. The task's
own ``CancelledError`` ends here (so does a cancellation of the caller that arrives while
it waits: a stop, once begun, runs to its end).

Tasks whose caller is gone live here too: :func:`outliving` (a call into another system
that must end, and be undone, even when its caller is cancelled) and :func:`later` (work
nobody awaits, kept referenced until it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_unawaited: set[asyncio.Future[Any]] = set()   # tasks of later(), referenced until done


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


async def outliving(work: Awaitable[T],
                    undo: Callable[[T], Coroutine[Any, Any, Any] | None],
                    on_error: Callable[[Exception], None] | None = None) -> T:
    """``await work``, in a task of its own that a cancellation of the caller does not
    stop. For a call that changes another system (a store's script that grants a slot or
    charges tokens): it may have done so before its reply came, and a caller cancelled
    then (its client gone) would leave nothing to undo it. When the caller was cancelled
    first, ``undo`` gets the call's result once it comes (the work it returns, if any,
    runs as :func:`later`), and ``on_error`` the call's error."""
    call = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        _unawaited.add(call)                # no caller holds it any more
        call.add_done_callback(_unawaited.discard)
        call.add_done_callback(functools.partial(_abandoned, undo, on_error))
        raise


def _abandoned(undo: Callable[[T], Coroutine[Any, Any, Any] | None],
               on_error: Callable[[Exception], None] | None, call: asyncio.Future[T]) -> None:
    if call.cancelled():
        return
    if (exc := call.exception()) is not None:
        if isinstance(exc, Exception) and on_error is not None:
            on_error(exc)
        return
    if (work := undo(call.result())) is not None:
        later(work)


def later(work: Coroutine[Any, Any, Any]) -> None:
    """Run ``work`` with no caller to await it, kept referenced until it ends (the loop
    holds only weak references to tasks)."""
    task = asyncio.ensure_future(work)
    _unawaited.add(task)
    task.add_done_callback(_unawaited.discard)
