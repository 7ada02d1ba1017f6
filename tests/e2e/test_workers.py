"""A control plane of two serving processes (``http.workers: 2``), as real processes.

One pod's primary and its worker share the HTTP port, Redis and one agent running two
simulators (which the agent reports to the primary alone). Each request below opens a
connection of its own, so the kernel spreads them over both processes; the tests check
that the pod still behaves as one control plane: both serve, a prompt's prefix stays on
the backend that holds it whichever process routes it, /metrics counts the pod, an
operator's cordon reaches every process, a dead worker is replaced, and SIGTERM stops
them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests import fleet, harness

WORKERS = 2
MESH_GRACE_S = 3.0      # what a sibling may take to apply what the mesh carried, under load


@dataclasses.dataclass
class Pod:
    url: str
    grpc: str
    primary: harness.ManagedProcess
    tmp: pathlib.Path


def children(pid: int) -> list[int]:
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def workers_of(pod: Pod) -> list[int]:
    """The primary's serving workers (its child processes running the control plane)."""
    found = []
    for pid in children(pod.primary.pid):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"--worker-index" in cmdline:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("workers")
    pool = harness.ProcessPool(tmp)
    redis = harness.RedisServer(tmp)
    http, grpc = harness.free_port(), harness.free_port()
    url = f"http://127.0.0.1:{http}"
    try:
        cfg = fleet.controlplane_config(
            "pod", http, grpc, tmp / "data", http={"workers": WORKERS},
            redis={"url": redis.url, "timeout_s": 1.0},
            registry={"node_down_after_s": 5, "upstream_probe_interval_s": 0.5},
            cache={"enabled": True, "semantic_enabled": False})    # L1 in Redis
        path = fleet.write_yaml(tmp / "cp.yaml", cfg)
        primary = pool.start("controlplane", ["synapse", "controlplane", "--config", str(path)],
                             ready_url=f"{url}/health", timeout=60)
        agent_cfg = fleet.agent_config("pod-node", [f"127.0.0.1:{grpc}"],
                                       {"gen-a": harness.free_port(),
                                        "gen-b": harness.free_port()},
                                       tmp / "engines", time_scale=0)
        agent = pool.start("agent", ["synapse", "agent", "--config",
                                     str(fleet.write_yaml(tmp / "agent.yaml", agent_cfg))])
        p = Pod(url, f"127.0.0.1:{grpc}", primary, tmp)
        harness.wait_until(lambda: len(workers_of(p)) == WORKERS - 1, 60,
                           "the serving worker to start", proc=primary)
        harness.wait_until(lambda: fleet.backends_ready(url) == 2, 90,
                           "both engines ready", proc=agent, interval=0.3)
        # and every process serving (a worker takes the port once its mesh is joined)
        harness.wait_until(lambda: listening(p) == WORKERS - 1, 60, "every process to serve",
                           proc=primary)
        assert all(chat(p, "warm").status == 200 for _ in range(8))
        yield p
    finally:
        pool.stop_all()
        redis.stop()


def listening(pod: Pod) -> int:
    """How many times a serving worker of the pod has started taking requests."""
    return pod.primary.output().count(f" of {WORKERS} (")


def chat(pod: Pod, content: str, key: str = fleet.TENANT_KEY, **extra: object,
         ) -> fleet.Reply:
    """A chat completion on a connection of its own (sampled at the default temperature,
    so the cache stays out of it unless ``extra`` says otherwise)."""
    body = json.dumps({"model": "llama", "max_tokens": 2, **extra,
                       "messages": [{"role": "user", "content": content}]}).encode()
    return fleet.request(pod.url, "POST", "/v1/chat/completions", body, key=key)


def metric(pod: Pod, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, as the pod's /metrics answers."""
    text = fleet.request(pod.url, "GET", "/metrics", key=fleet.ADMIN_KEY).body.decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_both_processes_serve_and_metrics_count_the_pod(pod: Pod) -> None:
    before = metric(pod, "synapse_requests_total", status="200")
    for i in range(40):
        reply = chat(pod, f"count me {i}")
        assert reply.status == 200, reply.body[:300]
    assert metric(pod, "synapse_requests_total", status="200") - before == 40
    # the fleet view: the primary's and the worker's stats, through Redis
    snap = fleet.stats(pod.url)
    assert sorted(snap["replicas"]) == ["pod", "pod-w1"], snap


def test_a_prefix_stays_where_it_is_cached_whichever_process_routes_it(pod: Pod) -> None:
    context = " ".join(f"shared clause {i} of the workers contract." for i in range(200))
    seen = set()
    first = chat(pod, f"{context} Question first?")
    assert first.status == 200, first.body[:300]
    seen.add(first.headers["x-synapse-backend"])
    # the other process learns the prefix over the mesh, a moment after the first answer;
    # no process tells when it has, so wait a moment a loaded machine also keeps (a request
    # it routed before would choose a backend without the prefix and fail the test)
    time.sleep(MESH_GRACE_S)
    for i in range(12):
        reply = chat(pod, f"{context} Question {i}?")
        assert reply.status == 200, reply.body[:300]
        seen.add(reply.headers["x-synapse-backend"])
        assert reply.headers["x-synapse-route"].startswith("prefix-hit"), reply.headers
    assert len(seen) == 1, seen


def test_feedback_on_a_cache_hit_reaches_whichever_process_served_it(pod: Pod) -> None:
    hits: list[str] = []

    def hit(question: str) -> bool:
        reply = chat(pod, question, temperature=0)
        if reply.headers["x-synapse-cache"] != "hit-exact":
            return False
        hits.append(reply.headers["x-request-id"])
        return True

    for i in range(8):
        question = f"What is the capital of country number {i}?"
        assert chat(pod, question, temperature=0).headers["x-synapse-cache"] == "miss"
        # the answer is stored off the hot path: ask until it comes from the cache
        harness.wait_until(lambda q=question: hit(q), 10, "the answer to be cached")
    # each verdict on a connection of its own, so on either process
    for request_id in hits:
        body = json.dumps({"request_id": request_id, "wrong": False}).encode()
        reply = fleet.request(pod.url, "POST", "/v1/cache/feedback", body)
        assert reply.status == 200, reply.body[:300]
    body = json.dumps({"request_id": hits[0], "wrong": False}).encode()
    again = fleet.request(pod.url, "POST", "/v1/cache/feedback", body)
    assert again.status == 404 and again.json()["error"]["code"] == "unknown_request_id"


def synapsectl(pod: Pod, *args: str) -> None:
    token = pod.tmp / "admin-token"
    token.write_text(fleet.ADMIN_KEY)
    subprocess.run([harness.console_script("synapsectl"), "--server", pod.grpc,
                    "--token-file", str(token), *args], check=True, capture_output=True,
                   timeout=30)


def test_a_cordon_reaches_every_process(pod: Pod) -> None:
    synapsectl(pod, "cordon", "pod-node")     # the primary's Admin service, into Redis
    try:
        harness.wait_until(lambda: all(chat(pod, "cordoned?").status == 503 for _ in range(8)),
                           15, "every process to stop routing to the cordoned node")
    finally:
        synapsectl(pod, "uncordon", "pod-node")
    harness.wait_until(lambda: all(chat(pod, "back?").status == 200 for _ in range(8)), 15,
                       "every process to serve again")


def test_a_dead_worker_is_replaced(pod: Pod) -> None:
    (old,) = workers_of(pod)
    started = listening(pod)
    os.kill(old, signal.SIGKILL)
    harness.wait_until(lambda: workers_of(pod) not in ([], [old]), 30,
                       "the primary to start a new worker", proc=pod.primary)
    harness.wait_until(lambda: listening(pod) > started, 60, "the new worker to serve",
                       proc=pod.primary)
    for i in range(10):
        assert chat(pod, f"after the restart {i}").status == 200


def test_sigterm_stops_every_process(pod: Pod) -> None:
    # last in this module: it stops the pod
    (worker,) = workers_of(pod)
    pod.primary.signal(signal.SIGTERM)
    assert pod.primary.wait(timeout=30) == 0
    harness.wait_until(lambda: not harness.alive(worker), 10, "the worker to exit")
