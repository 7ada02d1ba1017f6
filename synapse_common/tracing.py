"""OpenTelemetry tracing for every Synapse process: off by default, close to free when off.

Configuration is the ``tracing:`` section (:class:`TracingSettings`) plus the standard
``OTEL_*`` variables, which the OpenTelemetry SDK reads itself:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (when
``tracing.endpoint`` is unset), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_INSECURE``,
``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*`` (the batch
processor); ``OTEL_SERVICE_NAME`` names the service when ``tracing.service_name`` does not;
``OTEL_TRACES_SAMPLER`` (and ``_ARG``), when set, replaces ``tracing.sampling_ratio``;
``OTEL_SDK_DISABLED=true`` turns tracing off whatever the section says. Spans go to an
OTLP/gRPC endpoint through the SDK's batch processor (a background thread). The packages
are the ``otel`` extra (``pip install 'synapse-fabric[otel]'``); ``tracing.enabled``
without them is a configuration error that says so.

Design decisions:

* **One process-wide handle, no global provider.** :func:`setup` returns a
  :class:`Tracing` (or None when off) that the process passes down; the SDK's global
  tracer provider is never set, so two processes' worth of tracing can live in one test.
* **The request's trace travels in a context variable** (:data:`_current`), set by the
  server side (:meth:`Tracing.begin`) for the request's task and inherited by tasks it
  starts. Code that adds spans — the control plane's core included — calls the module
  functions (:func:`span`, :func:`start`, :func:`inject`, :func:`grpc_metadata`) and needs
  no tracer of its own. With tracing off, or for a request that was not sampled, they
  cost one context-variable read: :func:`span` hands back a shared no-op context manager
  and :func:`start` returns None.
* **W3C trace context in, W3C trace context out.** A client's ``traceparent`` (and
  ``tracestate``) is the parent of the request's root span; what goes to an engine or an
  agent names the span that made the call. With tracing off, a valid client
  ``traceparent`` is forwarded unchanged (:func:`forward`), as any proxy that passes
  headers would; an unsampled request forwards its root's context with the sampled flag
  clear, so the engine does not record either.
* **The process decides what it records, not its caller.** The control plane's callers
  are tenants: a sampled flag in their ``traceparent`` would let any of them decide how
  many traces the operator pays for, so ``sampling_ratio`` applies to every request, drawn
  at random (not by the caller-chosen trace id), unless ``honour_client_sampling``. The
  agent's caller is the authenticated control plane, which decided: it honours the flag.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import pydantic

from synapse_common.settings import Section

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span as Span  # re-exported for annotations
    from opentelemetry.trace import Tracer

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# W3C trace-context level 1: version-traceid-parentid-flags, lower-case hex; version ff
# and all-zero ids are invalid.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}"
                          r"-[0-9a-f]{2}")
_TRACESTATE_MAX = 512
_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()

Attributes = Mapping[str, str | bool | int | float]


class TracingSettings(Section):
    enabled: bool = pydantic.Field(
        False, description="export traces over OTLP/gRPC (needs the otel extra); "
        "OTEL_SDK_DISABLED=true turns it off")
    sampling_ratio: float = pydantic.Field(
        1.0, ge=0.0, le=1.0, description="share of requests recorded, a client's "
        "traceparent or not (unless honour_client_sampling); OTEL_TRACES_SAMPLER, when set, "
        "replaces it")
    honour_client_sampling: bool = pydantic.Field(
        False, description="a caller's traceparent decides whether its request is recorded "
        "(its sampled flag), whatever sampling_ratio says; off, any caller (a tenant) could "
        "decide how many traces the operator pays for. The agent always honours it (its "
        "caller is the authenticated control plane, which decided)")
    endpoint: str | None = pydantic.Field(
        None, description="OTLP/gRPC endpoint, e.g. http://otel-collector:4317; none = "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT, else "
        "http://localhost:4317")
    service_name: str | None = pydantic.Field(
        None, description="service.name of the spans; none = OTEL_SERVICE_NAME, else "
        "synapse-controlplane / synapse-agent")


class TracingUnavailable(ValueError):
    """``tracing.enabled`` without the OpenTelemetry packages."""


@dataclasses.dataclass(slots=True)
class _Request:
    """The current request's trace: a tracer when recorded, else headers to forward.
    ``done`` once the request ended: a task started during the request and outliving it
    (a cache writer's loop) inherits this object and must stop adding to the trace."""

    tracer: Tracer | None
    forward: dict[str, str]
    done: bool = False


_current: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "synapse_trace", default=None)


@dataclasses.dataclass(slots=True)
class Scope:
    """A request's server-side trace, from :meth:`Tracing.begin` (or :func:`forward`)
    to :meth:`end`; ``span`` is None when nothing is recorded."""

    span: Span | None
    _request: _Request
    _token: contextvars.Token[_Request | None]
    _attached: object = None

    @property
    def trace_id(self) -> str:
        """The recorded trace's id in hex ("" when not recorded)."""
        return format(self.span.get_span_context().trace_id, "032x") if self.span else ""

    def end(self, attributes: Attributes | None = None, error: str | None = None) -> None:
        """Close the root span (with ``attributes``; ``error`` marks it failed) and leave
        the request's context. Call once, in the task that began it."""
        self._request.done = True
        try:
            if self.span is not None:
                if attributes:
                    self.span.set_attributes(attributes)
                if error is not None:
                    _set_error(self.span, error)
                self.span.end()
        finally:
            if self._attached is not None:
                from opentelemetry import context as otel_context
                otel_context.detach(self._attached)  # type: ignore[arg-type]
            _current.reset(self._token)


class Tracing:
    """A process's tracer provider and tracer (built by :func:`setup`)."""

    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self.provider = provider
        self.tracer = tracer

    def begin(self, name: str, carrier: Mapping[str, str],
              attributes: Attributes | None = None) -> Scope:
        """A server span for one incoming request, child of the W3C context in
        ``carrier`` (HTTP headers or gRPC metadata), made current for this task."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        parent = _extract(carrier)
        root = self.tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                      attributes=attributes)
        here = trace.set_span_in_context(root, parent)
        if not root.is_recording():
            forward: dict[str, str] = {}
            _propagator().inject(forward, context=here)
            return _scope(None, _Request(None, forward))
        attached = otel_context.attach(here)
        return _scope(root, _Request(self.tracer, {}), attached)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export what is buffered now (blocking: call it in a thread from async code)."""
        return bool(self.provider.force_flush(int(timeout_s * 1000)))

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking)."""
        self.provider.shutdown()


def setup(settings: TracingSettings, default_service: str, instance: str = "",
          environ: Mapping[str, str] | None = None, *,
          trusted_callers: bool = False) -> Tracing | None:
    """The process's tracing, or None when off; raises :class:`TracingUnavailable`
    (naming ``tracing.enabled``) when the packages are missing. ``trusted_callers``: a
    caller's sampled flag decides for its request (see ``honour_client_sampling``)."""
    env = os.environ if environ is None else environ
    if not settings.enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing.enabled: the OpenTelemetry packages are not installed ({exc.name}); "
            "pip install 'synapse-fabric[otel]'") from None
    attributes: dict[str, str] = {
        "service.name": settings.service_name or env.get("OTEL_SERVICE_NAME") or default_service}
    if instance:
        attributes["service.instance.id"] = instance
    if env.get("OTEL_TRACES_SAMPLER"):
        sampler = None                  # the SDK builds the one the variables name
    elif settings.honour_client_sampling or trusted_callers:
        sampler = ParentBased(TraceIdRatioBased(settings.sampling_ratio))
    else:
        ratio = _random_ratio(settings.sampling_ratio)
        sampler = ParentBased(ratio, remote_parent_sampled=ratio,
                              remote_parent_not_sampled=ratio)
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint)))
    return Tracing(provider, provider.get_tracer("synapse"))


def _random_ratio(ratio: float) -> Any:
    """A sampler recording ``ratio`` of the requests it is asked about, drawn at random:
    the SDK's ``TraceIdRatioBased`` decides by the trace id, which a caller's
    ``traceparent`` chooses (ids below its bound would always be recorded)."""
    import random

    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import get_current_span

    class RandomRatio(Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: Any = None, attributes: Any = None, links: Any = None,
                          trace_state: Any = None) -> SamplingResult:
            keep = ratio >= 1.0 or random.random() < ratio
            parent = get_current_span(parent_context).get_span_context()
            state = parent.trace_state if parent.is_valid else None  # the caller's, kept
            return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP,
                                  attributes if keep else None, state)

        def get_description(self) -> str:
            return f"RandomRatio{{{ratio}}}"

    return RandomRatio()


def forward(carrier: Mapping[str, str]) -> Scope | None:
    """With tracing off: make a client's valid ``traceparent`` (and ``tracestate``) the
    headers :func:`inject` adds for this request; None (nothing to undo) without one."""
    parent = carrier.get(TRACEPARENT)
    if parent is None or not _TRACEPARENT.fullmatch(parent):
        return None
    headers = {TRACEPARENT: parent}
    state = carrier.get(TRACESTATE)
    if state and len(state) <= _TRACESTATE_MAX and state.isprintable():
        headers[TRACESTATE] = state
    return _scope(None, _Request(None, headers))


def _scope(root: Span | None, request: _Request, attached: object = None) -> Scope:
    return Scope(root, request, _current.set(request), attached)


# -- for code on the request's path ------------------------------------------------------


def span(name: str, attributes: Attributes | None = None
         ) -> contextlib.AbstractContextManager[Span | None]:
    """``with span("auth") as s:`` — a child of the current span, current inside the
    block (``s`` is None when the request is not recorded). Exceptions raised in the
    block are recorded on it and mark it failed."""
    current = _current.get()
    if current is None or current.tracer is None or current.done:
        return _NOOP
    return current.tracer.start_as_current_span(name, attributes=attributes)


def start(name: str, attributes: Attributes | None = None) -> Span | None:
    """A child of the current span that the caller ends (:func:`finish`); None when the
    request is not recorded. It is not made current: pass it to :func:`inject`."""
    current = _current.get()
    if current is None or current.tracer is None or current.done:
        return None
    from opentelemetry import trace
    return current.tracer.start_span(name, attributes=attributes,
                                     kind=trace.SpanKind.CLIENT)


def finish(span_: Span | None, attributes: Attributes | None = None,
           error: str | None = None) -> None:
    """End a span from :func:`start` (no-op for None); ``error`` marks it failed."""
    if span_ is None:
        return
    if attributes:
        span_.set_attributes(attributes)
    if error is not None:
        _set_error(span_, error)
    span_.end()


def event(span_: Span | None, name: str, attributes: Attributes | None = None) -> None:
    if span_ is not None:
        span_.add_event(name, attributes=attributes)


def inject(headers: MutableMapping[str, str], span_: Span | None = None) -> None:
    """Add the W3C headers for an outgoing call made by ``span_`` (else the current span)
    — or, for a request not recorded, the headers it forwards. Nothing outside a request."""
    current = _current.get()
    if current is None or current.done:
        return
    if current.tracer is None:
        headers.update(current.forward)
        return
    from opentelemetry import trace
    context = trace.set_span_in_context(span_) if span_ is not None else None
    _propagator().inject(headers, context=context)


def grpc_metadata() -> tuple[tuple[str, str], ...]:
    """:func:`inject`'s headers as gRPC call metadata (empty outside a traced request)."""
    if _current.get() is None:
        return ()
    headers: dict[str, str] = {}
    inject(headers)
    return tuple(headers.items())


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Run a block outside the current request's trace (work done on behalf of many)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


# -- helpers -------------------------------------------------------------------------------


@functools.cache
def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator()


def _extract(carrier: Mapping[str, str]) -> Context | None:
    if TRACEPARENT not in carrier:
        return None
    context: Context = _propagator().extract(carrier)
    return context


def _set_error(span_: Span, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode
    span_.set_status(Status(StatusCode.ERROR, message))
