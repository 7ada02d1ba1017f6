"""What the supervisor's and the runner's tests share: their settings, a driver of the
runner's virtual time, and what a started engine's environment was."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable

from agent.config import SupervisorSettings
from tests import harness
from tests.agent.conftest import STAND_IN
from tests.clock import VirtualTime


def supervisor_settings(tmp_path, **kw) -> SupervisorSettings:
    """The supervisor's settings for a test: fast probes, scrapes and back-off, the
    stand-in engine, logs and compile cache under ``tmp_path``; ``kw`` overrides."""
    base = {"log_dir": str(tmp_path / "logs"), "probe_interval_s": 0.1,
            "scrape_interval_s": 0.1, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
            "stop_grace_s": 2, "unhealthy_after": 2, "simulator_command": STAND_IN,
            "compile_cache_dir": str(tmp_path / "compile")}
    settings = {**base, **kw}
    settings.setdefault("crashloop_retry_s", settings["backoff_max_s"])  # retry fast here
    return SupervisorSettings(**settings)


async def drive(vt: VirtualTime, until: Callable[[], bool], what: str, *,
                paced: bool = False, within: float = 30.0, loops: int = 2) -> None:
    """Run the runner's virtual time to each next wait's end, one at a time, until
    ``until`` (at most ``within`` virtual seconds); before each step, wait (really) until
    its ``loops`` loops all wait again, so the engine's real I/O between two steps never
    lets virtual time run ahead. ``paced``: as fast as real time, no faster, while what
    is awaited is real (an engine process starting up)."""
    start = vt.now
    while True:
        await harness.until(lambda: until() or len(vt.due()) >= loops, 20,
                            f"{what}: every loop to wait")
        if until():
            return
        step = vt.due()[0] - vt.now
        if vt.now + step - start > within:
            raise AssertionError(f"{what}: not within {within} virtual seconds")
        if paced:
            await asyncio.sleep(step)
        await vt.advance(step)


def proc_environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` started with."""
    raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
