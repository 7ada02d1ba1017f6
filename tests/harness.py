"""Test harness: real processes on free ports, with readiness waits and clean teardown.

Used through the fixtures in ``conftest.py``; importable from tests that need the
classes directly (``from tests import harness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from synapse_common.ports import free_port

VENV_BIN = pathlib.Path(sys.executable).parent



def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http(url: str, data: bytes | None = None, key: str | None = None,
         timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` (POST ``data`` as JSON when given), ``key`` as bearer token: the status,
    headers and body, an error status included."""
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode} while waiting "
                                 f"for {what}; its output:\n{proc.output_tail()}")
        time.sleep(interval)
    tail = f"; output of {proc.name}:\n{proc.output_tail()}" if proc else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """:func:`wait_until` for async tests: polls without blocking the event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def with_sections(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` config with ``sections`` merged in: a mapping updates the section of the
    same name key by key, anything else replaces it."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def tool(name: str, how_to_get: str) -> str:
    """Path of an external tool on PATH; without it the test fails saying how to get it."""
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"{name} is not on PATH: {how_to_get}")
    return found


def redis_argv(port: int, workdir: pathlib.Path, *extra: str) -> list[str]:
    """A private, non-persistent redis-server on 127.0.0.1:``port``."""
    binary = tool("redis-server", "apt-get install redis-server (make test does this)")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), *extra]


def console_script(name: str) -> str:
    """Path of one of our console scripts in the running venv."""
    path = VENV_BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            raise AssertionError(f"console script {name!r} not found: run `make test` "
                                 "(it installs the package into .venv)")
        return found
    return str(path)


class ManagedProcess:
    """A subprocess in its own process group, output captured to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: pathlib.Path,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # closed in stop()
        # A control plane stopped at teardown need not wait out http.drain_delay_s (no
        # load balancer routes to it): tests of the drain set the variable in ``env``.
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "SYNAPSE_HTTP__DRAIN_DELAY_S": "0",
                    **(env or {})}
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()
        return self.popen.returncode


class ProcessPool:
    """Starts processes for one test and stops all of them at teardown."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.procs: list[ManagedProcess] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              ready_url: str | None = None, ready: Callable[[], bool] | None = None,
              timeout: float = 60.0, cwd: str | None = None) -> ManagedProcess:
        """Start ``argv`` (first item may be a console-script name) and wait until ready."""
        argv = list(argv)
        if os.path.sep not in argv[0]:
            argv[0] = console_script(argv[0]) if (VENV_BIN / argv[0]).exists() else argv[0]
        proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", env=env, cwd=cwd)
        self.procs.append(proc)
        if ready_url:
            wait_until(lambda: http_ok(ready_url), timeout, f"{name} at {ready_url}", proc=proc)
        if ready:
            wait_until(ready, timeout, f"{name} to be ready", proc=proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class RedisServer:
    """A private redis-server on a free port (never the shared one on 6379).

    A port is free when chosen, not when redis-server binds it: another process's
    connection may take it as its local port meanwhile, so a first start that cannot bind
    tries another port (a later :meth:`start`, a restart, keeps the port its clients
    know)."""

    BIND_TRIES = 3

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.proc: ManagedProcess | None = None
        for attempt in range(self.BIND_TRIES):
            self.port = free_port()
            try:
                self.start()
                return
            except AssertionError:
                if attempt + 1 == self.BIND_TRIES or not self._lost_its_port():
                    raise

    def _lost_its_port(self) -> bool:
        """Whether redis-server exited because its port was taken."""
        assert self.proc is not None
        if self.proc.popen.poll() is None:
            return False
        output = self.proc.output()
        self.proc.stop()
        return "Address already in use" in output

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = redis_argv(self.port, self.workdir)
        self.proc = ManagedProcess(f"redis-{self.port}", argv,
                                   self.workdir / f"redis-{self.port}.log")
        wait_until(self.ping, 10, f"redis-server on port {self.port}", proc=self.proc)

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether it answers PING within ``timeout`` (short while polling for its start;
        asserted on, give a loaded machine seconds)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc:
            self.proc.signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def engine_key_at(url: str) -> str:
    """The key the agent gave the engine listening at ``url`` (``http://host:port``), read
    from that process's environment: an agent chooses new keys at every start
    (:mod:`agent.node_keys`), so no test can know it in advance."""
    from agent.core.commands import KEY_VARIABLES

    port = int(url.rstrip("/").rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port \
                and conn.pid:
            env = psutil.Process(conn.pid).environ()
            for variable in KEY_VARIABLES.values():
                if env.get(variable):
                    return env[variable]
            raise AssertionError(f"the engine at {url} (pid {conn.pid}) has no key")
    raise AssertionError(f"nothing listens at {url}")
