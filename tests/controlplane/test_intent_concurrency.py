"""Operator intent written by two control-plane replicas at once loses nothing.

Two replicas (each its own gRPC server, fleet service and Redis client) share a private
redis-server; an agent stand-in for node ``gpu-a`` is connected to both. Cordons and
deploys onto that one node are fired at both replicas concurrently; afterwards the
stored record holds every deploy and the cordon, and each replica's view agrees. A
read-modify-write of the node's record (what the intent store did before) dropped
writes here: each replica overwrote the record with the copy it had read.
"""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from controlplane.adapters import intent_store
from controlplane.core import intent
from protos.synapse.v1 import admin_pb2, common_pb2
from tests import harness
from tests.controlplane.test_admin import MODEL, Admin, AgentStandIn, Replica, eventually, settings

DEPLOYS = 12   # per replica


async def stored(url: str, node: str) -> intent.NodeIntent:
    client = aioredis.from_url(url)
    try:
        raw = await client.hget(intent_store.KEY, node)
    finally:
        await client.aclose()
    return intent.NodeIntent.from_json(raw.decode() if raw else None)


async def test_two_replicas_editing_one_node_at_once_lose_nothing(
        redis_server: harness.RedisServer) -> None:
    replicas = [await Replica(settings(redis_server.url)).start() for _ in range(2)]
    agents = [AgentStandIn("gpu-a") for _ in replicas]
    admins: list[Admin] = []
    try:
        for agent, replica in zip(agents, replicas, strict=True):
            await agent.connect(replica.address)
            await eventually(lambda r=replica: len(r.services.registry.routable(MODEL)) == 1,
                             "node")
            admins.append(Admin(replica.address))
        calls = [admins[r]("DeployModel", admin_pb2.DeployModelRequest(
                    model=f"m{r}-{i}", engine=common_pb2.ENGINE_KIND_SIMULATOR, nodes=["gpu-a"]))
                 for i in range(DEPLOYS) for r in (0, 1)]
        calls += [admins[i % 2]("CordonNode", admin_pb2.CordonNodeRequest(
                      name="gpu-a", reason=f"maintenance {i}")) for i in range(4)]
        await asyncio.gather(*calls)
        record = await stored(redis_server.url, "gpu-a")
        wanted = {f"m{r}-{i}-simulator" for i in range(DEPLOYS) for r in (0, 1)}
        assert set(record.desired) == wanted, sorted(wanted - set(record.desired))
        assert record.cordoned and record.reason.startswith("maintenance ")
        for replica in replicas:   # each replica's view converges on the stored record
            await eventually(lambda r=replica: set(
                json.loads(r.services.fleet.intent.get("gpu-a").to_json())["desired"])
                == wanted, "replica view")
        assert replicas[0].services.registry.routable(MODEL) == []
    finally:
        for admin in admins:
            await admin.channel.close()
        for agent in agents:
            await agent.close()
        for replica in replicas:
            await replica.stop()
