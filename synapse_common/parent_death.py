"""A child process that dies with the process that started it (Linux ``PR_SET_PDEATHSIG``).

``synapse up`` starts its control plane and agent in sessions of their own (so a stop
reaches each one's whole process group); without this, a ``synapse up`` that was
SIGKILLed or OOM-killed left them running, reparented to PID 1, still serving and
holding their ports and ``data_dir``. :func:`preexec` returns the function to pass as
``subprocess.Popen(preexec_fn=...)``: between fork and exec it asks the kernel for
``signal`` (SIGTERM: the child's own clean stop) when its parent dies, and sends it at
once when the parent is already gone (it died before the request took effect).

libc is loaded in the parent, before the fork: a child of a process with threads may
call only what is already loaded. The signal fires when the parent's *thread* that
forked exits, so call it from the thread that lives as long as the children (the main
thread). Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal as signals
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def preexec(signal: int = signals.SIGTERM) -> Callable[[], None]:
    """The ``preexec_fn`` that gives the child ``signal`` when this process dies."""
    parent = os.getpid()
    libc = _libc()
    prctl = libc.prctl if libc is not None else None

    def setup() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal)
    return setup
