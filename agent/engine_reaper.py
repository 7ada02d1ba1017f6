"""Runs one engine and takes its whole process group down when the agent dies.

``python -I -S engine_reaper.py AGENT_PID -- ARGV…`` (:mod:`agent.process` runs this file by
path; standard library only, nothing of Synapse is imported).

Why: the agent sets a parent-death signal on the process it starts, but the kernel clears
it for that process's own children, so when the agent was SIGKILLed vLLM's engine-core
process (a grandchild) lived on and kept its GPU. This process is the one the agent starts:
the leader of the engine's own process group, with ``SIGHUP`` as its parent-death signal.
When the agent dies it kills the group (``killpg(0, SIGKILL)``: the engine, every process
the engine forked that stayed in the group, and itself). Otherwise it only waits:

* it forks the engine (parent-death signal ``SIGKILL`` on the engine too, in case this
  process is killed on its own) and execs ``ARGV``, with the dispositions Python changed
  (``SIGPIPE``, ``SIGXFSZ``) and the ones set here put back to their defaults;
* it ignores ``SIGTERM`` and ``SIGINT``: the agent stops an engine by signalling the whole
  group, the engine gets the same signal and this process waits for it to exit;
* it exits the way the engine did (the same code, or killed by the same signal), so the
  agent's log and reports read as if it had started the engine itself.

A ``SIGHUP`` while the agent still lives (``getppid()`` unchanged) is ignored; the agent
dying before the handler was installed is caught by checking ``getppid()`` before the fork,
and this process dying before the engine's parent-death signal was set by the engine
checking its ``getppid()`` right after setting it. ``SIGHUP`` is unblocked here (a mask is
inherited: the agent's thread may block it), and the engine execs with no signal blocked.
It runs only as its process group's leader (exit 2 otherwise): ``killpg(0)`` would else
kill the group it was started in, the agent's own.
Processes that leave the group (``setsid``) are out of reach, as they are of the agent's
own ``killpg``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import types

PR_SET_PDEATHSIG = 1
PARENT_GONE = signal.SIGHUP
RESET = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ)


def _kill_group() -> None:
    os.killpg(0, signal.SIGKILL)


def _die_with_parent(sig: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux: no parent-death signal
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _run_engine(argv: list[str], reaper: int) -> None:
    """In the forked child: back to default signal handling, die with this process, exec."""
    for sig in RESET:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _die_with_parent(signal.SIGKILL)
    if os.getppid() != reaper:  # it died before the signal was set: nobody would send it
        os._exit(1)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"cannot run {argv[0]}: {exc.strerror or exc}\n".encode())
    os._exit(127)


def _exit_like(code: int) -> int:
    if code >= 0:
        return code
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a mirrored SIGSEGV dumps nothing
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    return 128 - code  # only if the signal did not end this process


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        os.write(2, b"usage: engine_reaper.py AGENT_PID -- ARGV...\n")
        return 2
    agent_pid, argv = int(args[0]), args[2:]
    if os.getpgrp() != os.getpid():
        os.write(2, b"engine_reaper.py: not a process group leader (start it in a new "
                    b"session); its killpg would reach the group it was started in\n")
        return 2
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {PARENT_GONE})

    def on_parent_gone(signum: int, frame: types.FrameType | None) -> None:
        if os.getppid() != agent_pid:
            _kill_group()

    signal.signal(PARENT_GONE, on_parent_gone)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != agent_pid:
        return 1  # the agent died before the handler was in place: start nothing
    reaper = os.getpid()
    pid = os.fork()
    if pid == 0:
        _run_engine(argv, reaper)
    _, status = os.waitpid(pid, 0)  # retried after a signal handler ran (PEP 475)
    return _exit_like(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
