"""The access log: one structured line per API request, on the ``synapse.access`` logger.

A line says who asked for what and what happened: request id, tenant (its name — keys
never reach this module), the model asked and the model served, the cache result, the
backend, the status, time to first byte and the whole duration, the engine's prompt /
completion / cached tokens, retries and the fallback model, and the id the engine got
when it is not the client's (``engine_request_id``); with ``--log-format json``
they are fields of the JSON line, otherwise ``key=value`` after the message.

Design decisions:

* **At info, on by default** (``access_log.enabled``); ``--log-level warning`` silences it
  like any info line. ``access_log.sample_ratio`` keeps that share of the lines, decided
  by a hash of the request id, so the choice is the same wherever the id is seen; errors
  (status 5xx, or a stream cut short) are always kept unless
  ``access_log.sample_errors`` says otherwise.
* **Client input is bounded and inert**: the model name asked and the path are cut to
  :data:`FIELD_MAX` characters, and their control characters (line breaks, ESC, the
  Unicode line separators) and spaces are written as ``\\xNN`` / ``\\uNNNN`` escapes
  (:func:`inert`): in the ``key=value`` format a newline in a model name or in a
  percent-decoded path (``/v1/x%0a...``, which needs no key) started a forged line, a
  space a forged field such as ``tenant=``, and ESC reached the terminal of whoever reads
  the log. Anything a configured secret matches is still replaced by the log redaction
  filter, as in every line.
* Tokens are the engine's ``usage`` of the answer (none for an answer from the cache,
  whose ``cache`` field says so), or for a stream that ended without it the estimate the
  usage is accounted with (``usage_estimated`` true).
* The line costs a few microseconds (a record, the formatter, one write); bench/gateway.py
  ``--access-log`` measures it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets

from controlplane.core import usage as usage_mod

LOGGER = "synapse.access"
FIELD_MAX = 128
_SCALE = 2**32
# Characters a client's text may not carry into a line as they are: C0 controls, space,
# DEL, C1 controls and the Unicode line and paragraph separators.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x21), *range(0x7F, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029)})


def inert(text: str) -> str:
    """``text`` cut to :data:`FIELD_MAX` characters, with every character that could end
    a log line, start a field or drive a terminal written as an escape."""
    return text[:FIELD_MAX].translate(_ESCAPES)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    enabled: bool = True
    sample_ratio: float = 1.0
    sample_errors: bool = False          # errors are sampled like the rest


@dataclasses.dataclass(slots=True)
class Line:
    """One request as the access log sees it (seconds for the times)."""

    request_id: str
    method: str
    path: str
    status: int
    duration_s: float
    tenant: str = ""
    model: str = ""                 # as the client named it
    served: str = ""                # the model that answered (a fallback, or the canonical)
    cache: str = ""
    backend: str = ""
    ttft_s: float | None = None
    usage: usage_mod.Usage | None = None
    retries: int = 0
    fallback: str = ""
    broken: bool = False            # a stream that ended with an error event
    trace_id: str = ""
    engine_id: str = ""             # the id the engine got (its own logs name it)


class AccessLog:
    def __init__(self, policy: Policy, logger: logging.Logger | None = None) -> None:
        self.policy = policy
        self._log = logger or logging.getLogger(LOGGER)
        self._threshold = int(policy.sample_ratio * _SCALE)
        # The sampling hash is keyed by a secret of this process: the request id may be
        # the client's own, and a client that knew the hash could choose ids never logged
        # (a CRC seeded with a secret would not do: it is linear, so ids the client makes
        # collide stay together).
        self._key = secrets.token_bytes(16)

    def wanted(self) -> bool:
        """Whether lines are written at all (enabled, and the logger takes info)."""
        return self.policy.enabled and self._log.isEnabledFor(logging.INFO)

    def keeps(self, request_id: str, error: bool) -> bool:
        """The sampling decision for one request."""
        if error and not self.policy.sample_errors:
            return True
        if self._threshold >= _SCALE:
            return True
        digest = hashlib.blake2b(request_id.encode(), digest_size=4, key=self._key).digest()
        return int.from_bytes(digest, "little") < self._threshold

    def write(self, line: Line) -> None:
        error = line.status >= 500 or line.broken
        if not self.wanted() or not self.keeps(line.request_id, error):
            return
        self._log.info("%s %s %d", line.method, inert(line.path), line.status,
                       extra=fields(line))


def fields(line: Line) -> dict[str, object]:
    """The line's fields (the JSON keys)."""
    u = line.usage
    return {
        "request_id": inert(line.request_id), "tenant": line.tenant,   # a client's own
        "model": inert(line.model), "model_served": line.served, "cache": line.cache,
        "backend": line.backend, "status": line.status,
        "ttft_ms": None if line.ttft_s is None else round(line.ttft_s * 1000, 3),
        "duration_ms": round(line.duration_s * 1000, 3),
        "prompt_tokens": u.prompt_tokens if u else None,
        "completion_tokens": u.completion_tokens if u else None,
        "cached_tokens": u.cached_tokens if u else None,
        "usage_estimated": bool(u and u.estimated),
        "retries": line.retries, "fallback": line.fallback, "broken": line.broken,
        "method": line.method, "path": inert(line.path),
        **({"trace_id": line.trace_id} if line.trace_id else {}),
        **({"engine_request_id": line.engine_id}
           if line.engine_id and line.backend and line.engine_id != line.request_id else {}),
    }
