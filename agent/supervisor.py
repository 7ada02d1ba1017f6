"""The engine supervisor: every :class:`~agent.runner.Runner` of the node, config-defined
and control-plane-managed (desired backends), plus the node's drain.

``draining`` is an overlay, not a runner phase: while the node drains, live backends are
reported as ``draining`` and the runner keeps probing underneath, so undrain returns each
one to its real state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

import aiohttp

from agent import runner as runners
from agent.config import SupervisorSettings
from agent.core import types
from agent.core.types import Phase
from synapse_common import clock as clocks

log = logging.getLogger(__name__)


class Supervisor:
    """All runners of the node: config-defined ones and control-plane-managed ones."""

    def __init__(self, cfg: SupervisorSettings, hooks: runners.Hooks, advertise_host: str,
                 timing: clocks.Time = clocks.Time(), engine_key: str | None = None,
                 secret_env: frozenset[str] = frozenset()) -> None:
        self.cfg = cfg
        self._engine_key = engine_key   # for every engine started (runner)
        self._secret_env = secret_env   # variables kept from every engine (runner)
        self._hooks = hooks
        self._advertise_host = advertise_host
        self._time = timing
        self.runners: dict[str, runners.Runner] = {}
        self.config_names: set[str] = set()
        self.draining = False
        self._session: aiohttp.ClientSession | None = None

    async def start(self, specs: list[types.EngineSpec]) -> None:
        self._session = aiohttp.ClientSession()
        for spec in specs:
            self.config_names.add(spec.name)
            self._add(spec, managed=False)

    def _add(self, spec: types.EngineSpec, managed: bool) -> None:
        assert self._session is not None
        runner = runners.Runner(spec, self.cfg, self._session, self._hooks, self._advertise_host,
                                managed=managed, timing=self._time, engine_key=self._engine_key,
                                secret_env=self._secret_env)
        self.runners[spec.name] = runner
        runner.start()
        self._hooks.on_change()

    async def _remove(self, name: str) -> None:
        runner = self.runners.pop(name)
        await runner.stop()
        self._hooks.on_change()

    async def apply_desired(self, specs: list[types.EngineSpec],
                            retry: Collection[str] = ()) -> list[str]:
        """Make the managed set equal ``specs``; returns one error per rejected spec.

        Only the backends named in ``retry`` (an operator deployed them again) leave
        ``crashloop``/``failed`` at once: the control plane sends the same set again every
        pass while the node refuses some of it, and a retry at each of those would restart
        a crash-looping engine every pass instead of every ``crashloop_retry_s``."""
        errors: list[str] = []
        wanted: dict[str, types.EngineSpec] = {}
        for spec in specs:
            if spec.name in self.config_names:
                errors.append(f"{spec.name}: defined in the agent's own config; not managed")
            else:
                wanted[spec.name] = spec
        doomed = [n for n, r in self.runners.items() if r.managed and
                  (n not in wanted or wanted[n] != r.spec)]
        await asyncio.gather(*(self._remove(n) for n in doomed))
        for name, spec in wanted.items():
            runner = self.runners.get(name)
            if runner is None:
                self._add(spec, managed=True)
            elif name in retry:
                runner.reset()
        return errors

    def set_draining(self, draining: bool) -> None:
        if draining != self.draining:
            self.draining = draining
            self._hooks.on_change()

    async def wait_idle(self, grace_s: float) -> bool:
        """Wait until no live generation engine has running+waiting > 0 (fresh scrape).

        True when idle was observed, False when the grace period ran out first. An
        engine whose metrics cannot be read counts as busy: better to wait the grace
        period than to cut requests off.
        """
        since = self._time.monotonic()
        deadline = since + grace_s
        while self._time.monotonic() < deadline:
            if all(self._idle(r, since) for r in self.runners.values()):
                return True
            await self._time.sleep(min(0.2, self.cfg.scrape_interval_s))
        return False

    @staticmethod
    def _idle(runner: runners.Runner, since: float) -> bool:
        if runner.phase not in runners.LIVE or runner.spec.task != "generate":
            return True
        if runner.spec.engine == "external":
            return True  # not ours to drain
        if runner.phase == Phase.STARTING:
            return True  # serves nothing yet
        return runner.snapshot_at >= since and runner.in_flight() == 0

    async def stop_all(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.runners.values()))
        if self._session is not None:
            await self._session.close()

    def statuses(self) -> list[types.BackendStatus]:
        return [r.status(self.draining) for r in self.runners.values()]
