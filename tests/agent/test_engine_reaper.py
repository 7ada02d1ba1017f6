"""The engine reaper run as the agent runs it: its own group, signal masks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from agent import process


def _reaper(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-S", process.REAPER, str(os.getpid()), "--",
                           *argv], capture_output=True, text=True, timeout=20, check=False,
                          **kw)  # type: ignore[call-overload]


def test_the_reaper_refuses_to_run_outside_its_own_process_group():
    """Its killpg(0) on the agent's death would reach the group it was started in."""
    done = _reaper(["echo", "started"])
    assert done.returncode == 2 and "started" not in done.stdout
    assert "not a process group leader" in done.stderr


def _blocked(line: str) -> int:
    return int(line.split()[1], 16)


def test_sighup_is_unblocked_in_the_reaper_and_the_engine_blocks_nothing():
    """A mask inherited from the agent's thread (SIGHUP blocked) kept the parent-death
    signal from ever arriving, and reached the engine (review finding)."""
    script = "grep SigBlk /proc/$PPID/status; grep SigBlk /proc/self/status"
    done = _reaper(["sh", "-c", script], start_new_session=True,
                   preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK,
                                                             {signal.SIGHUP}))
    assert done.returncode == 0, done.stderr
    reaper, engine = done.stdout.splitlines()
    assert not _blocked(reaper) & (1 << (signal.SIGHUP - 1))
    assert _blocked(engine) == 0
