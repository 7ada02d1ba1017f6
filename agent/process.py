"""Engine processes: spawning, captured output, termination of the whole process group.

Decisions:

* Each engine runs in its own session (``start_new_session=True``), so it is its own
  process-group leader and ``killpg`` reaches the workers vLLM forks as well.
* ``PR_SET_PDEATHSIG(SIGKILL)`` is set in the child between fork and exec (ctypes
  ``prctl``): if the agent is SIGKILLed or OOM-killed, the kernel kills the engine too, so
  no orphan keeps a GPU. The signal fires when the *thread* that forked dies, so engines
  are always spawned from the event-loop thread, never from ``asyncio.to_thread``.
* stdout and stderr are merged into one pipe, pumped into a size-capped log file (one
  rotated ``.1`` file kept) and a ring of the last lines for reports. Writes are small
  appends to a local file, treated like logging's handlers as non-blocking.
* Engines get the agent's environment without ``SYNAPSE_*`` (the agent's own settings and
  secrets), plus the spec's variables (and the engine key's, :mod:`agent.core.commands`).
* A sink given secrets (the engine key) masks them in the engine's output before it is
  written or kept: an engine may print its settings at start (TEI prints its arguments,
  key included). A secret cut across two reads is caught by holding back the end of a
  read that could begin one until the next read (or the agent's own note, or the close);
  output that ends a line is never held.
* Stop = SIGTERM to the group, SIGKILL to the group after the grace period, and a final
  SIGKILL to the group after the leader exits, for children that outlived it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
import os
import pathlib
import signal
import subprocess
from collections.abc import Sequence

from synapse_common import private_files

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
READ_CHUNK = 65536
MAX_TAIL_LINE = 2000  # characters kept per line in memory
MASK = b"**********"


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded before any fork: preexec_fn must not import or allocate much


def _child_setup() -> None:
    """Runs in the child after fork: die with the agent."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def engine_environment() -> dict[str, str]:
    """The agent's environment minus its own ``SYNAPSE_*`` settings.

    Engines must not inherit them: ``SYNAPSE_CONFIG_PATH`` would point the simulator at
    the agent's config file, and secrets such as the control-plane token have no
    business in an engine's environment (or its crash dumps).
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNAPSE_")}


class LogSink:
    """Size-capped log file plus the last lines in memory, ``secrets`` masked."""

    def __init__(self, path: pathlib.Path, max_bytes: int, tail_lines: int,
                 secrets: Sequence[str] = ()) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.tail: collections.deque[str] = collections.deque(maxlen=max(tail_lines, 1))
        self._partial = b""
        self._secrets = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self._held = b""
        # private: an engine may log prompts (vLLM's request logging)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._file = private_files.append(path)

    def output(self, chunk: bytes) -> None:
        """Engine output: masked (the end held back when it could begin a secret), then
        written."""
        if not self._secrets:
            self.write(chunk)
            return
        data = self._held + chunk
        for secret in self._secrets:
            data = data.replace(secret, MASK)
        cut = len(data) - self._could_begin_a_secret(data)
        self._held = data[cut:]
        if cut:
            self.write(data[:cut])

    def _could_begin_a_secret(self, data: bytes) -> int:
        """The length of the longest end of ``data`` that begins a secret."""
        return max((n for secret in self._secrets
                    for n in range(min(len(secret) - 1, len(data)), 0, -1)
                    if data.endswith(secret[:n])), default=0)

    def flush_held(self) -> None:
        """Write what :meth:`output` held back (no secret can complete it any more)."""
        held, self._held = self._held, b""
        if held:
            self.write(held)

    def write(self, chunk: bytes) -> None:
        if self._file.tell() + len(chunk) > self.max_bytes:
            self._rotate()
        self._file.write(chunk)
        self._file.flush()
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        self._partial = self._partial[-MAX_TAIL_LINE:]
        for line in lines:
            self.tail.append(line[:MAX_TAIL_LINE].decode("utf-8", "replace").rstrip("\r"))

    def note(self, text: str) -> None:
        """A line written by the agent itself (start, exit), marked as such."""
        self.flush_held()
        self.write(f"[synapse-agent] {text}\n".encode())

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = private_files.append(self.path)

    def lines(self) -> list[str]:
        return list(self.tail)

    def close(self) -> None:
        self.flush_held()
        self._file.close()


class EngineProcess:
    """One running engine process and the task pumping its output."""

    def __init__(self, proc: asyncio.subprocess.Process, sink: LogSink) -> None:
        self.proc = proc
        self.sink = sink
        self._pump = asyncio.create_task(self._pump_output())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(cls, argv: list[str], env: dict[str, str], sink: LogSink
                    ) -> EngineProcess:
        """Start ``argv``; raises OSError when it cannot be executed at all."""
        sink.note("starting: " + " ".join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**engine_environment(), **env},
            start_new_session=True, preexec_fn=_child_setup)
        return cls(proc, sink)

    async def _pump_output(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(READ_CHUNK):
            self.sink.output(chunk)

    async def wait(self) -> int:
        """Wait for the leader to exit, reap its group, log the exit (call once)."""
        code = await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        self._kill_group(signal.SIGKILL)  # children that outlived the leader
        self.sink.note(f"exited with code {code}")
        return code

    def _kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self._kill_group(signal.SIGKILL)

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM the group, SIGKILL after ``grace_s``; whoever awaits ``wait()`` sees it."""
        if self.proc.returncode is None:
            self._kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace_s)
            except TimeoutError:
                log.warning("engine pid %d ignored SIGTERM for %.0fs; killing it",
                            self.proc.pid, grace_s)
                self._kill_group(signal.SIGKILL)
