"""Chaos fault "two replicas edit intent at once" (``bench/chaos.py``: ``intent_race``).

A third agent, ``node-intent`` (no engines of its own; its "simulator" is a sleeping
process, so deployed engines cost nothing and never serve), registers with both
replicas. Then, for the fault's duration, both replicas are sent — at the same time,
through their Admin services — deploys of distinct models onto that one node and
cordons of it with changing reasons. Afterwards every deploy a replica acknowledged must
be in both replicas' model lists and the node cordoned on both: ``lost`` counts the
acknowledged edits missing anywhere (a read-modify-write of the node's record loses
most of them). The node is then uncordoned, its engines undeployed and its agent
stopped; the load on the other nodes goes on throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sys
import time
from typing import Any, Protocol

import grpc
import yaml

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, common_pb2

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from tests import fleet, harness  # noqa: E402

NODE = "node-intent"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]
CONVERGE_S = 15.0   # replicas apply the stored intent within a reconcile pass (1 s)


class Fleet(Protocol):
    tmp: pathlib.Path
    pool: harness.ProcessPool
    cp_configs: list[pathlib.Path]


def _grpc_addresses(fl: Fleet) -> list[str]:
    ports = [yaml.safe_load(p.read_text())["grpc"]["port"] for p in fl.cp_configs]
    return [f"127.0.0.1:{port}" for port in ports]


def _start_agent(fl: Fleet, addresses: list[str]) -> harness.ManagedProcess:
    cfg = fleet.agent_config(NODE, addresses, {}, fl.tmp / f"engines-{NODE}")
    cfg["supervisor"]["simulator_command"] = SLEEPER
    path = fleet.write_yaml(fl.tmp / f"{NODE}.yaml", cfg)
    return fl.pool.start(NODE, ["synapse", "agent", "--config", str(path)])


class Admin:
    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]

    async def __call__(self, method: str, request: Any) -> Any:
        return await getattr(self.stub, method)(
            request, metadata=(("authorization", f"Bearer {fleet.ADMIN_KEY}"),), timeout=20)

    async def node_known(self) -> bool:
        try:
            await self("GetNode", admin_pb2.GetNodeRequest(name=NODE))
        except grpc.aio.AioRpcError:
            return False
        return True

    async def view(self) -> tuple[set[str], bool]:
        """Models with an engine on the node here, and whether it is cordoned here."""
        models = await self("ListModels", admin_pb2.ListModelsRequest())
        node = await self("GetNode", admin_pb2.GetNodeRequest(name=NODE))
        return ({m.name for m in models.models if m.name.startswith("intent-")},
                node.summary.cordoned)


async def _until(predicate: Any, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


async def _edit(admin: Admin, replica: int, end: float, acked: set[str]) -> int:
    """Deploys and cordons through one replica until ``end``; returns the edits made."""
    edits = 0
    while time.monotonic() < end:
        model = f"intent-r{replica}-{edits}"
        await asyncio.gather(
            admin("DeployModel", admin_pb2.DeployModelRequest(
                model=model, engine=common_pb2.ENGINE_KIND_SIMULATOR, nodes=[NODE])),
            admin("CordonNode", admin_pb2.CordonNodeRequest(
                name=NODE, reason=f"replica {replica} edit {edits}")))
        acked.add(model)
        edits += 2
    return edits


async def race(fl: Fleet, duration: float, info: dict[str, Any]) -> None:
    admins = [Admin(a) for a in _grpc_addresses(fl)]
    agent = await asyncio.to_thread(_start_agent, fl, _grpc_addresses(fl))
    acked: set[str] = set()
    try:
        registered = [await _until(a.node_known, 60) for a in admins]
        if not all(registered):
            info["not_registered"] = True
            return
        end = time.monotonic() + duration
        info["edits"] = sum(await asyncio.gather(
            *(_edit(a, i, end, acked) for i, a in enumerate(admins))))

        async def converged() -> bool:
            views = [await a.view() for a in admins]
            return all(models >= acked and cordoned for models, cordoned in views)

        await _until(converged, CONVERGE_S)
        views = [await a.view() for a in admins]
        info["lost"] = sum(len(acked - models) + (not cordoned) for models, cordoned in views)
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await admins[0]("UncordonNode", admin_pb2.UncordonNodeRequest(name=NODE))
        for model in sorted(acked):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await admins[0]("UndeployModel", admin_pb2.UndeployModelRequest(model=model))
        for admin in admins:
            await admin.channel.close()
        await asyncio.to_thread(agent.stop)
