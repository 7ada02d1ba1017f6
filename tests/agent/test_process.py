"""Engine processes: captured, size-capped output and whole-group termination."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from typing import Any

import psutil
import pytest

from agent import process
from tests import harness
from tests.agent.conftest import STAND_IN


def test_log_sink_rotates_at_the_cap_and_keeps_the_last_lines(tmp_path):
    sink = process.LogSink(tmp_path / "e.log", max_bytes=4096, tail_lines=3)
    for i in range(400):
        sink.write(f"line {i:04d} ".encode() + b"x" * 20 + b"\n")
    sink.write(b"partial")
    sink.close()
    assert (tmp_path / "e.log.1").exists()
    assert (tmp_path / "e.log").stat().st_size <= 4096
    assert sink.lines() == [f"line {i:04d} " + "x" * 20 for i in (397, 398, 399)]


async def test_terminate_reaches_the_whole_group_and_kills_a_stubborn_engine(tmp_path):
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('CHILD_PID', child.pid, flush=True)\n"
              "time.sleep(60)\n")
    engine = await process.EngineProcess.spawn([sys.executable, "-c", script], {}, sink)
    for _ in range(200):
        if any(line.startswith("CHILD_PID ") for line in sink.lines()):
            break
        await asyncio.sleep(0.05)
    child = int(next(line for line in sink.lines() if line.startswith("CHILD_PID ")).split()[1])
    waiter = asyncio.create_task(engine.wait())
    await engine.terminate(grace_s=0.5)  # SIGTERM ignored → SIGKILL after the grace
    assert await waiter == -9
    for _ in range(100):
        if not harness.alive(child):
            break
        await asyncio.sleep(0.05)
    assert not harness.alive(child) and not harness.alive(engine.pid)
    assert sink.lines()[-1] == "[synapse-agent] exited with code -9"
    sink.close()


async def test_an_unrunnable_command_raises_oserror(tmp_path):
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    try:
        await process.EngineProcess.spawn([str(tmp_path / "missing")], {}, sink)
    except OSError as exc:
        assert "missing" in str(exc)
    else:
        raise AssertionError("spawning a missing binary did not fail")
    sink.close()


async def test_engines_do_not_inherit_the_agents_settings_or_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNAPSE_CONFIG_PATH", "/etc/synapse/agent.yaml")
    monkeypatch.setenv("SYNAPSE_CONTROL_PLANE__TOKEN", "s3cret")
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    script = "import os; print(sorted(k for k in os.environ if 'SYNAPSE' in k or k == 'X'))"
    engine = await process.EngineProcess.spawn([sys.executable, "-c", script], {"X": "1"}, sink)
    assert await engine.wait() == 0
    assert "['X']" in sink.lines()
    sink.close()


async def test_engines_are_set_to_die_with_the_agent(tmp_path):
    """The engine runs in the group its reaper leads (EngineProcess.pid), and dies with it."""
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    script = ("import ctypes, os; libc = ctypes.CDLL('libc.so.6'); v = ctypes.c_int();"
              "libc.prctl(2, ctypes.byref(v), 0, 0, 0);"  # PR_GET_PDEATHSIG
              "print('PDEATHSIG', v.value, 'GROUP', os.getpgid(0), 'SESSION', os.getsid(0))")
    engine = await process.EngineProcess.spawn([sys.executable, "-c", script], {}, sink)
    assert await engine.wait() == 0
    assert f"PDEATHSIG 9 GROUP {engine.pid} SESSION {engine.pid}" in sink.lines()
    sink.close()


# A stand-in agent: spawns one engine through agent.process, prints the engine's pid,
# then waits to be SIGKILLed.
FAKE_AGENT = """
import asyncio, pathlib, sys
from agent import process

async def main():
    sink = process.LogSink(pathlib.Path(sys.argv[1]), 1 << 20, 10)
    engine = await process.EngineProcess.spawn(sys.argv[2:], {}, sink)
    print(engine.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_sigkilled_agent_takes_the_engines_children_along(tmp_path):
    """PDEATHSIG on the engine alone left its own children (vLLM's engine core) running
    when the agent was SIGKILLed (probe finding): the whole group goes now."""
    pid_file = tmp_path / "grandchild.pid"
    engine_argv = [*STAND_IN, "--port", str(harness.free_port()),
                   "--grandchild-pid-file", str(pid_file)]
    agent = subprocess.Popen([sys.executable, "-c", FAKE_AGENT, str(tmp_path / "e.log"),
                              *engine_argv], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        engine = int(agent.stdout.readline())
        harness.wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20,
                           "the engine to start its child")
        grandchild = int(pid_file.read_text())
        assert harness.alive(engine) and harness.alive(grandchild)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        harness.wait_until(lambda: not harness.alive(grandchild) and not harness.alive(engine),
                           10, "the engine and its child to die with the agent")
    finally:
        agent.kill()
        agent.wait(timeout=10)


async def test_a_missing_command_is_an_oserror_before_anything_starts(tmp_path):
    """The reaper runs the engine: a missing engine binary must still fail the spawn
    (phase failed), not become an exit code (crashloop)."""
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    for command in ("no-such-engine-binary", str(tmp_path / "missing")):
        try:
            await process.EngineProcess.spawn([command], {"PATH": str(tmp_path)}, sink)
        except FileNotFoundError as exc:
            assert command in str(exc)
        else:
            raise AssertionError(f"spawning {command} did not fail")
    sink.close()


def test_a_secret_in_the_engines_output_is_masked_even_cut_across_reads(tmp_path):
    secret = "abcdef0123456789" * 4
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10, secrets=[secret])
    text = f"Args {{ api_key: Some(\"{secret}\") }}\nready\nkey again {secret}\n".encode()
    pieces = [text[:30], text[30:41], text[41:70], text[70:-20]]   # each a read of the pipe
    for piece in pieces:
        sink.output(piece)
    assert sink.lines() == ["Args { api_key: Some(\"**********\") }", "ready"]
    sink.output(text[-20:])
    sink.note("exited with code 0")
    sink.close()
    written = (tmp_path / "e.log").read_text()
    assert secret not in written and written.count("**********") == 2
    assert sink.lines()[-2:] == ["key again **********", "[synapse-agent] exited with code 0"]


def test_output_that_ends_a_line_is_never_held_back(tmp_path):
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10, secrets=["s3cr3t-value"])
    sink.output(b"Uvicorn running\n")
    assert sink.lines() == ["Uvicorn running"]
    assert (tmp_path / "e.log").read_text() == "Uvicorn running\n"
    sink.close()


def test_engine_logs_are_private(tmp_path):
    """They were 0644 in a 0755 folder; an engine may log prompts (probe finding)."""
    sink = process.LogSink(tmp_path / "engines" / "e.log", max_bytes=64, tail_lines=3)
    for _ in range(10):                       # past the cap: the new file after rotating too
        sink.write(b"a prompt someone sent\\n")
    sink.close()
    assert (tmp_path / "engines").stat().st_mode & 0o777 == 0o700
    for name in ("e.log", "e.log.1"):
        assert (tmp_path / "engines" / name).stat().st_mode & 0o777 == 0o600


async def test_an_engine_whose_log_the_disk_refuses_runs_to_its_end(tmp_path):
    """A full disk stopped the pump (and failed the runner's notes), leaving the engine
    blocked on a full pipe: its lines are lost from the file now, still kept for reports."""
    (tmp_path / "e.log").symlink_to("/dev/full")  # every write: ENOSPC
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    script = "for i in range(5000): print('line', i, 'x' * 60)"
    engine = await process.EngineProcess.spawn([sys.executable, "-c", script], {}, sink)
    assert await asyncio.wait_for(engine.wait(), 60) == 0
    assert sink.lines()[-2:] == ["line 4999 " + "x" * 60, "[synapse-agent] exited with code 0"]
    sink.close()


async def test_spawn_shows_the_engine_start_masked(tmp_path):
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    script = "print('up')"
    engine = await process.EngineProcess.spawn(
        [sys.executable, "-c", script, "--token", "t0ps3cret"], {"API_KEY": "k3y"}, sink)
    assert await engine.wait() == 0
    sink.close()
    started = sink.lines()[0]
    assert started.startswith("[synapse-agent] starting: API_KEY=********** ")
    assert "--token **********" in started and "t0ps3cret" not in started
    assert "k3y" not in (tmp_path / "e.log").read_text()


def test_a_port_held_by_another_process_is_named_and_ours_is_recognised(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        holder = process.port_holder("127.0.0.1", port)
        assert holder is not None and holder.startswith("pid ")  # this test's own process
        assert process.port_holder("0.0.0.0", port) is not None  # a wildcard bind conflicts
    assert process.port_holder("127.0.0.1", port) is None


@pytest.mark.parametrize("in_child", [False, True])
async def test_a_port_counts_as_the_engines_when_its_tree_listens(tmp_path, in_child):
    port = harness.free_port()
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    argv = [*STAND_IN, "--port", str(port), *(["--serve-in-child"] if in_child else [])]
    engine = await process.EngineProcess.spawn(argv, {}, sink)
    try:
        await harness.until(lambda: harness.http_ok(f"http://127.0.0.1:{port}/health"), 20,
                            "the stand-in to serve")
        assert await asyncio.to_thread(process.tree_listens, engine.pid, port) is True
        assert await asyncio.to_thread(process.tree_listens, engine.pid, port + 1) is False
        assert process.listener(port, not_of=engine.pid) is None
        assert (process.listener(port) or "").startswith("pid ")
    finally:
        await engine.terminate(2)
        await engine.wait()
        sink.close()


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_port_that_cannot_be_bound_for_another_reason_is_not_called_held(host):
    """EADDRNOTAVAIL or a name that does not resolve named a holder and refused the start
    (review finding): only EADDRINUSE means held; otherwise it is unknown."""
    assert process.port_holder(host, harness.free_port()) is None


async def test_a_process_of_the_tree_whose_sockets_are_denied_does_not_hide_a_listener(
        tmp_path):
    port = harness.free_port()
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    engine = await process.EngineProcess.spawn(
        [*STAND_IN, "--port", str(port), "--serve-in-child"], {}, sink)

    def leader_denied(proc: psutil.Process) -> list[Any]:
        if proc.pid == engine.pid:   # the reaper: as another user's process would be
            raise psutil.AccessDenied(proc.pid)
        return list(proc.net_connections(kind="tcp"))

    def broken(proc: psutil.Process) -> list[Any]:
        raise OSError("no /proc")

    try:
        await harness.until(lambda: harness.http_ok(f"http://127.0.0.1:{port}/health"), 20,
                            "the stand-in to serve")
        listens = process.tree_listens
        assert await asyncio.to_thread(listens, engine.pid, port, leader_denied) is True
        assert await asyncio.to_thread(listens, engine.pid, port + 1, leader_denied) is None
        assert await asyncio.to_thread(listens, engine.pid, port, broken) is None
    finally:
        await engine.terminate(2)
        await engine.wait()
        sink.close()
