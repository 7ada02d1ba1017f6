"""The gRPC call metadata agents and control planes exchange, in one place for both sides.

* The agent token, as ``authorization: Bearer …``: the agent presents its
  ``control_plane.token`` on ``ControlPlane.Connect``; the control plane presents the same
  value (its ``auth.agent_token``) on every ``Node`` call. The receiving side keeps only
  the token's SHA-256 digest and compares digests with :func:`hmac.compare_digest`, so the
  time a check takes says nothing about how much of a guess was right, and the token never
  sits in a comparison or a log line.
* :data:`TENANT`: the tenant a ``Node.Embed`` call is made for (UTF-8, a binary key so
  that any tenant name travels), which partitions the agent's embedding cache.
* :data:`ERROR` = :data:`TOO_LARGE` in the trailing metadata of an INVALID_ARGUMENT
  ``Node.Embed``: the call was over a size limit (the control plane answers 413).
  The control plane's services end every refusal with :data:`ERROR` = the error's code
  (:data:`REFUSED` when it has none), so a client can tell an UNAVAILABLE the service
  sent (e.g. the fleet intent cannot be stored) from a service it could not reach.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

HEADER = "authorization"
TENANT = "synapse-tenant-bin"
ERROR = "synapse-error"
TOO_LARGE = "too-large"
REFUSED = "refused"


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents ``token`` (none without one)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


def tenant(name: str) -> tuple[str, bytes]:
    """The metadata entry naming the tenant a call is made for."""
    return TENANT, name.encode("utf-8")


def tenant_from(call_metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The tenant named in call metadata ("" when none is)."""
    value = dict(call_metadata or ()).get(TENANT, b"")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def bearer(call_metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the metadata's ``authorization: Bearer <token>`` (None without one)."""
    header = dict(call_metadata or ()).get(HEADER)
    scheme, _, value = (header if isinstance(header, str) else "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class TokenCheck:
    """Whether call metadata carries one of the expected tokens (``None`` and empty ones
    are left out; none left: no token configured). Every digest is compared, so the time
    says nothing about which one matched."""

    def __init__(self, token: str | None, *more: str | None) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in (token, *more) if t]

    @property
    def configured(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"TokenCheck(configured={self.configured})"

    def accepts(self, call_metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """True when the metadata's ``authorization`` is ``Bearer <the token>``."""
        if not self._digests:
            return False
        header = dict(call_metadata or ()).get(HEADER)
        scheme, _, value = (header if isinstance(header, str) else "").partition(" ")
        given = hashlib.sha256(value.strip().encode()).digest()
        matched = [hmac.compare_digest(given, digest) for digest in self._digests]
        return any(matched) and scheme.lower() == "bearer"
