"""The fleet service: what operators ask of nodes, and keeping agents in line with it.

``cordon``/``uncordon``/``drain`` and ``deploy``/``undeploy`` change the durable operator
intent (:mod:`controlplane.core.intent`) and tell the agents; :meth:`FleetService.run` is
the reconcile loop that applies the stored intent to this replica's registry every
``interval_s`` and re-sends a node's desired engines when they changed or the agent
registered again — so another replica's deploy and a restarted agent both converge
without an operator repeating themselves. A failed pass is logged and counted
(``on_failure(stage)``), never silent; the next pass tries again.

A node's desired engines go out as one ``desired_backends`` command per state, not one per
sender: the latest push to each node is remembered from the moment it is sent (what, to
which registration of the agent, its answer to come or come), not once confirmed. The
loop sends again only when the state changed, the agent registered again, or that push
failed (refused, no ack in time, stream gone); a push still in flight is left to its
sender. A deploy, undeploy or roll-back always asks the agent, unless a push of the very
state it wrote went out after it began: it then takes that push's answer. The agent
applies an identical set as a no-op (no engine restarts), but a duplicate is another round
trip under the agent's command lock.

A deploy of an engine already deployed names it in its push's ``retry``: the agent retries
it at once if it crash-loops or failed (an operator's way to say "try again now"). No
other push retries anything: a refused set is sent again every pass (the node may have
room later), and when each resend retried the node's crash-looping engines, an engine
refused anywhere on the node made every other one there restart every pass, past its
crash loop's retry period. Such a deploy takes a push started after it began only if that
push named the engine too.

Time goes through the injected ``clock`` and ``sleep`` (the event loop's by default), so
tests move it instead of waiting. Placement of engines onto nodes, GPUs and ports is
:mod:`controlplane.core.placement`; this module feeds it the node's capacity, read by
``capacity_of`` from the node's last report and the engines already placed there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from controlplane import errors
from controlplane.core import intent as intent_mod
from controlplane.core import ledger as ledger_mod
from controlplane.core import placement, types
from controlplane.core import registry as registry_mod
from synapse_common import aiotasks
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.fleet")

Sleeper = clocks.Sleep
Spec = Mapping[str, Any]   # BackendSpec fields as plain data (JSON names)
CapacityOf = Callable[[types.NodeView, Mapping[str, Spec]], placement.NodeCapacity]

RECONCILE_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.2
DRAIN_TIMEOUT_S = 60.0      # DrainNode(wait) without a timeout
UNDRAIN_WAIT_S = 3.0        # uncordon waits this long for the agent's engines to report
PLACED = ("gpuIndices", "port", "gpuMemoryUtilization")   # fields the plan fills in


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    node: str
    backend: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class DrainResult:
    node: types.NodeView
    drained: bool
    in_flight: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeployRequest:
    model: str
    spec: Spec                          # without placement fields; "name" is the backend
    nodes: tuple[str, ...] = ()         # empty: placement by free VRAM
    replicas: int = 1
    need: placement.Need = dataclasses.field(default_factory=placement.Need)

    @property
    def backend(self) -> str:
        return str(self.spec["name"])


def node_in_flight(view: types.NodeView, led: ledger_mod.Ledger) -> int:
    """This replica's in-flight requests on the node plus what its engines still hold."""
    ours = sum(led.load(b.key).in_flight for b in view.backends)
    engines = sum(b.running + b.waiting for b in view.backends)
    return max(ours, engines)


def _refused(error: str, backend: str) -> bool:
    """Whether an agent's ack error refuses ``backend`` (one "name: why" per spec)."""
    return any(part.startswith(f"{backend}: ") for part in error.split("; "))


def _unplaced(spec: Spec) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in PLACED}


class FleetService:
    def __init__(self, intent: intent_mod.FleetIntent, registry: registry_mod.Registry,
                 ledger: ledger_mod.Ledger, capacity_of: CapacityOf, *,
                 model_memory: Mapping[str, int] | None = None,
                 clock: clocks.Clock = clocks.loop_time, sleep: Sleeper = clocks.sleep,
                 on_failure: Callable[[str], None] = lambda stage: None,
                 interval_s: float = RECONCILE_INTERVAL_S, pushes: bool = True) -> None:
        self.intent = intent
        # False in a pod's serving workers: they apply the intent to their registry, and
        # only the pod's primary, which holds the agents' streams, sends them commands.
        self._pushes = pushes
        self.registry = registry
        self._ledger = ledger
        self._capacity_of = capacity_of
        self._model_memory = dict(model_memory or {})
        self._clock = clock
        self._sleep = sleep
        self._on_failure = on_failure
        self._interval_s = interval_s
        self._last_push: dict[str, _Push] = {}  # node -> the latest push of desired engines
        self._push_count = 0                    # pushes started, numbering them
        self._push_errors: dict[str, str] = {}
        self._load_failing = False
        self._loaded_once = False      # the intent was loaded from the store at least once
        self._task: asyncio.Task[None] | None = None

    # -- the reconcile loop -------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await aiotasks.stop(self._task)
        self._task = None
        await aiotasks.stop(*(p.answer for p in self._last_push.values()), quiet=True)
        await self.intent.close()

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:
                log.exception("fleet reconcile pass failed")
                self._on_failure("reconcile")
            await self._sleep(self._interval_s)

    async def reconcile(self) -> None:
        """One pass: load the stored intent, apply it, send changed desired engines."""
        try:
            await self.intent.sync()
        except Exception as exc:  # Redis down: keep the last known intent applied
            if not self._load_failing:      # once per outage, not every pass
                kept = ("keeping the last one applied" if self._loaded_once else
                        "none loaded yet: no node is cordoned or drained until it loads")
                log.warning("cannot load operator intent (%s): %s", kept, exc)
            self._load_failing = True
            self._on_failure("load")
            self.intent.apply()
        else:
            if self._load_failing:
                log.warning("operator intent loaded" + (" again" if self._loaded_once else ""))
            self._load_failing = False
            self._loaded_once = True
        if not self._pushes:
            return
        for view in self.registry.nodes():
            if view.connected and view.status != "down":
                result = await self._push_if_changed(view)
                if result is not None:
                    self._note_push(view.info.name, result)

    def _note_push(self, node: str, result: types.CommandResult) -> None:
        if result.ok:
            self._push_errors.pop(node, None)
            return
        self._on_failure("push")
        if self._push_errors.get(node) != result.error:  # once per new error, not per pass
            log.warning("desired engines of node %s not applied: %s", node, result.error)
            self._push_errors[node] = result.error

    async def _push_if_changed(self, view: types.NodeView) -> types.CommandResult | None:
        """Send the node's desired engines unless its latest push holds them and has not
        failed; None when a push of them is in flight (its sender takes the answer)."""
        name = view.info.name
        desired = self.intent.get(name).desired
        encoded = json.dumps(desired, sort_keys=True)
        last = self._last_push.get(name)
        if last is None and not desired:
            return types.CommandResult(True)
        if last is not None and last.holds(view.info, encoded):
            if not last.answer.done():
                return None
            if last.confirmed():
                return types.CommandResult(True)
        return await self._start_push(view, desired, encoded)

    async def _push_since(self, view: types.NodeView, since: int,
                          retry: tuple[str, ...] = ()) -> types.CommandResult:
        """Send the node's desired engines, or take the answer of a push of the same state
        (naming ``retry`` too) started after push number ``since`` (the caller wrote that
        state meanwhile)."""
        name = view.info.name
        desired = self.intent.get(name).desired
        encoded = json.dumps(desired, sort_keys=True)
        last = self._last_push.get(name)
        if last is not None and last.number > since and last.holds(view.info, encoded) \
                and last.retry.issuperset(retry):
            return await asyncio.shield(last.answer)
        return await self._start_push(view, desired, encoded, retry)

    async def _start_push(self, view: types.NodeView, desired: Mapping[str, Spec],
                          encoded: str, retry: tuple[str, ...] = ()) -> types.CommandResult:
        """Send one push, remembered before its answer; a caller cancelled meanwhile
        leaves the answer to come for the others who wait on it."""
        name = view.info.name
        command = types.Command("desired_backends", backends=tuple(desired.values()),
                                retry=retry)
        self._push_count += 1
        answer = asyncio.get_running_loop().create_task(
            self.registry.send_command(name, command))
        self._last_push[name] = _Push(view.info, encoded, self._push_count, answer,
                                      frozenset(retry))
        return await asyncio.shield(answer)

    # -- nodes --------------------------------------------------------------------------

    def node(self, name: str) -> types.NodeView:
        view = self.registry.node(name)
        if view is None:
            raise errors.NotFound(f"node {name!r} not found (synapsectl get nodes lists them)",
                                  param="name", code="node_not_found")
        return view

    def in_flight(self, name: str) -> int:
        return node_in_flight(self.node(name), self._ledger)

    async def cordon(self, name: str, reason: str) -> None:
        await self.intent.set_fields(name, cordoned=True, reason=reason)

    async def uncordon(self, name: str) -> None:
        change = await self.intent.set_fields(name, cordoned=False, draining=False, reason="")
        view = self.registry.node(name)
        if not (change.before.draining and view is not None and view.connected):
            return
        result = await self.registry.send_command(name, types.Command("undrain"))
        if not result.ok:
            log.warning("undrain of %s not acknowledged: %s", name, result.error)
        # The agent reports its engines ready again on its next report; show that.
        deadline = self._clock() + UNDRAIN_WAIT_S
        while self._clock() < deadline:
            current = self.registry.node(name)
            if current is None or current.status != "draining":
                break
            await self._sleep(0.1)

    async def drain(self, name: str, grace_s: float, wait: bool,
                    timeout_s: float) -> DrainResult:
        view = self.node(name)
        await self.intent.set_fields(name, draining=True)
        if view.connected:
            result = await self.registry.send_command(
                name, types.Command("drain", grace_seconds=grace_s))
            if not result.ok:
                log.warning("drain of %s not acknowledged: %s", name, result.error)
        in_flight = self.in_flight(name)
        if wait:
            deadline = self._clock() + (timeout_s or DRAIN_TIMEOUT_S)
            while in_flight and self._clock() < deadline:
                await self._sleep(DRAIN_POLL_S)
                in_flight = self.in_flight(name)
        return DrainResult(self.node(name), in_flight == 0, in_flight)

    # -- engines ------------------------------------------------------------------------

    def deploying(self) -> set[str]:
        """Models with an engine in some node's desired set."""
        return {str(s.get("model")) for i in self.intent.intents.values()
                for s in i.desired.values() if s.get("model")}

    async def deploy(self, req: DeployRequest) -> list[Placement]:
        if not req.need.bytes and req.model in self._model_memory:
            need = self._model_memory[req.model]   # models[].memory_required_gb
            req = dataclasses.replace(req, need=dataclasses.replace(req.need, bytes=need),
                                      spec={**req.spec, "memoryRequiredBytes": str(need)})
        return [await self._deploy_on(node, req) for node in self._choose_nodes(req)]

    def _choose_nodes(self, req: DeployRequest) -> list[str]:
        if req.nodes:
            for name in req.nodes:
                if self.node(name).status == "down":
                    raise errors.Conflict(f"node {name!r} is down", param="nodes")
            return list(dict.fromkeys(req.nodes))
        if not req.need.bytes:
            raise errors.BadRequest(
                "memory_required_bytes is needed to place the model by free VRAM (or name "
                "--node explicitly, or set models[].memory_required_gb)",
                param="memory_required_bytes")
        capacity = [self._capacity_of(v, self.intent.get(v.info.name).desired)
                    for v in self.registry.nodes()]
        result = placement.place(capacity, req.need, max(1, req.replicas))
        if not result.nodes:
            raise errors.Conflict(f"cannot place {req.model}: {result.refusal}",
                                  code="no_node_fits")
        return list(result.nodes)

    def _placed(self, node: str, req: DeployRequest, others: Mapping[str, Spec]) -> Spec:
        """The request's spec with GPUs, memory fraction and port chosen on ``node``."""
        spec = dict(req.spec)
        view = self.registry.node(node)
        if view is None:
            return spec
        try:
            plan = placement.plan(self._capacity_of(view, others), req.need)
        except placement.NoFit as exc:
            raise errors.Conflict(f"cannot place {req.model} on {node}: {exc}",
                                  param="nodes", code="no_node_fits") from None
        if plan.gpu_indices:
            spec["gpuIndices"] = list(plan.gpu_indices)
        if plan.port:
            spec["port"] = plan.port
        if plan.gpu_memory_utilization:
            spec["gpuMemoryUtilization"] = plan.gpu_memory_utilization
        return spec

    async def _deploy_on(self, node: str, req: DeployRequest) -> Placement:
        name = req.backend

        def change(i: intent_mod.NodeIntent) -> intent_mod.NodeIntent:
            existing = i.desired.get(name)
            asked = req.spec.get("gpuMemoryUtilization")
            if existing is not None and _unplaced(existing) == _unplaced(req.spec) and \
                    asked in (None, existing.get("gpuMemoryUtilization")):
                return i
            others = {k: v for k, v in i.desired.items() if k != name}
            return dataclasses.replace(i, desired={**others, name: self._placed(node, req,
                                                                                 others)})

        since = self._push_count
        done = await self.intent.update(node, change)
        before, after = done.before.desired.get(name), done.after.desired[name]
        # Named again unchanged: retried at once if it crash-loops (a changed spec is a
        # new engine at the agent, started afresh anyway).
        again = before == after
        result = await self._send(node, "already deployed" if again else "deployed", since,
                                  (name,) if again else ())
        if result.refusal is not None and _refused(result.refusal, name):
            await self._roll_back(node, name, written=after, previous=before)
            raise errors.Conflict(f"node {node!r} refused the plan for {name}: "
                                  f"{result.refusal}", param="nodes", code="plan_refused")
        return Placement(node, name, result.reason)

    async def _roll_back(self, node: str, name: str, written: Spec,
                         previous: Spec | None) -> None:
        def change(i: intent_mod.NodeIntent) -> intent_mod.NodeIntent:
            if i.desired.get(name) != written:
                return i   # changed again since: not ours to undo
            desired = {k: v for k, v in i.desired.items() if k != name}
            if previous is not None:
                desired[name] = previous
            return dataclasses.replace(i, desired=desired)

        since = self._push_count
        await self.intent.update(node, change)
        view = self.registry.node(node)
        if previous is not None and view is not None and view.connected:
            self._note_push(node, await self._push_since(view, since))

    async def undeploy(self, model: str, canonical: str,
                       nodes: tuple[str, ...] = ()) -> list[Placement]:
        await self.intent.refresh()
        removed: list[Placement] = []
        for node in nodes or tuple(self.intent.intents):
            since = self._push_count
            done = await self.intent.update(node, lambda i: dataclasses.replace(i, desired={
                n: s for n, s in i.desired.items() if s.get("model") not in (model, canonical)}))
            gone = [n for n in done.before.desired if n not in done.after.desired]
            if gone:
                reason = (await self._send(node, "removed", since)).reason
                removed += [Placement(node, n, reason) for n in gone]
        if not removed:
            raise errors.NotFound(f"model {model!r} has no engines deployed through the "
                                  "control plane (engines from an agent's own config are "
                                  "not affected)", param="model")
        return removed

    async def _send(self, node: str, reason: str, since: int,
                    retry: tuple[str, ...] = ()) -> _Sent:
        """Tell the node the desired engines the caller wrote after push number ``since``
        (``retry``: the engines it named again)."""
        view = self.registry.node(node)
        if view is None or not view.connected:
            return _Sent(f"{reason}; will be sent when the node connects")
        result = await self._push_since(view, since, retry)
        if result.ok:
            return _Sent(reason)
        return _Sent(f"{reason}; agent did not confirm: {result.error}", result.error)


@dataclasses.dataclass(frozen=True, slots=True)
class _Push:
    """One ``desired_backends`` command sent to a node, remembered from when it was sent."""

    info: types.NodeInfo        # the agent's registration it went to (a new one each Register)
    desired: str                # the desired engines sent, as sorted JSON
    number: int                 # the service's count of pushes when it was started
    answer: asyncio.Task[types.CommandResult]
    retry: frozenset[str]       # the engines it asked the agent to retry at once

    def holds(self, info: types.NodeInfo, desired: str) -> bool:
        return self.info is info and self.desired == desired

    def confirmed(self) -> bool:
        """Answered, and the agent applied it."""
        return (self.answer.done() and not self.answer.cancelled()
                and self.answer.exception() is None and self.answer.result().ok)


@dataclasses.dataclass(frozen=True, slots=True)
class _Sent:
    reason: str
    refusal: str | None = None       # the agent's error when it did not confirm
