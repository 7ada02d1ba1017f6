"""Traces (issue 19) as a real OTLP receiver gets them: the control plane with its
response cache (L1, Milvus Lite, the verifier), a real agent Node server embedding with
MiniLM and tracing its Node.Embed, and a backend that records the headers it received.
Everything exports over OTLP/gRPC to :class:`tests.otlp.Receiver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import openai

from agent import node_service, node_tracing
from agent.config import EmbedderSettings
from agent.core import lru
from agent.embedding import minilm, service
from controlplane.api import fairness_wiring, ops
from synapse_common import tracing
from tests import harness, otlp
from tests.controlplane import cp_testing as t
from tests.controlplane import test_cache_support as support

MSGS = [{"role": "user", "content": "What is a GPU?"}]
SERVER, CLIENT = 2, 3       # OTLP span kinds


def client_parent() -> tuple[str, str, str]:
    """(traceparent, trace id, parent span id) of a sampled client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[otlp.Receiver]:
    r = otlp.Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def flush(cp: t.RunningCP) -> None:
    traced = ops.get_tracing(cp.services)
    assert traced is not None
    assert await asyncio.to_thread(traced.force_flush)


@contextlib.asynccontextmanager
async def traced_agent(endpoint: str) -> AsyncIterator[tuple[str, tracing.Tracing]]:
    """A real agent Node server (MiniLM) whose Node.Embed spans go to ``endpoint``."""
    agent_tracing = tracing.setup(tracing.TracingSettings(enabled=True, endpoint=endpoint),
                                  "synapse-agent", "node-1", environ={})
    assert agent_tracing is not None
    cfg = EmbedderSettings(kind="minilm", max_texts=64, max_text_chars=4000)
    emb = minilm.MiniLmEmbedder(cfg, model=support.minilm_model())
    server = node_service.NodeServer(
        service.EmbeddingService(cfg, emb, lru.EmbeddingLru(1000, 10**7)), "127.0.0.1", 0,
        token=support.AGENT_TOKEN,
        interceptors=[node_tracing.TracingInterceptor(agent_tracing)])
    await server.start(embedder_ready=True)
    try:
        yield f"127.0.0.1:{server.port}", agent_tracing
    finally:
        await server.stop(0)
        await emb.close()
        agent_tracing.shutdown()


async def test_a_chat_request_is_one_trace_from_the_client_through_agent_and_backend(
        milvus_lite_path: str) -> None:
    async with receiver() as rx, traced_agent(rx.endpoint) as (node, agent_tracing), \
            t.backends(("one", "ok")) as (backend,):
        cache, _ = await support.build_cache(node, milvus_lite_path)
        s = t.settings(upstreams=[t.upstream("one", backend.url)],
                       tracing={"enabled": True, "endpoint": rx.endpoint})
        async with t.running(s, cache=cache) as cp:
            client = cp.client()
            parent, trace_id, client_span = client_parent()
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", temperature=0, messages=MSGS,
                extra_headers={"traceparent": parent, "tracestate": "vendor=1"})
            assert raw.headers["x-synapse-cache"] == "miss"
            await cache.drain()
            again = await client.chat.completions.with_raw_response.create(
                model="llama", temperature=0, messages=MSGS)
            assert again.headers["x-synapse-cache"] == "hit-exact"
            await flush(cp)
            await asyncio.to_thread(agent_tracing.force_flush)
            spans = otlp.by_name(await rx.wait_for(trace_id, [
                "POST /v1/chat/completions", "auth", "cache.lookup", "cache.l1",
                "cache.embed", "Node.Embed", "cache.l2", "route", "upstream", "cache.write"]))
            await client.close()

    root = spans["POST /v1/chat/completions"][0]
    assert (root.parent_id, root.kind, root.service) == (client_span, SERVER,
                                                         "synapse-controlplane")
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["synapse.tenant"] == "a" and root.attributes["synapse.cache"] == "miss"
    assert root.attributes["gen_ai.usage.input_tokens"] == 5
    for name in ("auth", "cache.lookup", "route", "upstream", "cache.write"):
        assert [s.parent_id for s in spans[name]] == [root.span_id], name
    lookup = spans["cache.lookup"][0]
    for name in ("cache.l1", "cache.embed", "cache.l2"):
        assert spans[name][0].parent_id == lookup.span_id, name
    embed = spans["Node.Embed"][0]
    assert (embed.service, embed.kind, embed.parent_id) == (
        "synapse-agent", SERVER, spans["cache.embed"][0].span_id)
    assert embed.attributes["rpc.grpc.status_code"] == 0
    assert embed.attributes["synapse.embed.texts"] == 1

    route = spans["route"][0].attributes
    assert route["synapse.route.backend"] == "static/one"
    assert route["synapse.route.policy"] == "predicted_ttft"
    assert route["synapse.route.predicted_ttft_ms"] >= 0
    assert route["synapse.route.cached_tokens"] >= 0

    upstream = spans["upstream"][0]
    assert upstream.kind == CLIENT and "first_byte" in upstream.events
    assert upstream.attributes["synapse.backend"] == "static/one"
    # The engine got the trace, its parent being the attempt's span, and the client's
    # tracestate passed on.
    received = backend.headers[0]
    assert received["traceparent"] == f"00-{trace_id}-{upstream.span_id}-01"
    assert received["tracestate"] == "vendor=1"
    # The second request (no traceparent) is a trace of its own: a hit, no upstream.
    roots = [s for s in rx.spans if s.name == "POST /v1/chat/completions"
             and s.trace_id != trace_id]
    assert len(roots) == 1 and roots[0].parent_id == ""
    assert roots[0].attributes["synapse.cache"] == "hit-exact"
    assert "upstream" not in {s.name for s in rx.trace(roots[0].trace_id)}


async def test_each_attempt_is_a_span_and_each_backend_gets_its_own_parent() -> None:
    async with receiver() as rx, t.backends(("bad", "500"), ("good", "ok")) as (bad, good):
        s = t.round_robin(bad, good, tracing={"enabled": True, "endpoint": rx.endpoint})
        async with t.running(s) as cp:
            client = cp.client()
            for _ in range(2):      # round robin: one of the two starts with the bad one
                parent, trace_id, _ = client_parent()
                await client.chat.completions.create(
                    model="llama", messages=MSGS, extra_headers={"traceparent": parent})
                await flush(cp)
                spans = await rx.wait_for(trace_id, ["POST /v1/chat/completions", "upstream"])
                attempts = otlp.by_name(spans)["upstream"]
                if len(attempts) == 2:
                    break
            await client.close()
    first, second = sorted(attempts, key=lambda a: a.attributes["synapse.attempt"])
    assert first.attributes["synapse.backend"] == "static/bad"
    assert first.status_code == 2 and first.attributes["http.response.status_code"] == 500
    assert second.attributes["synapse.backend"] == "static/good" and second.status_code != 2
    assert bad.headers[-1]["traceparent"] == f"00-{trace_id}-{first.span_id}-01"
    assert good.headers[-1]["traceparent"] == f"00-{trace_id}-{second.span_id}-01"
    root = otlp.by_name(spans)["POST /v1/chat/completions"][0]
    assert root.attributes["synapse.retries"] == 1


async def test_a_queued_stream_has_a_queue_wait_span_and_a_first_byte_event() -> None:
    fair = {"queue": {"enabled": True, "max_queue_wait_s": 0.0, "poll_interval_s": 0.02}}
    async with receiver() as rx, t.backends(("one", "slow")) as (backend,):
        s = t.settings(upstreams=[t.upstream("one", backend.url)], fairness=fair,
                       tracing={"enabled": True, "endpoint": rx.endpoint})
        async with t.running(s) as cp:
            client = cp.client()
            gate = fairness_wiring.get(cp.services).gate
            assert gate is not None

            async def stream(parent: str) -> str:
                chunks = await client.chat.completions.create(
                    model="llama", messages=MSGS, stream=True,
                    extra_headers={"traceparent": parent})
                return "".join([c.choices[0].delta.content or "" async for c in chunks
                                if c.choices])

            first, _, _ = client_parent()
            second, trace_id, _ = client_parent()
            busy = asyncio.create_task(stream(first))
            await harness.until(lambda: len(backend.bodies) == 1, 20, "the first stream")
            waiting = asyncio.create_task(stream(second))
            await harness.until(lambda: gate.depth(t.MODEL) == 1, 20, "the second to queue")
            assert await asyncio.gather(busy, waiting) == ["hello from one"] * 2
            await flush(cp)
            spans = otlp.by_name(await rx.wait_for(trace_id, ["queue.wait", "upstream"]))
            await client.close()
    root = spans["POST /v1/chat/completions"][0]
    queued = spans["queue.wait"][0]
    assert queued.parent_id == root.span_id
    assert queued.attributes["synapse.queue.class"] == "interactive"
    assert [r.parent_id for r in spans["route"]] == [root.span_id] * 2   # routed again
    upstream = spans["upstream"][0]
    assert queued.end_ns <= upstream.start_ns and "first_byte" in upstream.events


async def test_tracing_off_forwards_a_valid_client_traceparent_unchanged() -> None:
    async with t.backends(("one", "ok")) as (backend,):
        async with t.running(t.settings(upstreams=[t.upstream("one", backend.url)])) as cp:
            assert ops.get_tracing(cp.services) is None
            client = cp.client()
            parent, _, _ = client_parent()
            for headers in ({"traceparent": parent, "tracestate": "a=1"}, {},
                            {"traceparent": "00-not-a-trace-01"}):
                await client.chat.completions.create(model="llama", messages=MSGS,
                                                     extra_headers=headers)
            await client.close()
    forwarded = [{k: v for k, v in h.items() if k.lower() in ("traceparent", "tracestate")}
                 for h in backend.headers]
    assert forwarded == [{"traceparent": parent, "tracestate": "a=1"}, {}, {}]


async def test_an_unsampled_request_records_nothing_and_tells_the_backend_so() -> None:
    """A tenant's sampled flag does not override ``sampling_ratio`` (else any tenant would
    decide how many traces the operator pays for): it does with honour_client_sampling."""
    async with receiver() as rx, t.backends(("one", "ok")) as (backend,):
        for honour in (False, True):
            s = t.settings(upstreams=[t.upstream("one", backend.url)],
                           tracing={"enabled": True, "endpoint": rx.endpoint,
                                    "sampling_ratio": 0.0, "honour_client_sampling": honour})
            async with t.running(s) as cp:
                client = cp.client()
                await client.chat.completions.create(model="llama", messages=MSGS)
                parent, trace_id, _ = client_parent()
                await client.chat.completions.create(model="llama", messages=MSGS,
                                                     extra_headers={"traceparent": parent})
                await flush(cp)
                if honour:
                    await rx.wait_for(trace_id, ["upstream"])
                await client.close()
            if not honour:
                assert rx.spans == []
                client_trace = backend.headers[1]["traceparent"].split("-")
                assert client_trace[1] == trace_id and int(client_trace[3], 16) & 1 == 0
    _, unsampled_trace, _, flags = backend.headers[0]["traceparent"].split("-")
    assert int(flags, 16) & 1 == 0 and unsampled_trace != trace_id    # "not sampled"
    assert {s.trace_id for s in rx.spans} == {trace_id}


async def test_errors_are_marked_on_the_root_span() -> None:
    async with receiver() as rx, t.backends(("bad", "500")) as (bad,):
        s = t.settings(upstreams=[t.upstream("bad", bad.url)],
                       tracing={"enabled": True, "endpoint": rx.endpoint})
        async with t.running(s) as cp:
            client = cp.client()
            parent, trace_id, _ = client_parent()
            try:
                await client.chat.completions.create(model="llama", messages=MSGS,
                                                     extra_headers={"traceparent": parent})
            except openai.APIStatusError as exc:
                assert exc.status_code == 502
            await flush(cp)
            spans = otlp.by_name(await rx.wait_for(trace_id, ["POST /v1/chat/completions"]))
            await client.close()
    root = spans["POST /v1/chat/completions"][0]
    assert root.status_code == 2 and root.attributes["http.response.status_code"] == 502
