"""The semantic cache's store is opened at start-up, not by the first cacheable request
(whose lookup then spent its whole budget on the open and was served without the
cache), and ``/ready`` waits a bounded time for it."""

from __future__ import annotations

import json
import pathlib
import threading
import time
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from controlplane import cache_wiring, config
from controlplane import metrics as metrics_mod
from controlplane.adapters import l1
from controlplane.api import readiness
from controlplane.core import response_cache
from controlplane.core.l2 import index as l2_index
from tests.controlplane import cp_testing as t
from tests.controlplane.l2 import fakes


def test_building_l2_opens_the_lite_store_before_any_request(tmp_path: pathlib.Path) -> None:
    s = config.ControlPlaneSettings.model_validate({"data_dir": str(tmp_path)})
    index = cache_wiring.build_l2(s)
    store: Any = index.store
    deadline = time.monotonic() + 120
    while store.warming() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not store.warming()
    assert (tmp_path / cache_wiring.L2_LITE_FILE).exists(), "the Lite store was not opened"
    assert store._client is not None, "no request came, yet the first one must not open it"


class OpeningStore(fakes.FakeStore):
    """A store whose background open is under way until ``opened`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()

    def warming(self) -> bool:
        return not self.opened.is_set()


def cache_over(store: OpeningStore) -> response_cache.TieredCache:
    return response_cache.TieredCache(
        options=response_cache.Options(),
        l1=l1.MemoryL1(1000, 10**7), metrics=metrics_mod.Metrics(CollectorRegistry()),
        l2=l2_index.L2Index(store, l2_index.Options(collection="c")))


async def ready(cp: t.RunningCP) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{cp.url}/ready") as resp:
        return resp.status, json.loads(await resp.read())


async def test_ready_waits_for_the_semantic_store_to_open() -> None:
    store = OpeningStore()
    async with t.running(t.settings(registry={"sync_grace_s": 0}),
                         cache=cache_over(store)) as cp:
        status, body = await ready(cp)
        assert (status, body["reason"]) == (503, "cache opening")
        assert body["warning"] == "no routable backend", "what an operator reads next"
        store.opened.set()
        assert (await ready(cp))[0] == 200


async def test_ready_does_not_wait_for_a_store_that_never_opens() -> None:
    store = OpeningStore()
    async with t.running(t.settings(registry={"sync_grace_s": 0}),
                         cache=cache_over(store)) as cp:
        readiness.state(cp.services).started -= readiness.L2_OPEN_WAIT_S
        assert (await ready(cp))[0] == 200, "a Milvus that does not answer kept it out"
