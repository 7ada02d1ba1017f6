"""Configured secrets never leave the process: not in ``repr`` of the settings, not in
metrics, stats, the API description or Admin answers, not in an error body, and not in
any log line — checked at debug level, including while Redis (whose URL carries a
password) is down. The fleet's teardown repeats the log scan over the whole package.
"""

from __future__ import annotations

import signal

import grpc

from controlplane import config
from protos.synapse.v1 import admin_pb2, admin_pb2_grpc
from synapse_common import settings as settings_mod
from tests import fleet, harness
from tests.security.conftest import LIMITED_KEY, SECRETS, SecureFleet

AUTH = (("authorization", f"Bearer {fleet.ADMIN_KEY}"),)


def test_settings_repr_hides_every_secret(secure: SecureFleet) -> None:
    loaded = settings_mod.load(config.ControlPlaneSettings, str(secure.tmp / "cp-0.yaml"),
                               environ={})
    text = repr(loaded) + str(loaded) + loaded.model_dump_json()
    assert not [s for s in SECRETS if s in text]
    assert settings_mod.secret_values(loaded)  # the secrets are there, only hidden


def test_observability_endpoints_carry_no_secret(secure: SecureFleet) -> None:
    url = secure.urls[0]
    bodies = [fleet.request(url, "GET", path, key=fleet.ADMIN_KEY).body
              for path in ("/metrics", "/api/v1/stats", "/openapi.json", "/ready", "/health")]
    with grpc.insecure_channel(secure.grpcs[0]) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for call, req in ((admin.ListNodes, admin_pb2.ListNodesRequest()),
                          (admin.GetNode, admin_pb2.GetNodeRequest(name="sec-node")),
                          (admin.ListModels, admin_pb2.ListModelsRequest()),
                          (admin.GetStats, admin_pb2.GetStatsRequest()),
                          (admin.ExplainRoute, admin_pb2.ExplainRouteRequest(
                              model="llama", prompt="hi"))):
            bodies.append(call(req, metadata=AUTH, timeout=10).SerializeToString())
    assert not fleet.scan_for_secrets([], bodies, secure.secrets())


def test_no_secret_in_any_log_line_so_far(secure: SecureFleet) -> None:
    logs = fleet.log_files(secure.tmp)
    assert len(logs) >= 5, logs   # two control planes, agent, engines, redis
    assert not fleet.scan_for_secrets(logs, secure.bodies, secure.secrets())


def test_redis_down_is_served_and_logged_without_its_password(secure: SecureFleet) -> None:
    assert secure.redis is not None
    secure.redis.signal(signal.SIGKILL)
    secure.redis.wait(timeout=10)
    for i in range(6):
        reply = fleet.request(secure.urls[i % 2], "POST", "/v1/chat/completions",
                              fleet.chat_body(f"while redis is down {i}", temperature=0))
        secure.bodies.append(reply.body)
        assert reply.status == 200, reply.body[:300]   # the cache fails open
    limited = fleet.request(secure.urls[0], "POST", "/v1/chat/completions", fleet.chat_body(),
                            key="sk-rel-limited-5b7d9f1a3c2e4d68")
    assert limited.status in (200, 429)               # local limits take over
    harness.wait_until(lambda: any("redis" in p.read_text(errors="replace").lower()
                                   for p in fleet.log_files(secure.tmp)
                                   if p.name.startswith("controlplane")), 10,
                       "the control planes to log the Redis failure")
    assert not fleet.scan_for_secrets(fleet.log_files(secure.tmp), secure.bodies,
                                   secure.secrets())


def test_the_access_log_names_tenants_and_never_a_key(secure: SecureFleet) -> None:
    sent = []
    for i, key in enumerate((fleet.TENANT_KEY, LIMITED_KEY, fleet.OTHER_KEY, "sk-wrong-0")):
        reply = fleet.request(secure.urls[i % 2], "POST", "/v1/chat/completions",
                              fleet.chat_body(f"access log {i}"), key=key)
        secure.bodies.append(reply.body)
        sent.append((reply.headers["x-request-id"], reply.status))
    lines = [line for path in fleet.log_files(secure.tmp) if path.name.startswith("controlplane")
             for line in path.read_text("utf-8", errors="replace").splitlines()
             if " synapse.access: " in line]
    for request_id, status in sent:
        mine = [line for line in lines if f"request_id={request_id}" in line]
        assert len(mine) == 1, (request_id, lines[-8:])
        assert f"POST /v1/chat/completions {status}" in mine[0]
    assert any("tenant=limited" in line for line in lines)
    assert sent[-1][1] == 401
    assert not fleet.scan_for_secrets([], lines, [*SECRETS, "sk-wrong-0"])
