"""The runner's probes: when it asks who listens on the engine's port."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry

from agent import metrics, process
from agent import runner as runners
from agent.core import types
from agent.core.types import Phase
from tests.agent.test_supervisor import _settings, drive
from tests.clock import VirtualTime


async def test_ownership_is_checked_on_becoming_ready_then_every_30s_not_every_probe(
        tmp_path):
    """psutil's walk of the process and socket tables (hundreds of ms on a busy host)
    ran at every liveness probe of every backend (review finding)."""
    vt, checks = VirtualTime(), []

    def owns(pid: int, port: int) -> bool | None:
        checks.append(vt.now)
        return process.tree_listens(pid, port)

    hooks = runners.Hooks(metrics.Metrics(CollectorRegistry()), "n", lambda: None)
    async with aiohttp.ClientSession() as session:
        r = runners.Runner(types.EngineSpec(name="o", engine="simulator", model="m"),
                           _settings(tmp_path, probe_interval_s=2), session, hooks,
                           "127.0.0.1", timing=vt.time, owns=owns)
        r.start()
        try:
            await drive(vt, lambda: r.phase == Phase.READY, "ready", paced=True)
            assert len(checks) == 1
            ready_at = vt.now
            await drive(vt, lambda: vt.now - ready_at >= 61, "a minute of probes", within=70)
            assert r.phase == Phase.READY
            assert len(checks) == 3   # on becoming ready, then after 30 s twice
            assert checks[2] - checks[1] >= runners.OWNER_RECHECK_S
        finally:
            await r.stop()
