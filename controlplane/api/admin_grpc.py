"""The ``Admin`` gRPC service: nodes, cordon/drain, models, deploy, cache, stats, explain.

Every call needs the admin key as ``authorization: Bearer <key>`` metadata (checked by
the same tenant table as the HTTP admin routes), checked on the call's headers before any
of its message is read (:func:`_guarded`): a caller without the key is answered at once
and cannot make the control plane hold a request it sends slowly or never finishes. Errors are our one hierarchy
(:mod:`controlplane.errors`) mapped to status codes by ``grpc_server.abort``.

This module only validates requests and converts protos to core calls and back: what
cordon, drain, deploy and undeploy do — durable intent, placement, the reconcile loop —
is :class:`controlplane.core.fleet.FleetService` (``svc.fleet``, started by the app).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import orjson

from controlplane import errors
from controlplane.api import admin_views as views
from controlplane.api import fairness, fleet_stats, grpc_server
from controlplane.api import services as services_mod
from controlplane.core import fleet, placement, tenants
from controlplane.core import router as router_mod
from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, common_pb2

log = logging.getLogger("synapse.controlplane.admin")
MAX_NAME = 253
MAX_PROMPT_CHARS = 1_000_000
ENGINE_NAMES = {common_pb2.ENGINE_KIND_VLLM: "vllm", common_pb2.ENGINE_KIND_TEI: "tei",
                common_pb2.ENGINE_KIND_SIMULATOR: "simulator",
                common_pb2.ENGINE_KIND_EXTERNAL: "external"}
TP_FLAGS = ("--tensor-parallel-size", "-tp")
R = TypeVar("R")


def _admin_call(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Run, and turn our errors into gRPC status codes (the caller presented the admin
    key already: :func:`_guarded`)."""
    @functools.wraps(method)
    async def wrapper(self: AdminServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
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
    return _printable(value, field)


def _printable(value: str, field: str) -> str:
    """``value`` unless it holds a control character (a newline, NUL…): names and engine
    arguments end up in engine command lines, agents' logs and synapsectl's tables, where
    one would break a line or the engine's start (paths and spaces stay allowed)."""
    if not value.isprintable():
        raise errors.BadRequest(f"{field} holds a control character", param=field)
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")[:48] or "model"


def tensor_parallel_size(extra_args: Sequence[str]) -> int:
    """vLLM's ``--tensor-parallel-size N`` (``-tp N``, ``--tensor-parallel-size=N``) among
    the engine's arguments: the number of GPUs placement gives the engine (1 without)."""
    size = "1"
    for i, arg in enumerate(extra_args):
        flag, eq, value = arg.partition("=")
        if flag in TP_FLAGS:
            size = value if eq else (extra_args[i + 1] if i + 1 < len(extra_args) else "")
    if not size.isdigit() or not 1 <= int(size) <= 64:
        raise errors.BadRequest(f"--tensor-parallel-size must be a whole number of GPUs "
                                f"(got {size!r})", param="extra_args")
    return int(size)


def deploy_request(request: admin_pb2.DeployModelRequest) -> fleet.DeployRequest:
    """Validate ``DeployModel`` and convert it to the core request."""
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
    for name in request.served_model_names:
        _check_name(name, "served_model_names")
    for arg in request.extra_args:
        _printable(arg, "extra_args")
    need = placement.Need(int(request.memory_required_bytes),
                          tensor_parallel_size(request.extra_args),
                          request.gpu_memory_utilization)
    spec = views.backend_spec(request, model, engine, f"{_slug(model)}-{engine}")
    return fleet.DeployRequest(model, spec, tuple(request.nodes), max(1, request.replicas),
                               need)


def _placements(items: Sequence[fleet.Placement]) -> list[admin_pb2.Placement]:
    return [admin_pb2.Placement(node=p.node, backend=p.backend, reason=p.reason)
            for p in items]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, svc: services_mod.Services) -> None:
        self.svc = svc
        self.fleet = svc.fleet

    # -- nodes --------------------------------------------------------------------------

    def _detail(self, name: str) -> admin_pb2.NodeDetail:
        return views.node_detail(self.fleet.node(name), self.svc.ledger)

    @_admin_call
    async def ListNodes(self, request: admin_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListNodesResponse:
        nodes = sorted(self.svc.registry.nodes(), key=lambda v: v.info.name)
        return admin_pb2.ListNodesResponse(
            nodes=[views.node_summary(v, self.svc.ledger) for v in nodes])

    @_admin_call
    async def GetNode(self, request: admin_pb2.GetNodeRequest,
                      context: grpc.aio.ServicerContext) -> admin_pb2.NodeDetail:
        return self._detail(_check_name(request.name, "name"))

    @_admin_call
    async def CordonNode(self, request: admin_pb2.CordonNodeRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.NodeDetail:
        _check_name(request.name, "name")
        _check_name(request.reason, "reason", required=False)
        await self.fleet.cordon(request.name, request.reason)
        return self._detail_or_intent(request.name)

    @_admin_call
    async def UncordonNode(self, request: admin_pb2.UncordonNodeRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.NodeDetail:
        await self.fleet.uncordon(_check_name(request.name, "name"))
        return self._detail_or_intent(request.name)

    def _detail_or_intent(self, name: str) -> admin_pb2.NodeDetail:
        if self.svc.registry.node(name) is not None:
            return self._detail(name)
        # Intent for a node that has not registered (yet): recorded, shown as such.
        i = self.fleet.intent.get(name)
        status = admin_pb2.NODE_STATUS_DRAINING if i.draining else admin_pb2.NODE_STATUS_CORDONED \
            if i.cordoned else admin_pb2.NODE_STATUS_DOWN
        return admin_pb2.NodeDetail(summary=admin_pb2.NodeSummary(
            name=name, status=status, cordoned=i.cordoned, draining=i.draining))

    @_admin_call
    async def DrainNode(self, request: admin_pb2.DrainNodeRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.DrainNodeResponse:
        self.fleet.node(_check_name(request.name, "name"))
        seconds = (request.timeout_seconds, request.grace_seconds)
        if not all(math.isfinite(s) and s >= 0 for s in seconds):
            raise errors.BadRequest("timeout_seconds and grace_seconds must be >= 0")
        result = await self.fleet.drain(request.name, request.grace_seconds, request.wait,
                                        request.timeout_seconds)
        return admin_pb2.DrainNodeResponse(
            node=views.node_detail(result.node, self.svc.ledger), drained=result.drained,
            in_flight=result.in_flight)

    # -- models -------------------------------------------------------------------------

    @_admin_call
    async def ListModels(self, request: admin_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListModelsResponse:
        return views.models(self.svc.catalog, self.svc.registry, self.fleet.deploying())

    @_admin_call
    async def DeployModel(self, request: admin_pb2.DeployModelRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.DeployModelResponse:
        placed = await self.fleet.deploy(deploy_request(request))
        return admin_pb2.DeployModelResponse(placements=_placements(placed))

    @_admin_call
    async def UndeployModel(self, request: admin_pb2.UndeployModelRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.UndeployModelResponse:
        model = _check_name(request.model, "model")
        nodes = tuple(_check_name(n, "nodes") for n in request.nodes)
        removed = await self.fleet.undeploy(model, self.svc.catalog.canonical(model), nodes)
        return admin_pb2.UndeployModelResponse(removed=_placements(removed))

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
        return views.stats(await fleet_stats.snapshot(self.svc))   # every replica (issue 19)

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
                                                 self._session(request))
        if request.tenant or request.cache_salt:
            tenant = self._tenant(request.tenant)
            prompt.partition(self.svc.salt_for(tenant, request.cache_salt), tenant)
        verdicts, reason = self.svc.router.explain(canonical, prompt)
        return views.explanation(canonical, self.svc.router.params.policy, prompt.tokens,
                                 verdicts, reason)

    def _session(self, request: admin_pb2.ExplainRouteRequest) -> str:
        """The router's key of the request's session: sessions are per tenant, so a
        session names its tenant too (implied when authentication is off)."""
        session = _check_name(request.session_id, "session_id", required=False)
        if not session:
            return ""
        tenant = request.tenant
        if not tenant and not self.svc.settings.auth.enabled:
            tenant = tenants.ANONYMOUS
        if not tenant:
            raise errors.BadRequest("session_id: sessions are per tenant; name the tenant "
                                    "whose session it is (tenant)", param="tenant")
        return router_mod.session_key(self._tenant(tenant), session)

    def _tenant(self, name: str) -> str:
        """A tenant of this control plane, named as in its config (``anonymous`` when
        authentication is off): its requests' prefix-cache partition is the tenant's."""
        _check_name(name, "tenant")
        known = {t.name for t in self.svc.tenants.tenants()}
        if not self.svc.settings.auth.enabled:
            known.add(tenants.ANONYMOUS)
        if name not in known:
            raise errors.NotFound(f"tenant {name!r} is not configured", param="tenant")
        return name

    @_admin_call
    async def GetUsage(self, request: admin_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.GetUsageResponse:
        _check_name(request.tenant, "tenant", required=False)
        return await fairness.usage_response(self.svc, request)


def _messages(request: admin_pb2.ExplainRouteRequest) -> list[dict[str, object]]:
    if len(request.prompt) + len(request.messages_json) > MAX_PROMPT_CHARS:
        raise errors.BadRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters",
                                param="prompt")
    if request.messages_json:
        try:    # orjson: nesting past its depth limit is a decode error, not a RecursionError
            messages = orjson.loads(request.messages_json)
        except orjson.JSONDecodeError as exc:
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


def _guarded(svc: services_mod.Services, handler: grpc.RpcMethodHandler
             ) -> grpc.RpcMethodHandler:
    """``handler`` (a unary method of the servicer) behind the admin key check, served as
    a request-streaming handler: gRPC calls it on the call's headers, so a call without
    the admin key is refused before any of its message is read (a unary handler is
    called only once the whole message arrived, however slowly its sender sends it, and
    holds it meanwhile). With the key, the one request message is read and ``handler``
    runs as before."""
    method = handler.unary_unary

    async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            svc.tenants.authenticate_admin(auth if isinstance(auth, str) else None)
        except errors.SynapseError as exc:
            await grpc_server.abort(context, exc)
        async for request in requests:
            return await method(request, context)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message was sent")
        raise AssertionError("unreachable: abort raises")
    return grpc.stream_unary_rpc_method_handler(
        guarded, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class _AdminGuard(grpc.GenericRpcHandler):  # type: ignore[misc]  # untyped in the stubs
    """The Admin service's method handlers, each behind the key check (:func:`_guarded`):
    the generated ``add_AdminServicer_to_server`` adds its handlers to this one, which the
    server is given instead."""

    def __init__(self, svc: services_mod.Services) -> None:
        self._svc = svc
        self._inner: list[grpc.GenericRpcHandler] = []
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}    # the service's methods only

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._inner.extend(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """The same handlers again, for a server's fast lookup by path: not passed on (the
        server would find the unguarded ones there before this guard)."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        guarded = self._guarded.get(details.method)
        if guarded is None:
            found = next((h for h in (g.service(details) for g in self._inner) if h), None)
            if found is None:
                return None
            guarded = self._guarded[details.method] = _guarded(self._svc, found)
        return guarded


def admin(svc: services_mod.Services) -> grpc_server.Registration:
    """The Admin service as a registration for ``grpc_server.start``: every method behind
    the admin key check (:func:`_guarded`)."""
    name = str(admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name)

    def register(server: grpc.aio.Server) -> str:
        guard = _AdminGuard(svc)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(svc), guard)  # type: ignore[no-untyped-call]
        server.add_generic_rpc_handlers((guard,))
        return name
    return register


__all__: Sequence[str] = ("AdminServicer", "admin", "deploy_request", "tensor_parallel_size")
