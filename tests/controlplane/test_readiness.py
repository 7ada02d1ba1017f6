"""``/ready`` answers whether this replica can serve (issue 17): config loaded, registry
synced, HTTP up. "No routable backend" is reported in the body and in ``synapse_ready``
but keeps the replica in the Service, so a fleet-wide outage still answers clients with
the 503 envelope; ``registry.ready_requires_backend`` brings back the old rule."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from controlplane.core import types
from tests.controlplane import cp_testing as t


async def ready(cp: t.RunningCP) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{cp.url}/ready") as resp:
        return resp.status, json.loads(await resp.read())


async def gauge(cp: t.RunningCP) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(
            f"{cp.url}/metrics", headers={"Authorization": f"Bearer {t.ADMIN}"}) as resp:
        text = (await resp.read()).decode()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("synapse_ready{")}


async def test_no_routable_backend_is_reported_but_the_replica_stays_ready() -> None:
    async with t.running(t.settings(registry={"sync_grace_s": 0})) as cp:
        status, body = await ready(cp)
        assert status == 200, body
        assert body["routable"] is False and body["warning"] == "no routable backend"
        assert await gauge(cp) == {"config_loaded": 1.0, "registry_synced": 1.0,
                                   "routable_backend": 0.0}
        client = cp.client()
        with pytest.raises(openai.InternalServerError) as err:   # the envelope, not a refusal
            await client.chat.completions.create(model="llama",
                                                 messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
        assert isinstance(err.value.body, dict)
        assert err.value.body.get("type") == "service_unavailable"
        await client.close()


async def test_the_old_rule_behind_a_setting() -> None:
    s = t.settings(registry={"ready_requires_backend": True, "sync_grace_s": 0})
    async with t.running(s) as cp:
        assert await ready(cp) == (503, {"status": "not ready", "backends_ready": 0,
                                         "reason": "no routable backend"})


async def test_a_fresh_replica_is_not_ready_until_its_registry_synced() -> None:
    async with t.running(t.settings(registry={"sync_grace_s": 3600})) as cp:
        status, body = await ready(cp)
        assert (status, body["reason"]) == (503, "registry syncing")
        reg = cp.services.registry
        reg.register(types.NodeInfo("gpu-1"))          # registered, nothing reported yet
        assert (await ready(cp))[0] == 503
        reg.report("gpu-1", [types.BackendState(key="gpu-1/a", node="gpu-1", name="a",
                                                url="http://a", models=(t.MODEL,),
                                                phase="starting")])
        status, body = await ready(cp)          # an agent reported: synced, none routable
        assert (status, body["routable"]) == (200, False)


async def test_static_upstreams_are_probed_before_the_replica_is_ready() -> None:
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)],
                       registry={"sync_grace_s": 3600, "upstream_probe_interval_s": 0.2})
        async with t.running(s) as cp:
            for _ in range(200):
                status, body = await ready(cp)
                if status == 200:
                    break
                assert body["reason"] == "registry syncing"
                await asyncio.sleep(0.05)
            assert b.health_hits >= 1 and body["routable"] is True
            assert body["backends_ready"] == 1
