"""Tracing and the access log of the real processes (issue 19): ``synapse controlplane``
(``tracing.enabled`` in its file, the endpoint and service name from the standard
``OTEL_*`` variables, ``--log-format json``) and ``synapse agent`` (MiniLM, its own
``tracing`` section) export to a real OTLP/gRPC receiver; a chat request with a
``traceparent`` goes through the cache (Node.Embed on the agent) to a backend that
records the headers it got.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import secrets

import openai

from tests import fleet, harness, otlp
from tests.controlplane import cp_testing as t

MSGS = [{"role": "user", "content": "How do I reset my password?"}]


def start(pool: harness.ProcessPool, name: str, config: dict, env: dict[str, str],
          ready_url: str | None = None) -> harness.ManagedProcess:
    path = fleet.write_yaml(pool.workdir / f"{name}.yaml", config)
    argv = ["synapse", name.split("-")[0], "--config", str(path), "--log-format", "json"]
    return pool.start(name, argv, env=env, ready_url=ready_url, timeout=90)


def nodes_ready(url: str) -> int:
    try:
        return int(fleet.stats(url)["nodes_ready"])
    except (OSError, ValueError, KeyError):
        return 0


async def test_the_processes_trace_a_request_and_log_it(tmp_path: pathlib.Path) -> None:
    pool = harness.ProcessPool(tmp_path)
    rx = otlp.Receiver()
    await rx.start()
    fast = {"OTEL_BSP_SCHEDULE_DELAY": "200"}       # export every 0.2 s, not every 5 s
    try:
        async with t.backends(("one", "ok")) as (backend,):
            http, grpc_port = harness.free_port(), harness.free_port()
            url = f"http://127.0.0.1:{http}"
            cp = fleet.controlplane_config(
                "trace-cp", http, grpc_port, tmp_path / "data",
                upstreams=[{"name": "one", "url": backend.url, "models": [fleet.MODEL]}],
                cache={"semantic_enabled": True, "semantic_budget_ms": 10000,
                       "l1_budget_ms": 1000},
                tracing={"enabled": True})
            await asyncio.to_thread(start, pool, "controlplane", cp, {
                **fast, "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
                "OTEL_SERVICE_NAME": "gateway-under-test"}, f"{url}/health")
            agent = fleet.agent_config("trace-node", [f"127.0.0.1:{grpc_port}"], {},
                                       tmp_path / "engines")
            agent.update(embedder={"kind": "minilm"},
                         tracing={"enabled": True, "endpoint": rx.endpoint})
            agent_proc = await asyncio.to_thread(start, pool, "agent", agent, fast)
            await asyncio.to_thread(
                harness.wait_until, lambda: fleet.node_embeds(
                    agent["grpc"]["advertise_address"]) and nodes_ready(url) >= 1, 120,
                "the agent's MiniLM and its registration", proc=agent_proc, interval=0.3)

            trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=fleet.TENANT_KEY,
                                          max_retries=0, timeout=30)
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", temperature=0, messages=MSGS,
                extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
            await client.close()
            spans = otlp.by_name(await rx.wait_for(trace_id, [
                "POST /v1/chat/completions", "cache.embed", "Node.Embed", "route",
                "upstream"]))
            received = backend.headers[0]["traceparent"]
    finally:
        await asyncio.to_thread(pool.stop_all)
        await rx.stop()

    root = spans["POST /v1/chat/completions"][0]
    assert (root.service, root.parent_id) == ("gateway-under-test", client_span)
    embed = spans["Node.Embed"][0]
    assert (embed.service, embed.parent_id) == ("synapse-agent",
                                                spans["cache.embed"][0].span_id)
    upstream = spans["upstream"][0]
    assert received == f"00-{trace_id}-{upstream.span_id}-01"

    request_id = raw.headers["x-request-id"]
    lines = [json.loads(line) for line in (tmp_path / "controlplane.log").read_text(
        "utf-8", errors="replace").splitlines() if line.startswith("{")]
    access = [line for line in lines
              if line.get("logger") == "synapse.access" and line["request_id"] == request_id]
    assert len(access) == 1, lines[-5:]
    line = access[0]
    assert (line["tenant"], line["model"], line["model_served"]) == ("team", "llama",
                                                                     fleet.MODEL)
    assert (line["status"], line["cache"], line["backend"]) == (200, "miss", "static/one")
    assert line["trace_id"] == trace_id and line["prompt_tokens"] == 5
    assert not fleet.scan_for_secrets([tmp_path / "controlplane.log"])
