"""A process told its parent's pid (a control plane's serving worker) dies with that parent,
and at once when the parent is already gone. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests import harness

# A worker: asks to die with the process that started it, prints its pid, then waits.
WORKER = ("import os, sys, time\nfrom synapse_common import parent_death\n"
          "parent_death.die_with(int(sys.argv[1]))\nprint(os.getpid(), flush=True)\n"
          "time.sleep(600)\n")
# Its primary: starts the worker with its own pid, passes the worker's pid on, then waits.
PRIMARY = ("import os, subprocess, sys, time\n"
           "w = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())],"
           " stdout=subprocess.PIPE, text=True)\n"
           "print(w.stdout.readline().strip(), flush=True)\ntime.sleep(600)\n")


def test_a_worker_dies_with_its_sigkilled_primary() -> None:
    primary = subprocess.Popen([sys.executable, "-c", PRIMARY, WORKER],
                               stdout=subprocess.PIPE, text=True)
    worker = 0
    try:
        assert primary.stdout is not None
        worker = int(primary.stdout.readline())
        assert harness.alive(worker)
        primary.kill()
        primary.wait(timeout=30)
        harness.wait_until(lambda: not harness.alive(worker), 30,
                           "the worker to die with its primary")
    finally:
        primary.kill()
        primary.wait(timeout=30)
        if worker and harness.alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_worker_whose_primary_is_already_gone_stops_at_once() -> None:
    """Its parent is not the pid it was given: the primary died before it asked."""
    worker = subprocess.run([sys.executable, "-c", WORKER, "1"], capture_output=True,
                            timeout=60)
    assert worker.returncode == -signal.SIGTERM and worker.stdout == b""
