"""The fleet's intent against its store: a reload never undoes an update that landed while
it was reading."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

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


CORDONED = intent.NodeIntent(cordoned=True, reason="bad GPU").to_json()
DEPLOYED = {"e": {"model": "m"}}


class CountedWrites(SlowLoads):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        self.writes += 1
        return await super().compare_and_set(node, expected, text)


@pytest.mark.parametrize(("again", "writes"), [
    ({"cordoned": True, "reason": "bad GPU"}, 0), ({"desired": DEPLOYED}, 0),
    ({"cordoned": True, "reason": "bad fan"}, 1)], ids=["cordon", "deploy", "a real change"])
async def test_an_update_that_changes_nothing_writes_nothing_and_holds_back_no_load(
        again: dict[str, object], writes: int) -> None:
    """Cordoning a cordoned node or deploying the same engine again counted as a write: the
    load under way was thrown away, so another replica's cordon of another node waited a
    pass more (and a stream of such calls held every other node's change back). A real
    change keeps its node from that load, and only its node."""
    store = CountedWrites()
    assert await store.compare_and_set("gpu-1", None, intent.NodeIntent(
        cordoned=True, reason="bad GPU", desired=DEPLOYED).to_json())
    fleet_intent = intent.FleetIntent(store, registry.Registry(clocks.monotonic, 30))
    store.release.set()
    await fleet_intent.sync()
    store.release.clear()
    store.reading.clear()
    assert await store.compare_and_set("gpu-2", None, CORDONED)   # another replica's
    store.writes = 0
    sync = asyncio.create_task(fleet_intent.sync())
    await store.reading.wait()
    done = await fleet_intent.set_fields("gpu-1", **again)
    store.release.set()
    await sync
    assert store.writes == writes and (done.before == done.after) == (writes == 0)
    assert fleet_intent.get("gpu-2").cordoned                   # the load was taken
    assert fleet_intent.get("gpu-1") == done.after              # and did not undo the update


@pytest.mark.parametrize("bad", ["not json", "[]", '{"desired": 5}', '{"cordoned": "yes"}',
                                 '{"desired": {"e": "m"}}', "[" * 100_000])
async def test_a_bad_record_is_ignored_once_with_an_error_and_the_others_apply(
        caplog: pytest.LogCaptureFixture, bad: str) -> None:
    """Review 91 F3: one record that did not parse failed every sync, so no node's cordon
    applied (after a restart every node was served), and a change to it got 503."""
    store = intent.MemoryIntentStore()
    await store.compare_and_set("gpu-1", None, bad)
    await store.compare_and_set("gpu-2", None, CORDONED)
    reg = registry.Registry(clocks.monotonic, 30)
    fleet_intent = intent.FleetIntent(store, reg)
    with caplog.at_level(logging.ERROR, "synapse.controlplane.fleet"):
        for _ in range(3):
            await fleet_intent.sync()
    assert fleet_intent.get("gpu-2").cordoned and fleet_intent.get("gpu-2").reason == "bad GPU"
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'gpu-1'" in errors[0], errors      # once, naming it
    assert not fleet_intent.get("gpu-1").cordoned
    await fleet_intent.set_fields("gpu-1", cordoned=True)           # replaces the record
    assert intent.NodeIntent.from_json(await store.get("gpu-1")).cordoned
    await fleet_intent.sync()
    assert fleet_intent.get("gpu-1").cordoned and fleet_intent.get("gpu-2").cordoned


async def test_a_record_spoiled_while_running_leaves_the_node_as_applied(
        caplog: pytest.LogCaptureFixture) -> None:
    """A hand edit that breaks a cordoned node's record must not put the node back into
    routing, nor stop its engines."""
    store = intent.MemoryIntentStore()
    fleet_intent = intent.FleetIntent(store, registry.Registry(clocks.monotonic, 30))
    await fleet_intent.set_fields("gpu-1", cordoned=True, desired={"e": {"model": "m"}})
    stored = await store.get("gpu-1")
    assert await store.compare_and_set("gpu-1", stored, '{"cordoned": tru')
    with caplog.at_level(logging.ERROR, "synapse.controlplane.fleet"):
        assert await fleet_intent.sync() == set()                   # no engine to stop
    assert fleet_intent.get("gpu-1").cordoned
    assert fleet_intent.get("gpu-1").desired == {"e": {"model": "m"}}
    assert any("'gpu-1'" in r.message for r in caplog.records if r.levelno == logging.ERROR)
    # Uncordoning builds on what applied: the engine stays deployed, the record is mended.
    await fleet_intent.set_fields("gpu-1", cordoned=False)
    mended = intent.NodeIntent.from_json(await store.get("gpu-1"))
    assert dataclasses.replace(mended, version=0) == intent.NodeIntent(
        reason="", desired={"e": {"model": "m"}})
