"""The dispatch policy behind the transport seam: retries before the first byte, the ledger
settled once per attempt on every path, the first token of a stream, the plan's 400 for a
request no backend can hold. A :class:`MockTransport` scripts each backend's answer, so no
test waits for a timeout: a timeout is an answer like any other.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from controlplane import errors, metrics
from controlplane.core import catalog, dispatch, ledger, prefix_index, registry, router, types
from controlplane.core.mock_transport import MockResponse, MockTransport, Request
from tests.clock import ManualClock

MODEL = "m"
CHAT = "/v1/chat/completions"
IDLE_S = 7.0


def sse(*events: bytes) -> list[bytes]:
    return [b"data: " + e + b"\n\n" for e in events]


def stack(names: tuple[str, ...], *, capacity: int = 0, attempts: int = 3,
          fallbacks: tuple[str, ...] = ()) -> tuple[dispatch.Dispatcher, MockTransport, metrics.Metrics]:
    clock = ManualClock()
    reg = registry.Registry(clock, 15.0)
    reg.register(types.NodeInfo("n1"))
    reg.report("n1", [types.BackendState(
        key=f"n1/{n}", node="n1", name=n, url=f"http://{n}.internal:8000", models=(MODEL,),
        kv_capacity_tokens=capacity, api_key="sk-backend" if n == "keyed" else None)
        for n in names])
    rtr = router.Router(router.Params(policy="round_robin"), reg, ledger.Ledger(clock),
                        prefix_index.PrefixIndex(1000))
    cat = catalog.Catalog([catalog.ModelEntry(MODEL, (), fallbacks)])
    m = metrics.Metrics(CollectorRegistry())
    mock = MockTransport(lambda req: MockResponse())
    d = dispatch.Dispatcher(mock, rtr, cat, reg, m, dispatch.Policy(attempts, 5.0, IDLE_S))
    return d, mock, m


def by_host(answers: dict[str, MockResponse | Exception]) -> Callable[[Request], MockResponse]:
    """Answers by backend name (the URL's first host label)."""
    def handler(req: Request) -> MockResponse:
        answer = answers[req.url.split("//")[1].split(".")[0]]
        if isinstance(answer, Exception):
            raise answer
        return answer
    return handler


def failing(exc: Exception) -> Callable[[Request], MockResponse]:
    def handler(req: Request) -> MockResponse:
        raise exc
    return handler


def route(d: dispatch.Dispatcher, max_tokens: int = 0) -> tuple[types.RouteDecision,
                                                               router.Prompt]:
    prompt = router.Prompt.from_text("hello there", max_tokens)
    return d.plan(MODEL, prompt).route, prompt


def in_flight(d: dispatch.Dispatcher) -> dict[str, int]:
    return {k: v.in_flight for k, v in d.router.ledger.snapshot().items()}


def retries(m: metrics.Metrics, reason: str) -> float:
    return float(m.upstream_retries.labels(MODEL, reason)._value.get())


async def test_connect_errors_5xx_and_timeouts_move_to_the_next_backend() -> None:
    d, mock, m = stack(("a", "b", "c", "d"), attempts=4)
    bad = MockResponse(500, [b'{"error": "boom"}'])
    mock.handler = by_host({"a": errors.UpstreamConnectError("cannot connect: Connection refused"),
                            "b": bad, "c": errors.UpstreamTimeout("no response within 5s"),
                            "d": MockResponse(200, [b'{"ok": 1}'])})
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "rid-1") as attempt:
        assert (attempt.backend.name, attempt.index) == ("d", 3)
        assert in_flight(d)["n1/d"] == 1
        assert await attempt.read() == b'{"ok": 1}'
    assert (retries(m, "connect"), retries(m, "5xx"), retries(m, "timeout")) == (1, 1, 1)
    assert bad.closed and mock.responses[-1].closed
    assert set(in_flight(d).values()) == {0}, "every attempt's ticket was settled"
    # Engines never get the caller's id (a client may choose it, and vLLM aborts by it):
    # one id of Synapse's for every attempt of the request.
    sent = {r.headers["x-request-id"] for r in mock.requests}
    assert len(sent) == 1 and "rid-1" not in sent
    assert {r.timeout_s for r in mock.requests} == {5.0}, "the first-byte limit, each time"


async def test_when_every_candidate_fails_the_last_failure_names_the_backend_not_its_address(
        ) -> None:
    d, mock, _ = stack(("a", "b"))
    mock.handler = by_host({"a": errors.UpstreamConnectError("cannot connect: Connection refused"),
                            "b": MockResponse(503, [b"overloaded, try later"])})
    decision, prompt = route(d)
    with pytest.raises(errors.UpstreamError) as info:
        async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
            raise AssertionError("no attempt should be handed over")
    assert info.value.message == "backend n1/b answered with status 503: overloaded, try later"
    assert info.value.http_status == 502 and "internal" not in info.value.message
    for failure, message in [
            (errors.UpstreamTimeout("no response within 5s"), "sent no response within 5s"),
            (errors.UpstreamConnectError("cannot connect: Connection refused"),
             "failed: cannot connect: Connection refused")]:
        mock.handler = failing(failure)
        decision, prompt = route(d)
        with pytest.raises(type(failure)) as caught:
            async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
                pass
        assert caught.value.message in (f"backend n1/a {message}", f"backend n1/b {message}")
        assert "internal" not in caught.value.message
    assert set(in_flight(d).values()) == {0}


async def test_max_attempts_and_a_4xx_is_the_clients() -> None:
    d, mock, _ = stack(("a", "b", "c"), attempts=2)
    mock.handler = failing(errors.UpstreamTimeout("no response"))
    decision, prompt = route(d)
    with pytest.raises(errors.UpstreamTimeout, match="sent no response"):
        async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
            pass
    assert len(mock.requests) == 2
    mock.handler = lambda req: MockResponse(400, [b'{"detail": "bad"}'])
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        assert attempt.status == 400 and attempt.index == 0
    assert len(mock.requests) == 3


async def test_the_backend_key_travels_as_authorization() -> None:
    d, mock, _ = stack(("keyed",))
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        await attempt.read()
    assert mock.requests[0].headers["Authorization"] == "Bearer sk-backend"


async def test_a_chat_streams_first_byte_is_its_first_token_event() -> None:
    d, mock, _ = stack(("a",))
    body = sse(b'{"role": 1}', b'{"tok": 1}', b'{"tok": 2}', b"[DONE]")
    mock.handler = lambda req: MockResponse(200, body, "text/event-stream")
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        load = d.router.ledger.load("n1/a")
        assert await attempt.next_chunk() == body[0]
        assert (load.prefilling, load.decoding) == (1, 0), "a role event is not a token"
        assert await attempt.next_chunk() == body[1]
        assert (load.prefilling, load.decoding) == (0, 1)
        while await attempt.next_chunk() is not None:
            pass
        assert attempt.ticket is not None and attempt.ticket.streamed
    assert mock.responses[0].read_timeouts == [IDLE_S] * 5, "every wait has the idle limit"
    assert load.in_flight == 0


@pytest.mark.parametrize(("chunks", "message"), [
    ([b"data: {}\n\n", errors.UpstreamReadError("the backend closed the connection")],
     "backend n1/a broke off: the backend closed the connection"),
    ([b"data: {}\n\n"], "backend n1/a's stream ended before [DONE]"),
])
async def test_after_a_streams_first_chunk_nothing_is_retried(
        chunks: list[bytes | Exception], message: str) -> None:
    d, mock, m = stack(("a", "b"))
    mock.handler = lambda req: MockResponse(200, chunks, "text/event-stream")
    decision, prompt = route(d)
    with pytest.raises(errors.UpstreamReadError) as info:
        async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
            while await attempt.next_chunk() is not None:
                pass
    assert attempt.streaming, "the caller had sent the first chunk"
    assert info.value.message.startswith(message)
    assert len(mock.requests) == 1 and retries(m, "stream") == 0
    assert in_flight(d) == {"n1/a": 0, "n1/b": 0} and mock.responses[0].closed


@pytest.mark.parametrize(("chunks", "message"), [
    ([errors.UpstreamReadError("the backend sent nothing within the read timeout")],
     "backend n1/a broke off before its first chunk: the backend sent nothing"),
    ([], "backend n1/a sent an empty stream"),
])
async def test_a_stream_that_breaks_before_its_first_chunk_is_retried(
        chunks: list[bytes | Exception], message: str) -> None:
    d, mock, m = stack(("a", "b"))
    good = sse(b'{"role": 1}', b'{"tok": 1}', b"[DONE]")
    mock.handler = by_host({"a": MockResponse(200, list(chunks), "text/event-stream"),
                            "b": MockResponse(200, good, "text/event-stream")})
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        assert attempt.backend.name == "b" and attempt.index == 1
        got = [chunk async for chunk in _chunks(attempt)]
    assert got == good and retries(m, "stream") == 1
    assert set(in_flight(d).values()) == {0} and mock.responses[0].closed
    # With no other backend, the same failure is the request's (nothing was sent).
    alone, mock, _ = stack(("a",))
    mock.handler = lambda req: MockResponse(200, list(chunks), "text/event-stream")
    decision, prompt = route(alone)
    with pytest.raises(errors.UpstreamReadError) as info:
        async with alone.exchange(decision, prompt, CHAT, b"{}", "r"):
            raise AssertionError("a stream broken before its first chunk is never handed over")
    assert info.value.message.startswith(message)


async def test_a_whole_answer_cut_before_its_end_is_retried() -> None:
    d, mock, m = stack(("a", "b"))
    mock.handler = by_host({
        "a": MockResponse(200, [b'{"cho', errors.UpstreamReadError("connection reset")]),
        "b": MockResponse(200, [b'{"ok": 1}'])})
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        assert attempt.backend.name == "b" and await attempt.read() == b'{"ok": 1}'
    assert retries(m, "read") == 1


async def _chunks(attempt: dispatch.Attempt) -> AsyncIterator[bytes]:
    while (chunk := await attempt.next_chunk()) is not None:
        yield chunk


async def test_a_cancelled_relay_settles_the_ledger_and_closes_the_answer() -> None:
    d, mock, _ = stack(("a",))
    started = asyncio.Event()

    async def relay() -> None:
        decision, prompt = route(d)
        async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
            started.set()
            await asyncio.Event().wait()        # the client went away meanwhile

    task = asyncio.create_task(relay())
    await started.wait()
    assert in_flight(d) == {"n1/a": 1}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert in_flight(d) == {"n1/a": 0} and mock.responses[0].closed


def test_a_request_larger_than_every_backends_context_is_the_clients_error() -> None:
    d, _, _ = stack(("a", "b"), capacity=4096)
    prompt = router.Prompt.from_text("hello there", 100_000_000)
    with pytest.raises(errors.BadRequest) as info:
        d.plan(MODEL, prompt)
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
    assert "KV cache of any backend" in info.value.message and "4096" in info.value.message
    with pytest.raises(errors.BadRequest) as info:
        d.plan(MODEL, router.Prompt.from_text("word " * 40_000), ("prompt", "max_tokens"))
    assert info.value.param == "prompt"
    unknown, _, _ = stack(("a",), capacity=0)
    # A backend that does not say its size is sent the request: it is the judge.
    assert unknown.plan(MODEL, router.Prompt.from_text("hello", 10**8)).route.candidates


def serve(d: dispatch.Dispatcher, backends: dict[str, str],
          chains: dict[str, tuple[str, ...]], **extra: object) -> None:
    """Backends by name → model on node n1, and the models' fallbacks."""
    d.registry.report("n1", [types.BackendState(
        key=f"n1/{name}", node="n1", name=name, url=f"http://{name}.internal:8000",
        models=(model,), **extra) for name, model in backends.items()])  # type: ignore[arg-type]
    d.catalog = catalog.Catalog([catalog.ModelEntry(m, (), f) for m, f in chains.items()])


def test_fallbacks_are_planned_in_order_then_theirs_and_only_those_the_tenant_may_use(
        ) -> None:
    d, _, _ = stack(("a",))
    serve(d, {"fb": "f"}, {MODEL: ("g", "f"), "g": ("h",), "f": ("h", MODEL), "h": ()})
    assert d.chain(MODEL) == (MODEL, "g", "f", "h")
    plan = d.plan(MODEL, router.Prompt.from_text("hi"))
    assert (plan.fallback, plan.route.model, plan.chain) == ("f", "f", (MODEL, "g", "f", "h"))
    # A tenant allowed only MODEL and g: f (the only one that could serve) is skipped.
    allowed = {MODEL, "g"}.__contains__
    assert d.chain(MODEL, allowed) == (MODEL, "g")
    with pytest.raises(errors.Unavailable, match=r"tried: m, g\)"):
        d.plan(MODEL, router.Prompt.from_text("hi"), allows=allowed)


async def test_when_every_backend_of_a_model_failed_the_next_model_serves() -> None:
    d, mock, m = stack(("a",))
    serve(d, {"a": MODEL, "b": MODEL, "fb": "f"}, {MODEL: ("f",), "f": ()})
    mock.handler = by_host({"a": MockResponse(500, [b"boom"]),
                            "b": errors.UpstreamConnectError("cannot connect"),
                            "fb": MockResponse(200, [b'{"model": "f"}'])})
    plan = d.plan(MODEL, router.Prompt.from_text("hi"))
    assert plan.route.model == MODEL
    async with d.exchange(plan.route, router.Prompt.from_text("hi"), CHAT,
                          b'{"model": "m"}', "r", chain=plan.chain) as attempt:
        assert (attempt.model, attempt.backend.name, attempt.index) == ("f", "fb", 0)
        assert await attempt.read() == b'{"model": "f"}'
    assert [r.url.split("//")[1].split(".")[0] for r in mock.requests] == ["a", "b", "fb"]
    assert mock.requests[-1].body == b'{"model":"f"}', "the body names the fallback model"
    assert m.fallbacks.labels(MODEL, "f")._value.get() == 1
    assert set(in_flight(d).values()) == {0}
    # Without the chain (a caller that wants no fallback) the failure is the request's.
    with pytest.raises(errors.UpstreamError):
        async with d.exchange(d.plan(MODEL, router.Prompt.from_text("x")).route,
                              router.Prompt.from_text("x"), CHAT, b"{}", "r"):
            pass


async def test_the_fallback_shares_the_request_deadline() -> None:
    d, mock, _ = stack(("a",))
    clock = ManualClock()
    d = dispatch.Dispatcher(d.transport, d.router, d.catalog, d.registry, d.metrics,
                            dispatch.Policy(3, 5.0, IDLE_S, deadline_s=8.0), clock=clock)
    serve(d, {"a": MODEL, "b": MODEL, "fb": "f"}, {MODEL: ("f",), "f": ()})

    def slow(req: Request) -> MockResponse:
        clock.now += req.timeout_s or 0         # each hangs until its time-out
        raise errors.UpstreamTimeout(f"no response within {req.timeout_s:g}s")

    mock = MockTransport(slow)
    d.transport = mock
    plan = d.plan(MODEL, router.Prompt.from_text("hi"))
    with pytest.raises(errors.UpstreamTimeout):
        async with d.exchange(plan.route, router.Prompt.from_text("hi"), CHAT, b"{}", "r",
                              chain=plan.chain):
            pass
    assert [r.timeout_s for r in mock.requests] == [5.0, 3.0], "8 s in all, then no more"


async def test_a_backend_that_renames_the_model_gets_its_name_and_answers_with_ours() -> None:
    d, mock, _ = stack(("a",))
    serve(d, {"o": MODEL}, {MODEL: ()}, upstream_models=((MODEL, "llama3.1:8b"),))
    events = [b'data: {"model":"llama3.1:8b","choices":[{"delta":{"role":"assistant"}}]}\n\n'
              b'data: {"mod', b'el":"llama3.1:8b","choices":[{"delta":{"content":"hi"}}]}\n',
              b"\ndata: [DONE]\n\n"]
    mock.handler = lambda req: MockResponse(200, events, "text/event-stream")
    body = b'{"model": "m", "stream": true, "x-unknown": [1]}'
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, body, "r", requested="llama") as attempt:
        got = b"".join([chunk async for chunk in _chunks(attempt)])
    assert mock.requests[0].body == b'{"model":"llama3.1:8b","stream":true,"x-unknown":[1]}'
    assert got == (b'data: {"model":"llama","choices":[{"delta":{"role":"assistant"}}]}\n\n'
                   b'data: {"model":"llama","choices":[{"delta":{"content":"hi"}}]}\n\n'
                   b"data: [DONE]\n\n")
    mock.handler = lambda req: MockResponse(200, [b'{"model":"llama3.1:8b","choices":[]}'])
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, body, "r", requested=MODEL) as attempt:
        assert await attempt.read() == b'{"model":"m","choices":[]}'


async def test_other_calls_share_the_retry_budget_and_name_no_target() -> None:
    d, _, _ = stack(("a",), attempts=2)
    tried: list[str] = []

    async def call(target: str) -> str:
        tried.append(target)
        if target != "third":
            raise LookupError("the embedder is loading")
        return "vectors"

    with pytest.raises(errors.UpstreamError) as info:
        await d.first_answer(["first", "second", "third"], call, LookupError, "agent embedder")
    assert tried == ["first", "second"]
    assert info.value.message == ("every agent embedder failed; last error: "
                                  "the embedder is loading")
    d.policy = dispatch.Policy(3, 5.0, IDLE_S)
    assert await d.first_answer(["first", "second", "third"], call, LookupError, "x") == \
        ("third", "vectors")


async def test_engines_get_the_id_synapse_made_for_the_request_never_the_clients() -> None:
    d, mock, _ = stack(("a",))
    mock.handler = by_host({"a": MockResponse(200, [b'{"ok": 1}'])})
    for _ in range(2):
        decision, prompt = route(d)
        async with d.exchange(decision, prompt, CHAT, b"{}", "client-chosen") as attempt:
            await attempt.read()
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "client-chosen",
                          engine_id="synapse-made") as attempt:
        await attempt.read()
    first, second, third = (r.headers["x-request-id"] for r in mock.requests)
    assert "client-chosen" not in (first, second, third)
    assert first != second, "each request its own"
    assert third == "synapse-made"


@pytest.mark.parametrize("status", [401, 403])
async def test_a_backend_refusing_synapses_key_is_failed_over_and_its_answer_not_relayed(
        status: int) -> None:
    """The client's key never reaches a backend, so a 401/403 is about Synapse's own key:
    relayed, it told the tenant its key was wrong and quoted the upstream's api_key (hosted
    APIs echo the key they were given). Found by the hostile-tenant probe."""
    echo = b'{"error": {"message": "Incorrect API key provided: sk-backend"}}'
    d, mock, m = stack(("keyed", "z"))     # round robin: n1/keyed is tried first
    mock.handler = by_host({"keyed": MockResponse(status, [echo]),
                            "z": MockResponse(200, [b'{"ok": 1}'])})
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        assert attempt.backend.name == "z" and await attempt.read() == b'{"ok": 1}'
    assert retries(m, "auth") == 1
    d, mock, _ = stack(("keyed",))
    mock.handler = lambda req: MockResponse(status, [echo])
    decision, prompt = route(d)
    with pytest.raises(errors.UpstreamError) as info:
        async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
            raise AssertionError("no attempt should be handed over")
    assert info.value.http_status == 502 and "sk-backend" not in info.value.message
    assert "refused Synapse's credentials" in info.value.message


async def test_a_5xx_detail_never_quotes_the_backends_key() -> None:
    d, mock, _ = stack(("keyed",))
    mock.handler = lambda req: MockResponse(500, [b"bad key sk-backend in upstream"])
    decision, prompt = route(d)
    with pytest.raises(errors.UpstreamError) as info:
        async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
            pass
    assert "sk-backend" not in info.value.message and "bad key" in info.value.message


async def test_a_refusal_relayed_to_the_client_never_quotes_the_backends_key() -> None:
    """A 4xx is the client's and is relayed, but hosted APIs quote the key they were
    given in their refusals too: the whole key is masked in the body the caller relays,
    whatever shape it then takes, in the spellings it is quoted in (probe 82, F10)."""
    key = "sk-UPSTREAM-hunter2/abcdef123456+xyz"
    d, mock, _ = stack(("a",))
    d.registry.report("n1", [types.BackendState(
        key="n1/a", node="n1", name="a", url="http://a.internal:8000", models=(MODEL,),
        api_key=key)])
    refusals = [b'{"error": {"message": "your key Bearer ' + key.encode() + b' was rejected"}}',
                b'{"detail": "bad ' + json.dumps(key).encode().replace(b"/", b"\\/") + b'"}',
                b"quoted twice: " + key.encode() + b" and " + key.encode()]
    for status, body in zip((400, 404, 422), refusals, strict=True):
        mock.handler = lambda req, status=status, body=body: MockResponse(status, [body])
        decision, prompt = route(d)
        async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
            relayed = await attempt.read()
        assert attempt.status == status
        assert b"hunter2" not in relayed and b"[its api_key]" in relayed, relayed
    assert relayed == b"quoted twice: [its api_key] and [its api_key]"
    quoted = urllib.parse.quote(key, safe="")
    for spelled in (quoted, quoted.replace("%2F", "%2f").replace("%2B", "%2b"),
                    base64.b64encode(key.encode()).decode(),
                    base64.b64encode(b"user:" + key.encode()).decode()):
        out = errors.masked(b"auth " + spelled.encode() + b" refused", key)
        assert b"[its api_key]" in out and spelled[8:-8].encode() not in out, spelled
    assert errors.masked(b"no key here", key) == b"no key here"
    assert errors.masked(b"k sk-short!", "sk-short") == b"k [its api_key]!"


async def test_a_refusal_quoting_the_tenants_guesses_tells_nothing_of_the_key() -> None:
    """Review 90, F1: pieces of 12 characters of the key were masked too, and refusals
    quote the tenant's own text (a bad field's value), so a tenant sending guesses
    learnt which were pieces of the key, and extended one a character at a time. Only
    the whole key is masked: the tenant's text comes back as it was sent."""
    key = "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"
    d, mock, _ = stack(("a",))
    d.registry.report("n1", [types.BackendState(
        key="n1/a", node="n1", name="a", url="http://a.internal:8000", models=(MODEL,),
        api_key=key)])
    guesses = ",".join([key[:12], key[:20], key[5:40], key[:-1], key[1:]]).encode()
    echo = b'{"error": {"message": "invalid value: ' + guesses + b'"}}'
    mock.handler = lambda req: MockResponse(400, [echo])
    decision, prompt = route(d)
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        assert await attempt.read() == echo, "the tenant's own text, unchanged"
    big = (key[:12].encode() + b" ") * 700_000        # 8 MiB of a piece, whole key once
    assert errors.masked(big + key.encode(), key) == big + b"[its api_key]"


async def test_a_5xx_detail_is_masked_before_it_is_cut() -> None:
    """Review 90, F6: the detail was cut at its 300 bytes and masked after, so a key
    quoted across the cut left its first characters in the message; a read that stopped
    inside the key did the same."""
    key = "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"
    for at in (280, 290, 299):
        for chunks in ([b"x" * at + key.encode() + b" tail"],
                       [b"x" * at + key[:30].encode(), key[30:].encode() + b" tail"],
                       [b"x" * at + key[:15].encode(), errors.UpstreamReadError("reset")]):
            d, mock, _ = stack(("a",))
            d.registry.report("n1", [types.BackendState(
                key="n1/a", node="n1", name="a", url="http://a.internal:8000",
                models=(MODEL,), api_key=key)])
            mock.handler = lambda req, chunks=chunks: MockResponse(500, list(chunks))
            decision, prompt = route(d)
            with pytest.raises(errors.UpstreamError) as info:
                async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
                    pass
            assert "sk-or" not in info.value.message and "xxxx" in info.value.message, (
                at, info.value.message[-40:])


async def test_a_spent_whole_answer_budget_is_503_and_not_failed_over() -> None:
    """An answer refused for want of the process's memory for whole answers was failed
    over like a broken one: every other backend recomputed a large answer to be refused
    alike. It is nobody's fault: 503 with Retry-After, no other backend tried; an answer
    over the per-answer cap is its backend's and still fails over."""
    from controlplane.adapters import http1

    d, mock, m = stack(("a", "b"))
    spent = errors.UpstreamProtocolError("does not fit", code="upstream_busy")
    mock.handler = lambda req: MockResponse(200, [b'{"da', spent])
    decision, prompt = route(d)
    with pytest.raises(errors.Unavailable) as info:
        async with d.exchange(decision, prompt, CHAT, b"{}", "r"):
            raise AssertionError("never handed over")
    assert info.value.http_status == 503 and info.value.code == "upstream_busy"
    assert info.value.headers() == {"Retry-After": "1"}
    assert len(mock.requests) == 1 and retries(m, "read") == 0
    assert set(in_flight(d).values()) == {0} and mock.responses[0].closed
    too_large = errors.UpstreamProtocolError("over", code="upstream_too_large")
    mock.handler = by_host({"a": MockResponse(200, [b'{"da', too_large]),
                            "b": MockResponse(200, [b'{"ok": 1}'])})
    async with d.exchange(decision, prompt, CHAT, b"{}", "r") as attempt:
        assert attempt.index == 1 and await attempt.read() == b'{"ok": 1}'
    assert http1.BUDGET_SPENT == errors.BUSY_CODE, "the transport's code is the one read"
