"""A child process that dies with the process that started it (Linux ``PR_SET_PDEATHSIG``).

The one home of that rule, for every Synapse process that starts another:

* ``synapse up`` starts its control plane and agent in sessions of their own (so a stop
  reaches each one's whole process group); without this, a ``synapse up`` that was
  SIGKILLed or OOM-killed left them running, reparented to PID 1, still serving and
  holding their ports and ``data_dir``;
* the agent's engine reaper (``agent.process``, ``SIGHUP``: the reaper then kills the
  engine's whole group);
* a control plane's serving workers (``controlplane.workers.exit_with_parent``), which
  learn their primary's pid on their command line and ask for the signal themselves.

:func:`preexec` returns the function to pass as ``subprocess.Popen(preexec_fn=...)``:
between fork and exec it asks the kernel for ``signal`` (SIGTERM by default: the child's
own clean stop) when its parent dies. :func:`die_with` does the same in a process that was
told its parent's pid. Both send the signal at once when the parent is already gone (it
died before the request took effect).

libc is loaded in the parent, before the fork: a child of a process with threads may
call only what is already loaded. The signal fires when the parent's *thread* that
forked exits, so call it from the thread that lives as long as the children (the main
thread, or the event loop's). Elsewhere than Linux only the check for a parent already
gone is made.
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


def _prctl() -> Any:
    libc = _libc()
    return libc.prctl if libc is not None else None


def _set(prctl: Any, parent: int, signal: int) -> None:
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal)


def preexec(signal: int = signals.SIGTERM) -> Callable[[], None]:
    """The ``preexec_fn`` that gives the child ``signal`` when this process dies."""
    return functools.partial(_set, _prctl(), os.getpid(), signal)


def die_with(parent: int, signal: int = signals.SIGTERM) -> None:
    """Give this process ``signal`` when its parent, ``parent``, dies."""
    _set(_prctl(), parent, signal)
