"""``synapse up``'s children and its data dir: a child's log is capped like the agent's
engine logs, the children die with a ``synapse up`` that was SIGKILLed, and a second
``synapse up`` on the same data dir is refused while the first holds it. Real processes."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import psutil
import pytest

from controlplane import embedded
from tests import harness

TALK = "import sys\nfor i in range(2000):\n    print(f'line {i:05d} ' + 'x' * 20)\n"


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_a_childs_log_is_capped_with_one_older_file_kept(tmp_path: pathlib.Path) -> None:
    """The control plane's log grew by every request for as long as the stack ran."""
    log = tmp_path / "talker.log"
    child = embedded.Child("talker", [sys.executable, "-c", TALK], log, max_log_bytes=16384)
    child.popen.wait(timeout=60)
    child.stop(grace_s=1)
    older = log.with_name("talker.log.1")
    assert log.stat().st_size <= 16384 and older.stat().st_size <= 16384
    assert log.read_text().splitlines()[-1].startswith("line 01999 ")
    assert log.stat().st_mode & 0o777 == 0o600


def test_the_children_die_with_a_killed_synapse_up(tmp_path: pathlib.Path) -> None:
    """After SIGKILL of `synapse up`, its control plane, agent and engine kept running."""
    script = ("import sys, time\nfrom controlplane import embedded\n"
              f"c = embedded.Child('sleeper', [sys.executable, '-c', 'import time; "
              f"time.sleep(600)'], __import__('pathlib').Path({str(tmp_path / 's.log')!r}))\n"
              "print(c.popen.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()
        parent.wait(timeout=30)
        harness.wait_until(lambda: gone(child), 30, "the child to die with its parent")
    finally:
        parent.kill()
        if not gone(child):
            os.killpg(child, signal.SIGKILL)


def test_a_second_synapse_up_on_the_same_data_dir_is_refused(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second `synapse up` started beside a running one, both stacks answering."""
    data = embedded.data_directory(tmp_path / "data")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time\nfrom controlplane import embedded\n"
         f"lock = embedded.hold_data_dir(pathlib.Path({str(data)!r}))\nprint('held', flush=True)\n"
         "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as refused:
            embedded.main(["--data-dir", str(data), "--http-port", "0", "--grpc-port", "0"])
        assert refused.value.code == 1
        err = capsys.readouterr().err
        assert f"another synapse up (pid {holder.pid})" in err and str(data) in err
        assert not (data / "controlplane.yaml").exists()    # nothing of it was touched
    finally:
        holder.kill()
        holder.wait(timeout=30)
    embedded.hold_data_dir(data).close()     # free again once its holder is gone


def test_the_data_dir_stays_held_while_a_killed_synapse_ups_children_live(
        tmp_path: pathlib.Path) -> None:
    """The kernel dropped the lock with a SIGKILLed `synapse up` while its children still
    drained on the data dir: a second one could start beside them for that while."""
    data = embedded.data_directory(tmp_path / "data")
    script = ("import pathlib, sys, time\nfrom controlplane import embedded\n"
              f"lock = embedded.hold_data_dir(pathlib.Path({str(data)!r}))\n"
              "c = embedded.Child('drainer', [sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"draining\", flush=True); "
              "time.sleep(600)'], "
              f"pathlib.Path({str(tmp_path / 'd.log')!r}), keep_fds=(lock.fileno(),))\n"
              "print(c.popen.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    child = 0
    log = tmp_path / "d.log"
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # its SIGTERM (from the parent's death) ignored before the parent dies
        harness.wait_until(lambda: log.exists() and "draining" in log.read_text(), 30,
                           "the drainer to ignore SIGTERM")
        parent.kill()
        parent.wait(timeout=30)
        assert not gone(child)                  # still draining (it ignores SIGTERM)
        with pytest.raises(SystemExit):
            embedded.hold_data_dir(data)
        os.killpg(child, signal.SIGKILL)
        harness.wait_until(lambda: gone(child), 30, "the drainer to exit")
        embedded.hold_data_dir(data).close()    # free once the last holder is gone
    finally:
        parent.kill()
        if child and not gone(child):
            os.killpg(child, signal.SIGKILL)


LAST_WORDS = "print('Traceback: the last words')\nos._exit(3)\n"
TALKS_THEN_DIES = ("import os\nfor i in range(3000):\n    print(f'starting {i:05d} ' + 'x' * 40)\n"
                   + LAST_WORDS)
DIES_AT_ONCE = "import os\n" + LAST_WORDS


@pytest.mark.parametrize("script", [TALKS_THEN_DIES, DIES_AT_ONCE], ids=["talks", "at-once"])
def test_a_child_that_exits_during_the_start_ends_it_with_its_last_lines(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """A control plane that died printing its traceback: the report missed the traceback
    (print() buffered in the child, or not yet in the log when the report read it)."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)   # a shell without it
    log = tmp_path / "cp.log"
    watch = embedded.StartWatch()
    watch.children.append(embedded.Child("control plane", [sys.executable, "-c", script], log))
    try:
        with pytest.raises(RuntimeError) as failed:
            embedded._wait_for("control plane on http://127.0.0.1:1", lambda: False, watch, 60)
    finally:
        watch.children[0].stop(grace_s=1)
    assert str(failed.value).startswith(
        "control plane exited with status 3 while waiting for control plane on "
        f"http://127.0.0.1:1; its last lines ({log}):\n")
    assert str(failed.value).endswith("\n    Traceback: the last words")


def logged(log: pathlib.Path) -> str:
    return log.read_text() if log.exists() else ""


DRAINS = ("import signal, sys, time\n"
          "def stop(*_):\n    print('draining', flush=True)\n    time.sleep(0.5)\n"
          "    print('drained: the last words', flush=True)\n    sys.exit(0)\n"
          "signal.signal(signal.SIGTERM, stop)\nprint('serving', flush=True)\n"
          "time.sleep(600)\n")


def test_what_children_log_while_a_killed_synapse_up_stops_them_is_kept(
        tmp_path: pathlib.Path) -> None:
    """After SIGKILL of `synapse up`, its children drained into a pipe nobody read: the
    lines they wrote while stopping were lost."""
    log = tmp_path / "drainer.log"
    script = ("import pathlib, sys, time\nfrom controlplane import embedded\n"
              f"c = embedded.Child('drainer', [sys.executable, '-c', {DRAINS!r}], "
              f"pathlib.Path({str(log)!r}))\nprint(c.popen.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        harness.wait_until(lambda: "serving" in logged(log), 30, "the child to serve")
        parent.kill()
        parent.wait(timeout=30)
        harness.wait_until(lambda: gone(child), 30, "the child to stop with its parent")
        harness.wait_until(lambda: "drained: the last words" in logged(log), 30,
                           "the child's last lines in its log")
    finally:
        parent.kill()
        if child and not gone(child):
            os.killpg(child, signal.SIGKILL)
