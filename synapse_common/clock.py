"""Time, in one place: the clock logic reads and the one sleep every loop goes through.

Logic never calls ``time.monotonic()`` or ``asyncio.sleep`` directly: it receives a
:class:`Clock` (a callable returning seconds) and waits with :func:`sleep`, so tests drive
time by hand (a fake clock) or let the event loop's own clock jump over waits (looptime)
instead of waiting in real time. This follows kopf's ``_cogs/aiokits/aiotime.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from typing import Protocol


class Clock(Protocol):
    """Seconds from some fixed point; injected so tests can move time by hand."""

    def __call__(self) -> float: ...


class Sleep(Protocol):
    """What a component that waits receives: :func:`sleep` by default, a hand-driven one in
    tests. The one signature of every wait: ``seconds`` (``None`` = until woken), ended
    early by ``wakeup``; the seconds left unslept when woken, else ``None``."""

    def __call__(self, seconds: float | None,
                 wakeup: asyncio.Event | None = None) -> Awaitable[float | None]: ...


# time.monotonic itself, not a function around it: the serving path reads the clock many
# times per request, and a Python frame per read is not free. Tests pass their own Clock.
monotonic: Clock = time.monotonic


def wall() -> float:
    """Seconds since the epoch, for timestamps that leave the process."""
    return time.time()


def loop_time() -> float:
    """The running event loop's clock: the one an async component should read when its
    waits go through :func:`sleep`, so that both move together under a fake loop time."""
    return asyncio.get_running_loop().time()


async def sleep(seconds: float | None, wakeup: asyncio.Event | None = None) -> float | None:
    """Wait ``seconds`` (``None`` = until woken), or less if ``wakeup`` is set first.

    Returns the seconds left unslept when woken early, else ``None``. A negative or zero
    delay still yields to the loop once, so a polling loop never starves its neighbours.
    """
    if wakeup is None:
        if seconds is None:
            raise ValueError("sleep(None) without a wakeup event would never return")
        await asyncio.sleep(max(0.0, seconds))
        return None
    if wakeup.is_set():
        return seconds if seconds is not None else 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        await asyncio.wait_for(wakeup.wait(), timeout=None if seconds is None else max(0.0, seconds))
    except TimeoutError:
        return None
    if seconds is None:
        return 0.0
    return max(0.0, seconds - (loop.time() - start))


def block(seconds: float) -> None:
    """The one blocking wait, for code outside any event loop (the ``synapse up``
    launcher polling its child processes)."""
    time.sleep(max(0.0, seconds))


@dataclasses.dataclass(frozen=True)
class Time:
    """A component's time, injected as one: ``wall`` for timestamps that leave the process
    (compared across replicas and restarts), ``monotonic`` for intervals and deadlines,
    ``sleep`` for every wait. Tests pass one hand-driven object for all three."""

    wall: Clock = dataclasses.field(default=wall)
    monotonic: Clock = dataclasses.field(default=monotonic)
    sleep: Sleep = dataclasses.field(default=sleep)
