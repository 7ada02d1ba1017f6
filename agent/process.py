"""Engine processes: spawning, captured output, termination of the whole process group,
and who listens on an engine's port.

Decisions:

* Each engine runs under :mod:`agent.engine_reaper` (``python -I -S``, standard library
  only), started in its own session (``start_new_session=True``): the reaper is the
  process-group leader, the engine its child, and ``killpg`` reaches the workers vLLM
  forks as well. ``PR_SET_PDEATHSIG(SIGHUP)`` is set on the reaper between fork and exec
  (:mod:`synapse_common.parent_death`, which also sends it at once when the agent is
  already gone): if the agent is SIGKILLed or OOM-killed, the reaper kills the whole
  group, so no engine nor any of its children (vLLM's engine core) keeps a GPU. A
  parent-death signal set on the engine itself would not do: the kernel clears it for
  the engine's children. The signal fires when the *thread* that forked dies, so engines
  are always spawned from the event-loop thread, never from ``asyncio.to_thread``.
  :attr:`EngineProcess.pid` is the reaper's, whose environment and command line carry
  the engine's; the engine and its workers are its descendants.
* The command is looked up on the engine's ``PATH`` before the reaper starts, so a
  missing binary is still an ``OSError`` of :meth:`EngineProcess.spawn` (``failed``),
  not an exit code.
* stdout and stderr are merged into one pipe, pumped into a size-capped log file
  (:mod:`synapse_common.capped_log`, the one home of that rule: one rotated ``.1`` file
  kept, lines lost rather than the pump stopped when the disk refuses them) and a ring of
  the last lines for reports. Writes are small appends to a local file, treated like
  logging's handlers as non-blocking.
* The ``starting:`` line shows the command and the engine's variables with secrets
  masked (:func:`agent.core.commands.shown`, the one home of that rule).
* Engines get the agent's environment without ``SYNAPSE_*`` (the agent's own settings and
  secrets), plus the spec's variables (and the engine key's, :mod:`agent.core.commands`).
* A sink given secrets (the engine key) masks them in the engine's output before it is
  written or kept: an engine may print its settings at start (TEI prints its arguments,
  key included). A secret cut across two reads is caught by holding back the end of a
  read that could begin one until the next read (or the agent's own note, or the close);
  output that ends a line is never held.
* Stop = SIGTERM to the group, SIGKILL to the group after the grace period, and a final
  SIGKILL to the group after the leader exits, for children that outlived it.
* Ports (blocking, for ``asyncio.to_thread``): :func:`port_holder` says whether a port can
  be bound as an engine binds it (``SO_REUSEADDR``) and, when not, names the process
  listening there when psutil can see it (``None``, unknown, on any error but
  ``EADDRINUSE``); :func:`tree_listens` says whether a process or one of its descendants
  listens on a port (``None`` when psutil may not read the sockets of those it did not
  see listening, or fails). Engines share the agent's PID namespace (they are its
  descendants), so the process tree is the sound owner test, but not a complete one: a
  stranger sharing the port with the engine (``SO_REUSEPORT``) goes unseen, since the
  engine's tree listens too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import psutil

from agent.core import commands
from synapse_common import capped_log, parent_death

log = logging.getLogger(__name__)

READ_CHUNK = 65536
MAX_TAIL_LINE = 2000  # characters kept per line in memory
MASK = commands.MASK.encode()
REAPER = str(pathlib.Path(__file__).resolve().parent / "engine_reaper.py")
PARENT_GONE = signal.SIGHUP  # the reaper's parent-death signal (agent.engine_reaper)


def _runnable(command: str, env: Mapping[str, str]) -> None:
    """Raise the OSError executing ``command`` would raise (looked up on ``env``'s PATH)."""
    path = env.get("PATH", os.defpath)
    if shutil.which(command, path=path) is not None:
        return
    exists = os.path.exists(command) if os.sep in command else any(
        os.path.exists(os.path.join(d, command)) for d in path.split(os.pathsep) if d)
    code = errno.EACCES if exists else errno.ENOENT
    raise OSError(code, os.strerror(code), command)


def engine_environment(withheld: Collection[str] = ()) -> dict[str, str]:
    """The agent's environment minus its own ``SYNAPSE_*`` settings and the ``withheld``
    variables (those the agent's secrets were read from: ``token: {env: NAME}``).

    Engines must not inherit them: ``SYNAPSE_CONFIG_PATH`` would point the simulator at
    the agent's config file, and secrets such as the control-plane token have no
    business in an engine's environment (or its crash dumps). A backend's own ``env`` is
    applied on top, so a variable it sets reaches the engine even when withheld here.
    """
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SYNAPSE_") and k not in withheld}


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
        self._file = capped_log.CappedFile(path, max_bytes)

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
        self._file.write(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        self._partial = self._partial[-MAX_TAIL_LINE:]
        for line in lines:
            self.tail.append(line[:MAX_TAIL_LINE].decode("utf-8", "replace").rstrip("\r"))

    def note(self, text: str) -> None:
        """A line written by the agent itself (start, exit), marked as such."""
        self.flush_held()
        self.write(f"[synapse-agent] {text}\n".encode())

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
    async def spawn(cls, argv: list[str], env: dict[str, str], sink: LogSink,
                    withheld: Collection[str] = ()) -> EngineProcess:
        """Start ``argv`` under the reaper, in :func:`engine_environment` (``withheld``
        left out) and ``env``; raises OSError when it cannot be executed."""
        sink.note("starting: " + commands.shown(argv, env))
        full_env = {**engine_environment(withheld), **env}
        _runnable(argv[0], full_env)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", REAPER, str(os.getpid()), "--", *argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=full_env, start_new_session=True,
            preexec_fn=parent_death.preexec(PARENT_GONE))
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


# -- ports ---------------------------------------------------------------------------------
def _listening(conns: Iterable[Any], port: int) -> list[Any]:
    """psutil's connection tuples (its ``sconn``/``pconn``) listening on ``port``."""
    return [c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr
            and c.laddr.port == port]


def _connections(proc: psutil.Process) -> list[Any]:
    read = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    return list(read(kind="tcp"))


def _bind_host(host: str) -> tuple[socket.AddressFamily, str]:
    if host in ("", "0.0.0.0"):
        return socket.AF_INET, "0.0.0.0"
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), host


def port_holder(host: str, port: int) -> str | None:
    """Who holds ``host:port`` (blocking); ``None`` when an engine could bind it now, or
    when this test cannot tell (any error but ``EADDRINUSE``: a privileged port, an
    address not on this host, a name that does not resolve): the engine's own bind then
    says what is wrong, in its log."""
    family, bind_host = _bind_host(host)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as engines bind
            s.bind((bind_host, port))
            return None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return None
    return listener(port) or "another process"


def listener(port: int, not_of: int = 0) -> str | None:
    """``pid N (name)`` of a process listening on ``port`` (outside process ``not_of``'s
    tree); ``another process`` when psutil sees a listener but not its owner (another
    user's, unless the agent runs as root); ``None`` when it sees none (blocking)."""
    try:
        found = _listening(psutil.net_connections(kind="tcp"), port)
    except (psutil.Error, OSError):
        return None
    exclude = {p.pid for p in tree(not_of)} if not_of else set()
    for conn in found:
        if conn.pid is None:
            return "another process"
        if conn.pid not in exclude:
            with contextlib.suppress(psutil.Error):
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            return f"pid {conn.pid}"
    return None


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (empty once it has gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_listens(pid: int, port: int,
                 read: Callable[[psutil.Process], list[Any]] = _connections) -> bool | None:
    """Whether ``pid`` or a descendant listens on ``port`` (blocking); ``None`` when it
    cannot tell: psutil found no listener but may not read the sockets of some process of
    the tree, or failed altogether. ``read`` is how one process's sockets are read."""
    try:
        denied = False
        for proc in tree(pid):
            try:
                if _listening(read(proc), port):
                    return True
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                denied = True  # another process of the tree may still be seen listening
        return None if denied else False
    except (psutil.Error, OSError):
        return None
