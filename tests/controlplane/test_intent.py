"""The fleet's intent against its store: a reload never undoes an update that landed while
it was reading."""

from __future__ import annotations

import asyncio

from controlplane.core import intent, registry
from synapse_common import clock as clocks


class SlowLoads(intent.MemoryIntentStore):
    """Loads take a snapshot, then wait for ``release`` before returning it (a store whose
    reads go over the network or to a thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def load(self) -> dict[str, str]:
        snapshot = await super().load()
        self.reading.set()
        await self.release.wait()
        return snapshot


async def test_a_load_overtaken_by_an_update_does_not_undo_it() -> None:
    store = SlowLoads()
    fleet_intent = intent.FleetIntent(store, registry.Registry(clocks.monotonic, 30))
    sync = asyncio.create_task(fleet_intent.sync())
    await store.reading.wait()                          # the snapshot predates the cordon
    await fleet_intent.set_fields("gpu-1", cordoned=True, desired={"e": {"model": "m"}})
    store.release.set()
    assert await sync == set()                          # nothing to re-send from it
    assert fleet_intent.get("gpu-1").cordoned           # and the cordon still applies
    store.release.set()
    assert await fleet_intent.sync() == set() and fleet_intent.get("gpu-1").cordoned
