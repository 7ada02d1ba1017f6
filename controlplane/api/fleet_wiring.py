"""The fleet service wired from the settings (``Services.fleet``).

:func:`build` picks the intent store: Redis when ``redis.url`` is set, so every replica
shares one intent, with a copy in ``data_dir`` for a start while Redis is down; the file
``<data_dir>/fleet_intent.json`` otherwise, so a restart keeps cordons, drains and deployed
engines (without Redis the control plane is one process: ``workers.why_one``). It hands
the core service what it
reads from the edge: a node's capacity from its last report (protos stay in
:mod:`admin_views`) and the reconcile-failure counter. The app's cleanup context starts
its reconcile loop and stops it (closing the store) with the app.
"""

from __future__ import annotations

import os

from controlplane import config, metrics
from controlplane.adapters import intent_copy, intent_file, intent_store, redis_limits
from controlplane.api import admin_views
from controlplane.core import fleet, intent, ledger, registry
from synapse_common import clock as clocks


def build(settings: config.ControlPlaneSettings, reg: registry.Registry,
          led: ledger.Ledger, m: metrics.Metrics, *, clock: clocks.Clock = clocks.loop_time,
          sleep: fleet.Sleeper = clocks.sleep, pushes: bool = True) -> fleet.FleetService:
    url = settings.redis.url
    path = os.path.join(settings.data_dir, intent_file.FILE)
    store: intent.IntentStore = (intent_copy.CopiedIntentStore(
        intent_store.RedisIntentStore(redis_limits.connect(url.get_secret_value())), path)
        if url else intent_file.FileIntentStore(path))
    memory = {model.name: int(model.memory_required_gb * 1024**3)
              for model in settings.models if model.memory_required_gb}
    return fleet.FleetService(
        intent.FleetIntent(store, reg), reg, led, admin_views.capacity, model_memory=memory,
        clock=clock, sleep=sleep,
        on_failure=lambda stage: m.fleet_reconcile_failures.labels(stage).inc(),
        pushes=pushes)

