"""What the benchmark scripts share: one percentile rule and one way to run a coroutine."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, as the processes under test do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def exit_on_sigterm() -> None:
    """End the bench on SIGTERM as on Ctrl-C, through its ``finally`` blocks: they stop the
    processes it started, which run in sessions of their own and never see the signal.

    Only the first SIGTERM (or Ctrl-C) ends it: a second one, as ``timeout`` sends when
    its own process group was signalled too, would otherwise interrupt those ``finally``
    blocks half way and leave the rest of the processes running."""
    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
