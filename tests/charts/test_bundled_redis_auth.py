"""The bundled stores (chart `self-hosted-bundled`, overlay `bundled`): Redis wants a
password, and both admit only the control plane.

Its image turns Redis' protected mode off, and without NetworkPolicies (neither renders
them) every pod in the cluster reaches its Service. Open, any of them read every tenant's
cached answers and wrote the operator intent the control planes apply: an `external`
engine of its choosing, which the agents run and the control planes route tenants'
prompts to, or cordons of every node. Here the Redis each rendering describes runs for
real (its arguments, with the image's `--protected-mode no`), refuses a client without
the password, answers its own readiness probe and the control plane's rendered URL.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests import harness
from tests.charts import helm
from tests.manifests import pods, render
from tests.manifests.test_networkpolicies import AGENT, CLIENT, CP, Pod, may_connect


def _objects(source: str) -> list[dict[str, Any]]:
    return helm.render_chart("self-hosted-bundled") if source == "chart" \
        else render.render("bundled")


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


@pytest.fixture(params=["chart", "overlay"])
def rendered(request: pytest.FixtureRequest, tmp_path: pathlib.Path
             ) -> Iterator[tuple[int, dict[str, Any], dict[str, str], str]]:
    """The rendered Redis running on a free port: port, its container, its environment,
    and the control plane's SYNAPSE_REDIS_URL pointed at it."""
    objects = _objects(request.param)
    container = render.container(render.find(objects, "StatefulSet", "synapse-redis"), "redis")
    env = pods.container_environ(container)
    args = [_expand(a, env) for a in container["args"]]
    assert args[0] == "redis-server"
    cp = render.container(render.find(objects, "Deployment", "synapse-controlplane"),
                          "controlplane")
    url = pods.container_environ(cp)["SYNAPSE_REDIS_URL"]
    port = harness.free_port()
    binary = harness.tool("redis-server", "apt-get install redis-server (make test does this)")
    argv = [binary, *args[1:], "--protected-mode", "no",   # what the image's entrypoint adds
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--appendonly", "no", "--save", ""]
    proc = harness.ManagedProcess(f"redis-{port}", argv, tmp_path / "redis.log")
    try:
        harness.wait_until(lambda: _answer(port, b"PING", timeout=0.5) != b"", 10,
                           f"redis-server on port {port}", proc=proc)
        yield port, container, env, url.replace("@synapse-redis:6379/", f"@127.0.0.1:{port}/")
    finally:
        proc.stop()


def _answer(port: int, command: bytes, timeout: float = 10.0) -> bytes:
    """Redis's answer to ``command`` (b"" when it cannot be reached in ``timeout``): the
    default leaves a loaded machine seconds, so an assertion on it never reads b"" from a
    server that was only slow."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(command + b"\r\n")
            return s.recv(64)
    except OSError:
        return b""


def test_a_client_without_the_password_reads_and_writes_nothing(
        rendered: tuple[int, dict[str, Any], dict[str, str], str]) -> None:
    port, _, _, _ = rendered
    assert _answer(port, b"PING").startswith(b"-NOAUTH")
    assert _answer(port, b"HGETALL synapse:intent:nodes").startswith(b"-NOAUTH")
    assert _answer(port, b"KEYS synapse:cache:*").startswith(b"-NOAUTH")


def test_its_probe_and_the_control_plane_get_in_with_the_secret(
        rendered: tuple[int, dict[str, Any], dict[str, str], str]) -> None:
    port, container, env, url = rendered
    assert re.fullmatch(r"redis://:[^@]+@127\.0\.0\.1:\d+/0", url), url
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        assert client.ping()
    finally:
        client.close()
    probe = container["readinessProbe"]["exec"]["command"]
    cli = harness.tool("redis-cli", "apt-get install redis-tools (make test does this)")
    out = subprocess.run([cli, "-p", str(port), *probe[1:]], capture_output=True, text=True,
                         timeout=10, check=False,
                         env={**os.environ, "REDISCLI_AUTH": env["REDISCLI_AUTH"]})
    assert out.stdout.strip() == "PONG", out.stdout + out.stderr


@pytest.mark.parametrize("source", ["chart", "overlay"])
def test_the_stores_admit_the_control_plane_alone_without_network_policies_on(
        source: str) -> None:
    """Milvus takes no credentials and holds tenants' prompts: its pod (and Redis') is
    fenced even where the chart's `networkPolicy.enabled` is false (its default) and in
    the overlay, which renders no other policy."""
    policies = [o for o in _objects(source) if o["kind"] == "NetworkPolicy"]
    redis_pod = Pod("synapse", (("app.kubernetes.io/name", "synapse-redis"),))
    milvus_pod = Pod("synapse", (("app.kubernetes.io/name", "synapse-milvus"),))
    assert may_connect(policies, CP, redis_pod, 6379)
    assert may_connect(policies, CP, milvus_pod, 19530)
    for src, dst, port in ((CLIENT, redis_pod, 6379), (AGENT, redis_pod, 6379),
                           (CLIENT, milvus_pod, 19530), (AGENT, milvus_pod, 19530),
                           (CLIENT, milvus_pod, 9091)):
        assert not may_connect(policies, src, dst, port), (src, dst, port)
    assert may_connect(policies, CLIENT, CP, 8080)      # nothing else is fenced
