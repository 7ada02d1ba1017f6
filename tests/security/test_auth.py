"""Every ``/v1`` and admin route needs a key: 401 without one or with an unknown one, 403
with a tenant key on admin routes (HTTP and every ``Admin`` gRPC method). Only liveness,
readiness and the API description are open, and the spec says so. ``/metrics`` on the API
port lists every tenant, so it takes the admin key as the stats route does.
"""

from __future__ import annotations

import grpc
import pytest

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc
from tests import fleet
from tests.security.conftest import SecureFleet

OPEN = {"/health", "/ready", "/openapi.json"}
# Anthropic's clients send their key as x-api-key: /v1/messages takes either scheme.
X_API_KEY_PATHS = {"/v1/messages", "/v1/messages/count_tokens"}
V1 = [("POST", "/v1/chat/completions", fleet.chat_body()),
      ("POST", "/v1/completions", b'{"model": "llama", "prompt": "hi", "max_tokens": 2}'),
      ("POST", "/v1/embeddings", b'{"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "hi"}'),
      ("GET", "/v1/models", None)]
BAD_AUTH = [None, "Bearer", "Bearer ", "Bearer sk-not-a-key", "Basic dXNlcjpwYXNz",
            f"Token {fleet.TENANT_KEY}", f"Bearer {fleet.TENANT_KEY}x",
            f"Bearer {fleet.TENANT_KEY[:-1]}"]


def _call(secure: SecureFleet, method: str, path: str, body: bytes | None,
          auth: str | None) -> fleet.Reply:
    headers = {"Authorization": auth} if auth is not None else {}
    reply = fleet.request(secure.urls[0], method, path, body, headers=headers, key=None)
    secure.bodies.append(reply.body)
    return reply


def test_the_spec_marks_every_v1_and_admin_route_secured(secure: SecureFleet) -> None:
    spec = fleet.get_json(f"{secure.urls[0]}/openapi.json", key=None)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path in OPEN:
                continue
            schemes = ([{"apiKey": []}, {"bearer": []}] if path in X_API_KEY_PATHS
                       else [{"bearer": []}])
            assert op.get("security") == schemes, (method, path)
            assert "401" in op["responses"], (method, path)


@pytest.mark.parametrize(("method", "path", "body"), V1, ids=[p for _, p, _ in V1])
@pytest.mark.parametrize("auth", BAD_AUTH, ids=lambda a: repr(a)[:16])
def test_v1_routes_refuse_missing_and_unknown_keys(secure: SecureFleet, method: str, path: str,
                                                   body: bytes | None, auth: str | None) -> None:
    reply = _call(secure, method, path, body, auth)
    assert reply.status == 401, (reply.status, reply.body[:200])
    assert reply.is_envelope() and reply.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("method", "path", "body"), V1, ids=[p for _, p, _ in V1])
def test_v1_routes_accept_a_tenant_key(secure: SecureFleet, method: str, path: str,
                                       body: bytes | None) -> None:
    reply = _call(secure, method, path, body, f"Bearer {fleet.TENANT_KEY}")
    assert reply.status == 200, (reply.status, reply.body[:200])


def test_admin_http_route_needs_the_admin_key(secure: SecureFleet) -> None:
    for auth in BAD_AUTH:
        assert _call(secure, "GET", "/api/v1/stats", None, auth).status == 401
    tenant = _call(secure, "GET", "/api/v1/stats", None, f"Bearer {fleet.TENANT_KEY}")
    assert tenant.status == 403 and tenant.is_envelope(), tenant.body[:200]
    admin = _call(secure, "GET", "/api/v1/stats", None, f"Bearer {fleet.ADMIN_KEY}")
    assert admin.status == 200


def test_a_tenant_key_cannot_read_the_other_tenants_metrics(secure: SecureFleet) -> None:
    fleet.request(secure.urls[0], "POST", "/v1/chat/completions", fleet.chat_body(),
                  key=fleet.OTHER_KEY)
    for auth in (*BAD_AUTH, f"Bearer {fleet.TENANT_KEY}", f"Bearer {fleet.OTHER_KEY}"):
        reply = _call(secure, "GET", "/metrics", None, auth)
        assert reply.status in (401, 403) and reply.is_envelope(), (auth, reply.body[:200])
        assert b'tenant="' not in reply.body
    admin = _call(secure, "GET", "/metrics", None, f"Bearer {fleet.ADMIN_KEY}")
    assert admin.status == 200 and b'tenant="other"' in admin.body


def test_unknown_routes_do_not_reveal_anything_before_auth(secure: SecureFleet) -> None:
    reply = _call(secure, "GET", "/api/v1/secrets", None, None)
    assert reply.status == 404 and reply.is_envelope()


ADMIN_CALLS = [("ListNodes", admin_pb2.ListNodesRequest()),
               ("GetNode", admin_pb2.GetNodeRequest(name="sec-node")),
               ("CordonNode", admin_pb2.CordonNodeRequest(name="sec-node")),
               ("UncordonNode", admin_pb2.UncordonNodeRequest(name="sec-node")),
               ("DrainNode", admin_pb2.DrainNodeRequest(name="sec-node")),
               ("ListModels", admin_pb2.ListModelsRequest()),
               ("DeployModel", admin_pb2.DeployModelRequest(model=fleet.MODEL)),
               ("UndeployModel", admin_pb2.UndeployModelRequest(model=fleet.MODEL)),
               ("InvalidateCache", admin_pb2.InvalidateCacheRequest(all=True)),
               ("GetStats", admin_pb2.GetStatsRequest()),
               ("ExplainRoute", admin_pb2.ExplainRouteRequest(model="llama", prompt="hi")),
               ("GetUsage", admin_pb2.GetUsageRequest())]


def test_the_call_list_covers_every_admin_method() -> None:
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert {m.name for m in service.methods} == {name for name, _ in ADMIN_CALLS}


@pytest.mark.parametrize(("method", "request_"), ADMIN_CALLS, ids=[m for m, _ in ADMIN_CALLS])
def test_every_admin_grpc_method_needs_the_admin_key(secure: SecureFleet, method: str,
                                                     request_: object) -> None:
    with grpc.insecure_channel(secure.grpcs[0]) as channel:
        call = getattr(admin_pb2_grpc.AdminStub(channel), method)
        cases = [((), grpc.StatusCode.UNAUTHENTICATED),
                 ((("authorization", "Bearer sk-wrong"),), grpc.StatusCode.UNAUTHENTICATED),
                 ((("authorization", f"Bearer {fleet.TENANT_KEY}"),),
                  grpc.StatusCode.PERMISSION_DENIED)]
        for metadata, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                call(request_, metadata=metadata, timeout=10)
            assert info.value.code() == code, (method, info.value.code(), info.value.details())
            assert fleet.TENANT_KEY not in (info.value.details() or "")


@pytest.mark.parametrize("key", [None, "", "sk-not-a-key", f"{fleet.TENANT_KEY}x",
                                 fleet.TENANT_KEY[:-1]], ids=lambda k: repr(k)[:16])
def test_messages_refuse_a_missing_or_unknown_x_api_key(secure: SecureFleet,
                                                        key: str | None) -> None:
    headers = {"x-api-key": key} if key is not None else {}
    body = b'{"model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}'
    reply = fleet.request(secure.urls[0], "POST", "/v1/messages", body, headers=headers, key=None)
    secure.bodies.append(reply.body)
    assert reply.status == 401, (reply.status, reply.body[:200])
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == "authentication_error", error
