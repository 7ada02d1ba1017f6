"""What an agent says on ``ControlPlane.Connect``, read as a registrant that may lie.

Protos become core value objects here and nowhere deeper, defensively:

* a ``Register`` is refused (:func:`register_problem`, ``INVALID_ARGUMENT``) when its node
  name is not a plain host name (it names metrics, logs and the registry), when its
  Node-service address is not ``host:port`` (no gRPC scheme such as ``dns:``), when it
  lists more than :data:`MAX_ITEMS` embed models or labels, or when it is over
  :data:`MAX_MESSAGE_BYTES`; the agent's version and labels are cut to
  :data:`MAX_TEXT` printable characters (they reach operators' terminals and log lines);
* a ``Report``'s shares and rates are clamped to [0, 1] (a NaN counts as the worst case)
  and its counts to sane bounds, and GPU readings that are not finite numbers are
  dropped, so no report wins a routing or placement comparison by being nonsense; a
  backend's context length outside 1..:data:`MAX_MODEL_LEN` is unknown (``GET
  /v1/models`` shows it to clients);
* a ``Report`` naming more than :data:`MAX_BACKENDS` backends, or a backend with more than
  :data:`MAX_MODELS` models, is refused (:func:`report_problem`: the stream ends
  ``INVALID_ARGUMENT``): an agent runs a handful of engines, and each backend a report
  names is routed to, probed and scraped, each on connections of its own;
* a backend whose name is not a node name's shape, or with a model name that is empty,
  over :data:`MAX_MODEL_NAME` characters or holds control characters (line breaks, tabs,
  escapes, direction marks), is left out of its report (:func:`backend_problem`): its
  name goes into metrics labels, log lines and the ``x-synapse-backend`` header, and its
  models into the set of served names;
* the keys a node gets (:class:`Keys`): the ones its agent chose and sent
  (``Register.engine_key``, ``node_key``), else ``fallback``, which the caller decides
  from the credential (nothing a credential did not already give);
* the certificate a node's Node service serves (``Register.node_certificate``, made by
  its agent at start, :mod:`agent.node_certificate`): refused when it is over
  :data:`MAX_CERTIFICATE_BYTES`, is not exactly one PEM X.509 certificate, or names no
  DNS name; kept re-encoded (nothing around the PEM block travels on) with the first DNS
  name it carries, which Node calls to that node check (:class:`types.NodePin`);
* :func:`as_decided`: the ``Register`` a pod's primary copies to its serving workers,
  carrying the keys and the certificate the primary decided, so that a worker applies no
  fallback of its own and pins what the primary pinned.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.core import node_models, types, upstream_kinds
from protos import enums
from protos.synapse.v1 import common_pb2, controlplane_pb2

MAX_MESSAGE_BYTES = 1024 * 1024    # a real report is a few KB per backend
MAX_KV_TOKENS = 1 << 40             # more KV cache than any machine holds
MAX_SEQS = 1 << 20
MAX_MODEL_LEN = 2**31 - 1           # a context length past it is read as unknown
MAX_ITEMS = 64                      # embed models, labels
MAX_TEXT = 128                      # characters of a version or a label
MAX_CERTIFICATE_BYTES = 8 * 1024    # an agent's EC certificate is under 1 KB of PEM
MAX_BACKENDS = 64                   # backends in one report (an agent runs a handful)
MAX_MODELS = 64                     # models one backend serves (its served-model-names)
MAX_MODEL_NAME = node_models.MAX_MODEL_NAME     # characters of a model name
NODE_NAME = node_models.NODE_NAME
_HOST_PORT = re.compile(r"[A-Za-z0-9._:\[\]-]+:[0-9]{1,5}")    # an IPv6 host with or without []
GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock"})
_MODEL_NAME = node_models.MODEL_NAME
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]|[\u2028\u2029\u200b-\u200f\u202a-\u202e]")


@dataclasses.dataclass(frozen=True)
class Keys:
    engine: str | None = dataclasses.field(repr=False)
    node: str | None = dataclasses.field(repr=False)


def register_problem(message: controlplane_pb2.AgentMessage) -> str | None:
    """Why the first message of a stream cannot register a node (None: it can)."""
    if message.WhichOneof("body") != "register" or not message.register.node_name:
        return "the first message on Connect must be Register with a node_name"
    r = message.register
    if not NODE_NAME.fullmatch(r.node_name):
        return ("node_name must be a host name: letters, digits, '.', '_' and '-', at most "
                "253 characters")
    if r.node_address and (not _HOST_PORT.fullmatch(r.node_address)
                           or r.node_address.split(":", 1)[0].lower() in GRPC_SCHEMES):
        return "node_address must be host:port (a name or an IP address, no scheme)"
    if len(r.embed_models) > MAX_ITEMS or len(r.labels) > MAX_ITEMS:
        return f"at most {MAX_ITEMS} embed_models and {MAX_ITEMS} labels"
    if message.ByteSize() > MAX_MESSAGE_BYTES:
        return f"a Register of {message.ByteSize()} bytes (at most {MAX_MESSAGE_BYTES})"
    if r.node_certificate:
        try:
            node_pin(r.node_certificate)
        except ValueError as exc:
            return str(exc)
    return None


def node_pin(pem: bytes) -> types.NodePin | None:
    """A registered Node-service certificate as a pin (None for none sent); a
    ValueError naming ``node_certificate`` when it cannot be one (module docstring)."""
    if not pem:
        return None
    if len(pem) > MAX_CERTIFICATE_BYTES:
        raise ValueError(f"node_certificate: {len(pem)} bytes (at most "
                         f"{MAX_CERTIFICATE_BYTES})")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if len(certs) != 1:
        raise ValueError("node_certificate must be exactly one PEM X.509 certificate")
    try:
        names = certs[0].extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        names = []
    if not names or not NODE_NAME.fullmatch(names[0]):
        raise ValueError("node_certificate must carry a DNS name (subjectAltName) for the "
                         "control plane to check")
    return types.NodePin(certs[0].public_bytes(serialization.Encoding.PEM), names[0])


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, controls and direction marks replaced."""
    return _UNPRINTABLE.sub("?", text[:limit])


def engine_ports(r: controlplane_pb2.Register) -> tuple[int, int] | None:
    """The agent's engine port range (first, last), None when it registered none."""
    if not r.HasField("engine_port_range"):
        return None
    return r.engine_port_range.first, r.engine_port_range.last


def node_info(r: controlplane_pb2.Register, fallback: Keys | None = None) -> types.NodeInfo:
    """``fallback``: the keys for an agent that chose none (see the module docstring)."""
    return types.NodeInfo(
        name=r.node_name, address=r.node_address, agent_version=printable(r.agent_version),
        embed_models=tuple(r.embed_models),
        labels={printable(k): printable(v) for k, v in r.labels.items()},
        gpu_count=len(r.gpus),
        engine_ports=engine_ports(r),
        engine_key=r.engine_key or (fallback.engine if fallback else None),
        node_key=r.node_key or (fallback.node if fallback else None),
        node_pin=node_pin(r.node_certificate))


def as_decided(message: controlplane_pb2.AgentMessage,
               info: types.NodeInfo) -> controlplane_pb2.AgentMessage:
    """``message`` (a Register) carrying the keys and the certificate ``info`` holds,
    empty for none."""
    copy = controlplane_pb2.AgentMessage()
    copy.CopyFrom(message)
    copy.register.engine_key = info.engine_key or ""
    copy.register.node_key = info.node_key or ""
    copy.register.node_certificate = info.node_pin.certificate if info.node_pin else b""
    return copy


def _phase(value: int) -> types.Phase:
    return cast(types.Phase, enums.BACKEND_PHASE.name(value))  # the enum names are exactly the Phase literals


def _share(x: float, worst: float) -> float:
    """A share or rate in [0, 1]; ``worst`` for a NaN."""
    return worst if math.isnan(x) else min(1.0, max(0.0, x))


def report_problem(rep: controlplane_pb2.Report) -> str | None:
    """Why a report cannot be taken at all (None: it can); see the module docstring."""
    if len(rep.backends) > MAX_BACKENDS:
        return (f"a report names {len(rep.backends)} backends (at most {MAX_BACKENDS} per "
                "node)")
    for b in rep.backends:
        if len(b.models) > MAX_MODELS:
            return f"a backend with {len(b.models)} models (at most {MAX_MODELS})"
    return None


def backend_problem(b: common_pb2.BackendState) -> str | None:
    """Why one reported backend is left out (None: it is taken); the text names neither
    the name nor the model it refuses (they may hold anything)."""
    if not NODE_NAME.fullmatch(b.name):
        return ("a backend name that is not letters, digits, '.', '_' and '-' (at most 253 "
                "characters)")
    if not all(_MODEL_NAME.fullmatch(m) for m in b.models):
        return (f"a model name that is empty, over {MAX_MODEL_NAME} characters, or holds "
                "control characters")
    return None


def backend_state(node: str, b: common_pb2.BackendState,
                  engine_key: str | None = None) -> types.BackendState:
    """``engine_key`` (the node's own, see :class:`Keys`) goes with every request to an
    engine the agent started; an ``external`` one is not the agent's to key."""
    engine = enums.ENGINE_KIND.name(b.engine)
    return types.BackendState(
        key=f"{node}/{b.name}", node=node, name=b.name, url=upstream_kinds.base_url(b.url),
        models=tuple(b.models),
        task="embed" if b.task == common_pb2.BACKEND_TASK_EMBED else "generate",
        tasks=frozenset(b.tasks), engine=engine,
        api_key=engine_key if engine != "external" else None,
        phase=_phase(b.phase), source="agent", waiting=b.num_requests_waiting,
        running=b.num_requests_running, kv_usage=_share(b.kv_cache_usage, worst=1.0),
        kv_capacity_tokens=min(b.kv_capacity_tokens, MAX_KV_TOKENS),
        block_size=b.kv_block_size,
        prefix_hit_rate=_share(b.prefix_cache_hit_rate, worst=0.0), restarts=b.restarts,
        metrics_ok=b.metrics_ok, max_num_seqs=min(b.max_num_seqs, MAX_SEQS),
        max_model_len=b.max_model_len if 1 <= b.max_model_len <= MAX_MODEL_LEN else 0)


def finite_gpu_samples(rep: controlplane_pb2.Report) -> None:
    """Drop a GPU reading that is not a finite number (placement and views compare them)."""
    for gpu in rep.gpus:
        for field in ("utilization_percent", "memory_utilization_percent",
                      "temperature_celsius", "power_watts", "power_limit_watts"):
            if gpu.HasField(field) and not math.isfinite(getattr(gpu, field)):
                gpu.ClearField(field)
