"""The tenant table: API keys to tenants, and the admin key."""

from __future__ import annotations

import pytest

from controlplane import errors
from controlplane.core import tenants

ADMIN = "sk-admin-tenants-test-5c7e9a1b3d"
TEAM = "sk-team-tenants-test-2b4d6f8a0c"


def _table(enabled: bool, admin: str | None = ADMIN) -> tenants.TenantTable:
    return tenants.TenantTable([(tenants.Tenant("team"), [tenants.sha256_hex(TEAM)])],
                               tenants.sha256_hex(admin) if admin else None, enabled=enabled)


@pytest.mark.parametrize("enabled", [True, False])
def test_admin_routes_need_the_admin_key_whether_or_not_tenants_need_theirs(
        enabled: bool) -> None:
    """``auth.enabled: false`` lets /v1 be used without a key (a proxy in front may do
    it); the admin routes (``/api/v1/stats``, every Admin gRPC method: deploy with any
    engine arguments, drain, invalidate, usage) used to open with it, the configured
    admin key ignored, on a gRPC port that listens on every interface by default."""
    table = _table(enabled)
    for header in (None, "Bearer wrong", f"Bearer {TEAM}", "Basic x"):
        with pytest.raises((errors.Unauthorized, errors.Forbidden)):
            table.authenticate_admin(header)
    table.authenticate_admin(f"Bearer {ADMIN}")
    if not enabled:
        assert table.authenticate(None).name == tenants.ANONYMOUS


def test_without_an_admin_key_the_admin_routes_are_closed_even_with_auth_off() -> None:
    table = _table(False, admin=None)
    with pytest.raises(errors.Forbidden):
        table.authenticate_admin("Bearer anything")
    with pytest.raises(errors.Unauthorized):
        table.authenticate_admin(None)


def test_a_key_of_two_tenants_is_refused() -> None:
    with pytest.raises(ValueError, match="tenant 'b' is also a key of tenant 'a'"):
        tenants.TenantTable([(tenants.Tenant("a"), [tenants.sha256_hex(TEAM)]),
                             (tenants.Tenant("b"), [tenants.sha256_hex(TEAM)])], None)


def test_an_admin_key_that_is_also_a_tenant_key_is_refused() -> None:
    """Accepted, it made that tenant an admin: its key read ``/api/v1/stats`` and
    ``/metrics`` and deployed, drained and invalidated over Admin gRPC. The check is on
    the digests, so a tenant configured by ``key_sha256`` (or in ``auth.key_file``) is
    caught as well as one with ``keys``."""
    with pytest.raises(ValueError, match=r"auth\.admin_key: .*tenant 'team'") as caught:
        tenants.TenantTable([(tenants.Tenant("team"), [tenants.sha256_hex(ADMIN).upper()])],
                            tenants.sha256_hex(ADMIN))
    assert ADMIN not in str(caught.value)
