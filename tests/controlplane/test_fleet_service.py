"""The fleet service (core) on a real registry, ledger and intent store, with stepped time:
drains time out on the injected clock, reconcile failures are logged and counted, deploys
are planned onto GPUs and ports, a plan the agent refuses is rolled back, and a desired
state is sent once however the reconcile loop and a deploy interleave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator, Callable

import pytest

from controlplane import errors
from controlplane.adapters import intent_copy, intent_store, redis_limits
from controlplane.api import admin_views
from controlplane.core import fleet, intent, ledger, placement, registry, types
from protos.synapse.v1 import common_pb2, controlplane_pb2
from tests import harness
from tests.clock import ManualClock, SteppedSleep, settle

GIB = 1024**3
NODE = "gpu-a"
Answer = Callable[[types.Command], tuple[bool, str]]


def report(free_gb: list[float], running: int = 0) -> controlplane_pb2.Report:
    gpus = [common_pb2.GpuSample(index=i, memory_total_bytes=80 * GIB,
                                 memory_used_bytes=int((80 - f) * GIB),
                                 memory_free_bytes=int(f * GIB)) for i, f in enumerate(free_gb)]
    backends = [common_pb2.BackendState(name="sim", url="http://127.0.0.1:8999",
                                        phase=common_pb2.BACKEND_PHASE_READY,
                                        num_requests_running=running)]
    return controlplane_pb2.Report(gpus=gpus, backends=backends,
                                   telemetry=common_pb2.TelemetryStatus(source="fake", ok=True))


class Node:
    """The agent's side of one node on the registry: reports, and acks every command (once
    ``answering`` is set: clear it to keep commands waiting for their ack)."""

    def __init__(self, reg: registry.Registry, answer: Answer = lambda c: (True, "")) -> None:
        self.reg = reg
        self.answer = answer
        self.commands: list[types.Command] = []
        self.answering = asyncio.Event()
        self.answering.set()
        reg.register(types.NodeInfo(NODE, engine_ports=(9000, 9003)))
        self.report([70, 60, 50, 40])
        self.task = asyncio.create_task(self._ack())

    def report(self, free_gb: list[float], running: int = 0) -> None:
        details = report(free_gb, running)
        self.reg.report(NODE, [types.BackendState(key=f"{NODE}/sim", node=NODE, name="sim",
                                                  url="http://127.0.0.1:8999", models=("m",),
                                                  running=running)], details=details)

    async def _ack(self) -> None:
        outbox = self.reg.outbox(NODE)
        while True:
            cid, command = await outbox.get()
            self.commands.append(command)
            await self.answering.wait()
            self.reg.ack(cid, *self.answer(command))


@contextlib.asynccontextmanager
async def service(store: intent.IntentStore | None = None, answer: Answer | None = None,
                  ) -> AsyncIterator[tuple[fleet.FleetService, Node, SteppedSleep, list[str]]]:
    reg = registry.Registry(ManualClock(), 15.0)
    node = Node(reg, answer) if answer else Node(reg)
    time = SteppedSleep(ManualClock())
    failures: list[str] = []
    svc = fleet.FleetService(intent.FleetIntent(store or intent.MemoryIntentStore(), reg), reg,
                             ledger.Ledger(), admin_views.capacity, clock=time.clock,
                             sleep=time, on_failure=failures.append)
    try:
        yield svc, node, time, failures
    finally:
        node.task.cancel()
        await svc.stop()


class SlowReads(intent.MemoryIntentStore):
    """A store whose reads of one record (a writer's, not the loop's load of them all)
    wait for ``reading``."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.reading.set()

    async def get(self, node: str) -> str | None:
        await self.reading.wait()
        return await super().get(node)


class SlowReplies(intent.MemoryIntentStore):
    """A store whose writes land at once but whose answers wait for ``replying``, as a
    Redis reply still on its way: others read the record before its writer goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.replying = asyncio.Event()
        self.replying.set()

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        written = await super().compare_and_set(node, expected, text)
        await self.replying.wait()
        return written


def deploy(model: str, gb: float = 0, tp: int = 1, nodes: tuple[str, ...] = (NODE,),
           ) -> fleet.DeployRequest:
    spec = {"name": f"{model}-vllm", "engine": "ENGINE_KIND_VLLM", "model": model}
    return fleet.DeployRequest(model, spec, nodes, 1, placement.Need(int(gb * GIB), tp))


async def test_a_drain_wait_times_out_on_the_injected_clock() -> None:
    async with service() as (svc, node, time, _):
        node.report([70, 60, 50, 40], running=3)
        result = await svc.drain(NODE, grace_s=3, wait=True, timeout_s=0.5)
        assert (result.drained, result.in_flight) == (False, 3)
        assert time.calls == [0.2, 0.2, 0.2]   # polled until the 0.5 s deadline passed
        assert [c.kind for c in node.commands] == ["drain"]
        assert node.commands[0].grace_seconds == 3


async def test_reconcile_failures_are_logged_counted_and_the_last_intent_kept(
        redis_server: harness.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = intent_store.RedisIntentStore(redis_limits.connect(redis_server.url))
    async with service(store) as (svc, _, time, failures):
        await svc.cordon(NODE, "maintenance")
        await svc.reconcile()
        assert failures == []
        redis_server.kill()
        svc.registry.cordon(NODE, False)    # as a re-registered node would start
        task = asyncio.create_task(svc.run())
        await harness.until(lambda: len(time.calls) >= 3, 30, "three reconcile passes")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert failures[:3] == ["load", "load", "load"]
        assert set(time.calls) == {fleet.RECONCILE_INTERVAL_S}
        assert svc.registry.node(NODE).cordoned   # the last known intent still applies
        # logged once per outage, not at every pass
        warned = [r.message for r in caplog.records if r.levelno == logging.WARNING
                  and "cannot load operator intent" in r.message]
        assert len(warned) == 1 and "(keeping the last one applied)" in warned[0]


async def test_a_load_failing_from_the_start_says_none_was_loaded(
        redis_server: harness.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Probe finding: a first start with the store down said it kept "the last one
    applied" when none had been."""
    store = intent_store.RedisIntentStore(redis_limits.connect(redis_server.url))
    redis_server.kill()
    async with service(store) as (svc, _, _, failures):
        await svc.reconcile()
        assert failures == ["load"]
        warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
        assert any("cannot load operator intent (none loaded yet" in w for w in warned)
        assert not any("keeping the last one applied" in w for w in warned)


async def test_a_start_while_redis_is_down_applies_the_intent_copied_at_the_last_load(
        redis_server: harness.RedisServer, tmp_path: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Probe finding: a control plane started while Redis was down served on a cordoned
    node (and reported ready)."""
    copy = tmp_path / "data" / intent_copy.FILE

    def store() -> intent_copy.CopiedIntentStore:
        return intent_copy.CopiedIntentStore(
            intent_store.RedisIntentStore(redis_limits.connect(redis_server.url)), copy)
    async with service(store()) as (svc, _, _, failures):
        await svc.cordon(NODE, "maintenance")
        await svc.reconcile()
        assert failures == [] and copy.stat().st_mode & 0o777 == 0o600
    redis_server.kill()
    async with service(store()) as (svc, _, _, failures):     # a new process
        assert not svc.registry.node(NODE).cordoned
        await svc.reconcile()
        assert svc.registry.node(NODE).cordoned and failures == []    # from the copy
        assert any(r.levelno == logging.ERROR and "applying the copy" in r.message
                   for r in caplog.records)
        await svc.reconcile()               # used once: then a failure, the intent kept
        assert failures == ["load"] and svc.registry.node(NODE).cordoned
    copy.unlink()
    caplog.clear()
    async with service(store()) as (svc, _, _, failures):     # no copy: said loudly
        await svc.reconcile()
        assert failures == ["load"] and not svc.registry.node(NODE).cordoned
        assert any(r.levelno == logging.ERROR and "operator intent" in r.message
                   and "unknown" in r.message for r in caplog.records)


async def test_a_push_the_agent_refuses_is_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    async with service(answer=lambda c: (False, "x-vllm: does not fit: GPU 9 does not exist")
                       ) as (svc, _, _, failures):
        await svc.intent.update(NODE, lambda i: intent.NodeIntent(
            desired={"x-vllm": {"name": "x-vllm", "engine": "ENGINE_KIND_VLLM", "model": "x"}}))
        for _ in range(3):
            await svc.reconcile()
        assert failures == ["push", "push", "push"]
        assert sum("not applied" in r.message for r in caplog.records) == 1


async def test_deploys_land_on_different_gpus_and_ports_and_a_third_is_refused() -> None:
    async with service() as (svc, node, _, _):
        first = await svc.deploy(deploy("a", 30))
        second = await svc.deploy(deploy("b", 30))
        assert [p.reason for p in first + second] == ["deployed", "deployed"]
        desired = svc.intent.get(NODE).desired
        assert (desired["a-vllm"]["gpuIndices"], desired["a-vllm"]["port"]) == ([0], 9000)
        assert (desired["b-vllm"]["gpuIndices"], desired["b-vllm"]["port"]) == ([1], 9001)
        assert desired["a-vllm"]["gpuMemoryUtilization"] == 0.375
        sent = node.commands[-1].backends
        assert {s["name"]: s["gpuIndices"] for s in sent} == {"a-vllm": [0], "b-vllm": [1]}
        with pytest.raises(errors.Conflict) as refused:
            await svc.deploy(deploy("c", 100, tp=2))
        assert "40.0 GiB free on the weakest of its 2 best GPUs, 50.0 GiB needed" in \
            refused.value.message
        assert "c-vllm" not in svc.intent.get(NODE).desired
        again = await svc.deploy(deploy("a", 30))
        assert again[0].reason == "already deployed"
        assert svc.intent.get(NODE).desired["a-vllm"]["gpuIndices"] == [0]   # not moved


async def test_a_plan_the_agent_refuses_is_rolled_back_with_its_reason() -> None:
    why = "a-vllm: does not fit: GPU 0 has 1.0 GiB free, 30.0 GiB needed"

    def answer(command: types.Command) -> tuple[bool, str]:
        return (False, why) if command.backends else (True, "")

    async with service(answer=answer) as (svc, _, _, _):
        with pytest.raises(errors.Conflict) as refused:
            await svc.deploy(deploy("a", 30))
        assert refused.value.message == f"node 'gpu-a' refused the plan for a-vllm: {why}"
        await svc.intent.refresh()   # the store, not only this replica's view
        assert svc.intent.get(NODE).desired == {}


async def test_a_deploy_waiting_for_its_ack_is_not_sent_again_by_the_reconcile_loop() -> None:
    """Flake in test_admin: the loop's pass while the agent had not yet confirmed the
    deploy's push sent the same desired engines a second time."""
    async with service() as (svc, node, _, _):
        node.answering.clear()
        deploying = asyncio.create_task(svc.deploy(deploy("a", 30)))
        await settle()
        assert [c.kind for c in node.commands] == ["desired_backends"]
        passing = asyncio.create_task(svc.reconcile())
        await settle()
        node.answering.set()
        assert [p.reason for p in await deploying] == ["deployed"]
        await passing
        await svc.reconcile()           # confirmed since: nothing to send
        assert [c.kind for c in node.commands] == ["desired_backends"]
        again = await svc.deploy(deploy("a", 30))   # asked again: sent (retries a crash loop)
        assert again[0].reason == "already deployed" and len(node.commands) == 2
        assert [c.retry for c in node.commands] == [(), ("a-vllm",)]


async def deploy_beside_the_loop_push(store: SlowReplies, svc: fleet.FleetService, node: Node,
                                      ) -> tuple[list[types.Command],
                                                 asyncio.Task[list[fleet.Placement]],
                                                 asyncio.Task[None]]:
    """Deploys ``a`` while the loop runs a pass: the loop loads the deploy's record and
    sends it before the store has answered the deploy; then the store answers, then the
    node. Returns the commands sent before the store answered, the deploy and the pass."""
    store.replying.clear()
    node.answering.clear()
    deploying = asyncio.create_task(svc.deploy(deploy("a", 30)))
    await settle()
    passing = asyncio.create_task(svc.reconcile())
    await settle()
    sent = list(node.commands)
    store.replying.set()
    await settle()
    node.answering.set()
    return sent, deploying, passing


async def test_a_deploy_takes_the_answer_of_the_loop_push_of_what_it_wrote() -> None:
    """The other order: the loop loads the deploy's record and sends it before the deploy
    has heard back from the store; the deploy then waits for that push's ack."""
    store = SlowReplies()
    async with service(store) as (svc, node, _, _):
        sent, deploying, passing = await deploy_beside_the_loop_push(store, svc, node)
        assert [c.backends[0]["name"] for c in sent] == ["a-vllm"]   # the loop's
        assert [p.reason for p in await deploying] == ["deployed"]
        await passing
        assert len(node.commands) == 1


async def test_a_plan_refused_in_the_loop_push_is_rolled_back_by_the_deploy() -> None:
    why = "a-vllm: does not fit: GPU 0 has 1.0 GiB free, 30.0 GiB needed"
    store = SlowReplies()

    def answer(command: types.Command) -> tuple[bool, str]:
        return (False, why) if command.backends else (True, "")

    async with service(store, answer) as (svc, node, _, _):
        _, deploying, passing = await deploy_beside_the_loop_push(store, svc, node)
        with pytest.raises(errors.Conflict, match="refused the plan"):
            await deploying
        await passing
        assert len(node.commands) == 1 and svc.intent.get(NODE).desired == {}


B_REFUSED = "b-vllm: does not fit: GPU 9 does not exist"


def refuse_b(command: types.Command) -> tuple[bool, str]:
    return (False, B_REFUSED) if any(s["name"] == "b-vllm" for s in command.backends) \
        else (True, "")


async def add_b(svc: fleet.FleetService) -> None:
    """Another replica's deploy of b-vllm, which the node refuses."""
    b = {"name": "b-vllm", "engine": "ENGINE_KIND_VLLM", "model": "b", "gpuIndices": [9]}
    await svc.intent.update(NODE, lambda i: intent.NodeIntent(
        desired={**i.desired, "b-vllm": b}))


async def test_a_refused_set_is_resent_naming_nothing_to_retry_and_a_re_deploy_names_its_engine(
        ) -> None:
    """Each pass resends a set the node refused part of (it may have room later); each
    resend retried every crash-looping engine of the node, so while b-vllm was refused a
    crash-looping a-vllm restarted every pass. Only an operator's deploy of a-vllm again
    asks the agent to retry it."""
    async with service(answer=refuse_b) as (svc, node, _, _):
        assert [p.reason for p in await svc.deploy(deploy("a", 30))] == ["deployed"]
        await add_b(svc)
        for _ in range(3):
            await svc.reconcile()
        assert len(node.commands) == 4 and all(c.retry == () for c in node.commands)
        again = await svc.deploy(deploy("a", 30))
        assert again[0].reason == f"already deployed; agent did not confirm: {B_REFUSED}"
        assert node.commands[-1].retry == ("a-vllm",) and len(node.commands) == 5


async def test_a_re_deploy_does_not_take_the_answer_of_a_resend_that_named_nothing() -> None:
    """A resend of the very set a re-deploy wrote, started while it read the record, is
    not the re-deploy's push: it retries nothing."""
    store = SlowReads()
    async with service(store, refuse_b) as (svc, node, _, _):
        await svc.deploy(deploy("a", 30))
        await add_b(svc)
        await svc.reconcile()
        store.reading.clear()
        deploying = asyncio.create_task(svc.deploy(deploy("a", 30)))
        await settle()
        await svc.reconcile()                   # the loop's resend, after the deploy began
        store.reading.set()
        assert (await deploying)[0].reason.startswith("already deployed")
        assert [c.retry for c in node.commands[-2:]] == [(), ("a-vllm",)]
