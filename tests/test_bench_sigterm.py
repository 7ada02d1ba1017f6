"""A SIGTERM stops what a bench started, even when a second one follows (as ``timeout``
forwards one when its own process group was signalled too) while it is cleaning up."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

from tests import harness

REPO = pathlib.Path(__file__).resolve().parent.parent

BENCH = """
import pathlib, sys, time
sys.path.insert(0, {repo!r})
from bench.gateway import Tree
from synapse_common.ports import free_port
tree = Tree(pathlib.Path({tmp!r}))
try:
    port = free_port()
    child = tree.start("server", [sys.executable, "-m", "http.server", str(port),
                                  "--bind", "127.0.0.1"], f"http://127.0.0.1:{{port}}/")
    print(child.pid, flush=True)
    time.sleep(120)
finally:
    print("cleaning up", flush=True)
    time.sleep(1.0)     # a slow clean-up: where the second signal lands
    tree.stop()
"""


def test_two_sigterms_still_stop_every_process_a_bench_started(tmp_path: pathlib.Path,
                                                               ) -> None:
    script = tmp_path / "bench.py"
    script.write_text(BENCH.format(repo=str(REPO), tmp=str(tmp_path)))
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    try:
        assert bench.stdout is not None
        child = int(bench.stdout.readline())
        bench.send_signal(signal.SIGTERM)
        assert bench.stdout.readline().strip() == "cleaning up"
        time.sleep(0.2)
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=30)
        harness.wait_until(lambda: not harness.alive(child), 10, "the bench's child to stop")
    finally:
        bench.kill()
