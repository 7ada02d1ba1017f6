"""Engine processes: captured, size-capped output and whole-group termination."""

from __future__ import annotations

import asyncio
import sys

from agent import process
from tests import harness


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
    sink = process.LogSink(tmp_path / "e.log", 1 << 20, 10)
    script = ("import ctypes, os; libc = ctypes.CDLL('libc.so.6'); v = ctypes.c_int();"
              "libc.prctl(2, ctypes.byref(v), 0, 0, 0);"  # PR_GET_PDEATHSIG
              "print('PDEATHSIG', v.value, 'SESSION_LEADER', os.getsid(0) == os.getpid())")
    engine = await process.EngineProcess.spawn([sys.executable, "-c", script], {}, sink)
    assert await engine.wait() == 0
    assert "PDEATHSIG 9 SESSION_LEADER True" in sink.lines()
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
