"""The ``Admin`` gRPC service: nodes, cordon/drain, models, deploy, cache, stats, explain.

Every call needs the admin key as ``authorization: Bearer <key>`` metadata (checked by
the same tenant table as the HTTP admin routes). Errors are our one hierarchy
(:mod:`controlplane.errors`) mapped to status codes by ``grpc_server.abort``.

Durable intent (cordons, drains, deployed engines) goes through
:class:`controlplane.core.intent.FleetIntent` (Redis when configured). A background sync
applies it to the registry every second and re-sends a node's desired engines when they
changed or the agent registered again — so another replica's ``DeployModel`` and a
restarted agent both converge without an operator repeating themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from controlplane import errors
from controlplane.adapters import intent_store, redis_limits
from controlplane.api import admin_views as views
from controlplane.api import grpc_server
from controlplane.api import services as services_mod
from controlplane.core import intent, placement, types
from controlplane.core import router as router_mod
from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, common_pb2

log = logging.getLogger("synapse.controlplane.admin")
SYNC_INTERVAL_S = 1.0
MAX_NAME = 253
MAX_PROMPT_CHARS = 1_000_000
ENGINE_NAMES = {common_pb2.ENGINE_KIND_VLLM: "vllm", common_pb2.ENGINE_KIND_TEI: "tei",
                common_pb2.ENGINE_KIND_SIMULATOR: "simulator",
                common_pb2.ENGINE_KIND_EXTERNAL: "external"}
R = TypeVar("R")


def _admin_call(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Authenticate, run, and turn our errors into gRPC status codes."""
    @functools.wraps(method)
    async def wrapper(self: AdminServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            auth = dict(context.invocation_metadata() or ()).get("authorization")
            self.svc.tenants.authenticate_admin(auth if isinstance(auth, str) else None)
            return await method(self, request, context)
        except errors.SynapseError as exc:
            await grpc_server.abort(context, exc)
        except Exception:
            log.exception("Admin.%s failed", method.__name__)
            await grpc_server.abort(context, errors.internal(f"{method.__name__} failed"))
        raise AssertionError("unreachable: abort raises")
    return wrapper


def _check_name(value: str, field: str, required: bool = True) -> str:
    if required and not value:
        raise errors.BadRequest(f"{field} is required", param=field)
    if len(value) > MAX_NAME:
        raise errors.BadRequest(f"{field} is longer than {MAX_NAME} characters", param=field)
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")[:48] or "model"


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, svc: services_mod.Services, fleet: intent.FleetIntent) -> None:
        self.svc = svc
        self.fleet = fleet
        self._sent: dict[str, tuple[object, str]] = {}   # node -> (NodeInfo, desired json)
        self._task: asyncio.Task[None] | None = None

    # -- background sync ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.sync_once()
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def sync_once(self) -> None:
        try:
            await self.fleet.sync()
        except Exception as exc:  # Redis down: keep the last known intent applied
            log.warning("cannot load operator intent: %s", exc)
            self.fleet.apply()
        for view in self.svc.registry.nodes():
            if view.connected and view.status != "down":
                await self._push_desired(view, only_if_changed=True)

    async def _push_desired(self, view: types.NodeView, only_if_changed: bool) -> types.CommandResult:
        name = view.info.name
        desired = self.fleet.get(name).desired
        encoded = json.dumps(desired, sort_keys=True)
        last = self._sent.get(name)
        if only_if_changed:
            unchanged = last is not None and last[0] is view.info and last[1] == encoded
            if unchanged or (last is None and not desired):
                return types.CommandResult(True)
        command = types.Command("desired_backends", backends=tuple(desired.values()))
        result = await self.svc.registry.send_command(name, command)
        if result.ok:
            self._sent[name] = (view.info, encoded)
        return result

    # -- nodes --------------------------------------------------------------------------

    def _view(self, name: str) -> types.NodeView:
        _check_name(name, "name")
        view = self.svc.registry.node(name)
        if view is None:
            raise errors.NotFound(f"node {name!r} not found (synapsectl get nodes lists them)",
                                  param="name", code="node_not_found")
        return view

    @_admin_call
    async def ListNodes(self, request: admin_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListNodesResponse:
        nodes = sorted(self.svc.registry.nodes(), key=lambda v: v.info.name)
        return admin_pb2.ListNodesResponse(
            nodes=[views.node_summary(v, self.svc.ledger) for v in nodes])

    @_admin_call
    async def GetNode(self, request: admin_pb2.GetNodeRequest,
                      context: grpc.aio.ServicerContext) -> admin_pb2.NodeDetail:
        return views.node_detail(self._view(request.name), self.svc.ledger)

    @_admin_call
    async def CordonNode(self, request: admin_pb2.CordonNodeRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.NodeDetail:
        _check_name(request.name, "name")
        _check_name(request.reason, "reason", required=False)
        await self._update(request.name, cordoned=True, reason=request.reason)
        return await self._detail_or_intent(request.name)

    @_admin_call
    async def UncordonNode(self, request: admin_pb2.UncordonNodeRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.NodeDetail:
        _check_name(request.name, "name")
        was_draining = self.fleet.get(request.name).draining
        await self._update(request.name, cordoned=False, draining=False, reason="")
        view = self.svc.registry.node(request.name)
        if was_draining and view is not None and view.connected:
            result = await self.svc.registry.send_command(request.name, types.Command("undrain"))
            if not result.ok:
                log.warning("undrain of %s not acknowledged: %s", request.name, result.error)
            # The agent reports its engines ready again on its next report; show that.
            for _ in range(30):
                current = self.svc.registry.node(request.name)
                if current is None or current.status != "draining":
                    break
                await asyncio.sleep(0.1)
        return await self._detail_or_intent(request.name)

    async def _update(self, name: str, **changes: Any) -> None:
        try:
            await self.fleet.update(name, **changes)
        except errors.SynapseError:
            raise
        except Exception as exc:
            raise errors.Unavailable(f"cannot store the change durably: {exc}",
                                     code="intent_store_unavailable") from None

    async def _detail_or_intent(self, name: str) -> admin_pb2.NodeDetail:
        view = self.svc.registry.node(name)
        if view is not None:
            return views.node_detail(view, self.svc.ledger)
        # Intent for a node that has not registered (yet): recorded, shown as such.
        i = self.fleet.get(name)
        status = admin_pb2.NODE_STATUS_DRAINING if i.draining else admin_pb2.NODE_STATUS_CORDONED \
            if i.cordoned else admin_pb2.NODE_STATUS_DOWN
        return admin_pb2.NodeDetail(summary=admin_pb2.NodeSummary(
            name=name, status=status, cordoned=i.cordoned, draining=i.draining))

    @_admin_call
    async def DrainNode(self, request: admin_pb2.DrainNodeRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.DrainNodeResponse:
        view = self._view(request.name)
        if request.timeout_seconds < 0 or request.grace_seconds < 0:
            raise errors.BadRequest("timeout_seconds and grace_seconds must be >= 0")
        await self._update(request.name, draining=True)
        if view.connected:
            result = await self.svc.registry.send_command(
                request.name, types.Command("drain", grace_seconds=request.grace_seconds))
            if not result.ok:
                log.warning("drain of %s not acknowledged: %s", request.name, result.error)
        in_flight = views.node_in_flight(self._view(request.name), self.svc.ledger)
        if request.wait:
            deadline = asyncio.get_running_loop().time() + (request.timeout_seconds or 60.0)
            while in_flight and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)
                in_flight = views.node_in_flight(self._view(request.name), self.svc.ledger)
        return admin_pb2.DrainNodeResponse(
            node=views.node_detail(self._view(request.name), self.svc.ledger),
            drained=in_flight == 0, in_flight=in_flight)

    # -- models -------------------------------------------------------------------------

    @_admin_call
    async def ListModels(self, request: admin_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListModelsResponse:
        return views.models(self.svc.catalog, self.svc.registry, self.fleet)

    def _memory_need(self, request: admin_pb2.DeployModelRequest, model: str) -> int:
        if request.memory_required_bytes:
            return int(request.memory_required_bytes)
        for m in self.svc.settings.models:
            if m.name == model and m.memory_required_gb:
                return int(m.memory_required_gb * 1024**3)
        raise errors.BadRequest(
            "memory_required_bytes is needed to place the model by free VRAM (or name "
            "--node explicitly, or set models[].memory_required_gb)",
            param="memory_required_bytes")

    def _choose_nodes(self, request: admin_pb2.DeployModelRequest, model: str) -> list[str]:
        if request.nodes:
            for name in request.nodes:
                view = self._view(name)
                if view.status == "down":
                    raise errors.Conflict(f"node {name!r} is down", param="nodes")
            return list(dict.fromkeys(request.nodes))
        need = self._memory_need(request, model)
        capacity = [views.capacity(v, self.fleet.get(v.info.name).desired)
                    for v in self.svc.registry.nodes()]
        result = placement.place(capacity, need, max(1, request.replicas))
        if not result.nodes:
            raise errors.Conflict(f"cannot place {model}: {result.refusal}",
                                  code="no_node_fits")
        return list(result.nodes)

    @_admin_call
    async def DeployModel(self, request: admin_pb2.DeployModelRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.DeployModelResponse:
        model = _check_name(request.model, "model")
        engine = ENGINE_NAMES.get(request.engine)
        if engine is None:
            raise errors.BadRequest("engine is required (vllm, tei, simulator or external)",
                                    param="engine")
        if engine == "external":
            raise errors.BadRequest("external engines are configured on the agent, not "
                                    "deployed", param="engine")
        if not 0 <= request.gpu_memory_utilization <= 1:
            raise errors.BadRequest("gpu_memory_utilization must be within 0..1",
                                    param="gpu_memory_utilization")
        placements = []
        for node in self._choose_nodes(request, model):
            spec = views.backend_spec(request, model, engine, f"{_slug(model)}-{engine}")
            desired = dict(self.fleet.get(node).desired)
            reason = "already deployed" if desired.get(spec["name"]) == spec else "deployed"
            desired[spec["name"]] = spec
            await self._update(node, desired=desired)
            reason = await self._send(node, reason)
            placements.append(admin_pb2.Placement(node=node, backend=spec["name"], reason=reason))
        return admin_pb2.DeployModelResponse(placements=placements)

    async def _send(self, node: str, reason: str) -> str:
        view = self.svc.registry.node(node)
        if view is None or not view.connected:
            return f"{reason}; will be sent when the node connects"
        result = await self._push_desired(view, only_if_changed=False)
        return reason if result.ok else f"{reason}; agent did not confirm: {result.error}"

    @_admin_call
    async def UndeployModel(self, request: admin_pb2.UndeployModelRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.UndeployModelResponse:
        model = _check_name(request.model, "model")
        canonical = self.svc.catalog.canonical(model)
        await self.fleet.refresh()
        nodes = list(request.nodes) or list(self.fleet.intents)
        removed = []
        for node in nodes:
            _check_name(node, "nodes")
            desired = dict(self.fleet.get(node).desired)
            gone = [n for n, s in desired.items() if s.get("model") in (model, canonical)]
            if not gone:
                continue
            for name in gone:
                del desired[name]
            await self._update(node, desired=desired)
            reason = await self._send(node, "removed")
            removed += [admin_pb2.Placement(node=node, backend=n, reason=reason) for n in gone]
        if not removed:
            raise errors.NotFound(f"model {model!r} has no engines deployed through the "
                                  "control plane (engines from an agent's own config are "
                                  "not affected)", param="model")
        return admin_pb2.UndeployModelResponse(removed=removed)

    # -- cache, stats, explain ----------------------------------------------------------

    @_admin_call
    async def InvalidateCache(self, request: admin_pb2.InvalidateCacheRequest,
                              context: grpc.aio.ServicerContext,
                              ) -> admin_pb2.InvalidateCacheResponse:
        target = request.WhichOneof("target")
        if target == "tenant":
            exact, semantic = await self.svc.cache.invalidate(
                tenant=_check_name(request.tenant, "tenant"))
        elif target == "model":
            model = self.svc.catalog.canonical(_check_name(request.model, "model"))
            exact, semantic = await self.svc.cache.invalidate(model=model)
        elif target == "all" and request.all:
            exact, semantic = await self.svc.cache.invalidate(everything=True)
        else:
            raise errors.BadRequest("say what to invalidate: tenant, model or all",
                                    param="target")
        return admin_pb2.InvalidateCacheResponse(exact_entries_removed=exact,
                                                 semantic_entries_removed=semantic)

    @_admin_call
    async def GetStats(self, request: admin_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.Stats:
        return views.stats(self.svc.stats.snapshot(), self.svc.registry)

    @_admin_call
    async def ExplainRoute(self, request: admin_pb2.ExplainRouteRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ExplainRouteResponse:
        model = _check_name(request.model, "model")
        canonical = self.svc.catalog.canonical(model)
        if not self.svc.catalog.is_configured(model) and \
                canonical not in self.svc.registry.served_models():
            raise errors.NotFound(f"model {model!r} is not known (synapsectl get models)",
                                  param="model")
        messages = _messages(request)
        prompt = router_mod.Prompt.from_messages(messages, request.max_tokens,
                                                 _check_name(request.session_id, "session_id",
                                                             required=False))
        verdicts, reason = self.svc.router.explain(canonical, prompt)
        return views.explanation(canonical, self.svc.router.params.policy, prompt.tokens,
                                 verdicts, reason)


def _messages(request: admin_pb2.ExplainRouteRequest) -> list[dict[str, object]]:
    if len(request.prompt) + len(request.messages_json) > MAX_PROMPT_CHARS:
        raise errors.BadRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters",
                                param="prompt")
    if request.messages_json:
        try:
            messages = json.loads(request.messages_json)
        except ValueError as exc:
            raise errors.BadRequest(f"messages_json is not JSON: {exc}",
                                    param="messages_json") from None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise errors.BadRequest("messages_json must be a list of {role, content} objects",
                                    param="messages_json")
        return messages
    if not request.prompt:
        raise errors.BadRequest("prompt or messages_json is required", param="prompt")
    return [{"role": "user", "content": request.prompt}]


def build_fleet(svc: services_mod.Services) -> intent.FleetIntent:
    url = svc.settings.redis.url
    store: intent.IntentStore = (intent_store.RedisIntentStore(
        redis_limits.connect(url.get_secret_value())) if url else intent.MemoryIntentStore())
    return intent.FleetIntent(store, svc.registry)


def admin(svc: services_mod.Services,
          fleet: intent.FleetIntent | None = None) -> grpc_server.Registration:
    """The Admin service as a registration for ``grpc_server.start``."""
    def register(server: grpc.aio.Server) -> str:
        servicer = AdminServicer(svc, fleet or build_fleet(svc))
        admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        servicer.start()
        svc.extra["admin"] = servicer
        return str(admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name)
    return register


__all__: Sequence[str] = ("AdminServicer", "admin", "build_fleet")
