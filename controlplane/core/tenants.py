"""Tenants and API keys.

Keys are never kept in clear: configured keys (``Secret``) are hashed at start-up and a
request's Bearer key is hashed once and looked up in a dict, so the lookup costs one
sha256 and does not leak timing about which prefix matched. The admin key is compared
the same way. Allowed models are stored as canonical names (aliases resolved here once).

The admin key is for admin routes, and they always need it, even with ``enabled`` off
(which only lets ``/v1`` be used without a key). On ``/v1`` it is refused (403) unless
``auth.admin_tenant`` names a tenant it then acts as, with that tenant's allow-list and
limits: an operator's key is not a tenant with no limits by accident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable, Iterable

from controlplane import errors
from synapse_common import bearer_token

ANONYMOUS = "anonymous"
KNOWN_MAX = 4096        # remembered Authorization headers (cleared when full)


@dataclasses.dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    allowed_models: frozenset[str] = frozenset()   # canonical; empty = every model
    requests_per_second: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None

    def allows(self, canonical_model: str) -> bool:
        return not self.allowed_models or canonical_model in self.allowed_models


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class TenantTable:
    def __init__(self, tenants: Iterable[tuple[Tenant, Iterable[str]]],
                 admin_key_sha256: str | None, enabled: bool = True,
                 admin_tenant: str | None = None) -> None:
        """``tenants``: each tenant with the sha256 hex digests of its keys;
        ``admin_tenant``: the tenant the admin key acts as on /v1 (none: refused)."""
        self.enabled = enabled
        self._by_hash: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}
        for tenant, hashes in tenants:
            self._tenants[tenant.name] = tenant
            for h in hashes:
                h = h.strip().lower()
                if h in self._by_hash and self._by_hash[h].name != tenant.name:
                    raise ValueError(f"an API key of tenant {tenant.name!r} is also a key "
                                     f"of tenant {self._by_hash[h].name!r}")
                self._by_hash[h] = tenant
        self._admin_hash = admin_key_sha256.strip().lower() if admin_key_sha256 else None
        if self._admin_hash and (shared := self._by_hash.get(self._admin_hash)):
            # Accepted, this key would read every tenant's usage and deploy and drain as
            # that tenant, and the tenant would never know it holds the operator's key.
            raise ValueError(f"auth.admin_key: it is also an API key of tenant "
                             f"{shared.name!r}: give the admin key a value of its own")
        self._anonymous = Tenant(ANONYMOUS)
        if admin_tenant is not None and admin_tenant not in self._tenants:
            raise ValueError(f"auth.admin_tenant: no tenant is named {admin_tenant!r}")
        self._admin_as = self._tenants[admin_tenant] if admin_tenant is not None else None
        # Authorization header → tenant, for headers that named a tenant's key: hashing
        # the key is the larger part of authenticating, and a client sends the same
        # header on every request. Refused headers are never kept (a flood of bad keys
        # cannot grow it); the table is immutable, so an entry never goes stale.
        self._known: dict[str, Tenant] = {}

    @staticmethod
    def bearer(header: str | None) -> str | None:
        return bearer_token.presented(header)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant for an ``Authorization`` header, or :class:`errors.Unauthorized`."""
        if not self.enabled:
            return self._anonymous
        if authorization is not None and (known := self._known.get(authorization)):
            return known
        key = self.bearer(authorization)
        if key is None:
            raise errors.Unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>'",
                code="missing_api_key")
        digest = sha256_hex(key)
        tenant = self._by_hash.get(digest)
        if tenant is not None:
            if len(self._known) >= KNOWN_MAX:
                self._known.clear()
            self._known[authorization] = tenant     # type: ignore[index]
            return tenant
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            if self._admin_as is not None:
                return self._admin_as
            raise errors.Forbidden("the admin key is for admin routes, not for /v1: use a "
                                   "tenant's key (or set auth.admin_tenant)",
                                   code="admin_key_not_a_tenant")
        raise errors.Unauthorized("invalid API key")

    def authenticate_admin(self, authorization: str | None) -> None:
        """Nothing, or the error that refuses ``authorization`` on an admin route. The
        admin key is needed whatever ``enabled`` says: turning tenant keys off (a proxy
        in front may check them) must not open deploy, drain and every tenant's usage
        to whoever reaches the port."""
        key = self.bearer(authorization)
        if key is None:
            raise errors.Unauthorized("missing admin key: send it as 'Authorization: Bearer "
                                      "<admin key>'", code="missing_api_key")
        if not self._admin_hash:
            raise errors.Forbidden("no admin key is configured (auth.admin_key)",
                                   code="admin_disabled")
        if not hmac.compare_digest(sha256_hex(key), self._admin_hash):
            if sha256_hex(key) in self._by_hash:
                raise errors.Forbidden("this route needs the admin key, not a tenant key",
                                       code="admin_required")
            raise errors.Unauthorized("invalid admin key")

    def tenants(self) -> list[Tenant]:
        return list(self._tenants.values())


def resolve_allowed(names: Iterable[str], canonical: Callable[[str], str]) -> frozenset[str]:
    return frozenset(canonical(n) for n in names)
