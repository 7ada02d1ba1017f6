"""The serving path through the official openai client: answers, headers, every error."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import openai
import pytest

from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane import test_responses_tenancy as responses_engine


async def test_chat_and_completions_pass_through_with_headers() -> None:
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            client = cp.client()
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", messages=[{"role": "user", "content": "hi"}],
                extra_body={"my_new_field": {"x": 1}})
            reply = raw.parse()
            assert reply.choices[0].message.content == "hello from one"
            assert raw.headers["x-synapse-cache"] == "bypass"
            assert raw.headers["x-synapse-backend"] == "static/one"
            assert raw.headers["x-synapse-route"]
            assert len(raw.headers["x-request-id"]) >= 8
            sent = json.loads(b.bodies[-1])
            # The alias became the canonical model; the unknown field arrived untouched.
            assert sent["model"] == t.MODEL and sent["my_new_field"] == {"x": 1}
            # The client's key never reaches the backend.
            assert t.KEY_A not in json.dumps(b.headers[-1])

            done = await client.completions.create(model=t.MODEL, prompt="Once upon")
            assert done.choices[0].text == "hello from one"
            await client.close()


async def test_canonical_name_forwards_the_exact_bytes() -> None:
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            raw = (b'{"model": "%s",  "messages": [{"role": "user", "content": "hi"}],'
                   b' "zz_unknown": [1, 2]}' % t.MODEL.encode())
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{cp.url}/v1/chat/completions", data=raw,
                                  headers={"Authorization": f"Bearer {t.KEY_A}"}) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-request-id"]
            assert b.bodies[-1] == raw


async def test_streaming_passes_chunks_and_usage_through() -> None:
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            client = cp.client()
            stream = await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            assert text == "hello from one"
            assert usage is not None and usage.total_tokens == 8
            await client.close()


async def test_every_error_status_is_an_openai_error() -> None:
    s = t.settings(upstreams=[t.upstream("one", "http://127.0.0.1:9")],
                   models=[{"name": t.MODEL, "aliases": ["llama"]},
                           {"name": "private-model"}],
                   auth={"tenants": [{"name": "a", "keys": [t.KEY_A],
                                      "allowed_models": ["llama"]}]})
    async with t.running(s) as cp:
        client = cp.client()
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError) as e401:
            await cp.client("sk-wrong").chat.completions.create(model="llama", messages=msgs)
        assert e401.value.status_code == 401 and e401.value.code == "invalid_api_key"
        with pytest.raises(openai.BadRequestError) as e400:
            await client.chat.completions.create(model="llama",
                                                 messages=[{"content": "no role"}])
        assert e400.value.param == "messages[0].role"
        with pytest.raises(openai.BadRequestError) as e400b:
            await client.chat.completions.create(model="llama", messages=msgs,
                                                 temperature=7)
        assert e400b.value.param == "temperature"
        with pytest.raises(openai.NotFoundError) as e404:
            await client.chat.completions.create(model="no-such-model", messages=msgs)
        assert "GET /v1/models" in e404.value.message
        # A model the tenant may not use is answered as one that does not exist: the
        # answer tells nothing of other tenants' models.
        with pytest.raises(openai.NotFoundError) as e404private:
            await client.chat.completions.create(model="private-model", messages=msgs)
        unknown = e404.value.body
        assert isinstance(unknown, dict)
        assert e404private.value.body == {**unknown, "message": unknown["message"].replace(
            "no-such-model", "private-model")}
        with pytest.raises(openai.APIStatusError) as e413:
            await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "x" * 100_000}])
        assert e413.value.status_code == 413
        assert e413.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        await client.close()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{cp.url}/v1/chat/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {t.KEY_A}"}) as resp:
                assert resp.status == 400
                err = (await resp.json())["error"]
                assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"


async def test_upstream_failures_map_to_502_503_504() -> None:
    s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"]},
                           {"name": "nobody-serves-me"}])
    async with t.backends(("bad", "500"), ("slow", "hang")) as (bad, slow):
        s502 = t.settings(upstreams=[t.upstream("bad", bad.url)])
        async with t.running(s502) as cp:
            client = cp.client()
            with pytest.raises(openai.APIStatusError) as e502:
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hi"}])
            assert e502.value.status_code == 502 and "status 500" in e502.value.message
            await client.close()
        s504 = t.settings(upstreams=[t.upstream("slow", slow.url)],
                          http={"upstream_first_byte_timeout_s": 0.3})
        async with t.running(s504) as cp:
            client = cp.client()
            with pytest.raises(openai.APIStatusError) as e504:
                await client.chat.completions.create(
                    model="llama", messages=[{"role": "user", "content": "hi"}])
            assert e504.value.status_code == 504
            await client.close()
    async with t.running(s) as cp:
        client = cp.client()
        with pytest.raises(openai.APIStatusError) as e503:
            await client.chat.completions.create(
                model="nobody-serves-me", messages=[{"role": "user", "content": "hi"}])
        assert e503.value.status_code == 503 and e503.value.code == "no_backend"
        await client.close()


async def test_rate_limited_tenant_gets_429_while_another_is_served() -> None:
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)], auth={"tenants": [
            {"name": "a", "keys": [t.KEY_A], "requests_per_second": 0.01, "burst": 2},
            {"name": "b", "keys": [t.KEY_B]}]})
        async with t.running(s) as cp:
            a, other = cp.client(t.KEY_A), cp.client(t.KEY_B)
            msgs = [{"role": "user", "content": "hi"}]
            for _ in range(2):
                await a.chat.completions.create(model="llama", messages=msgs)
            with pytest.raises(openai.RateLimitError) as e429:
                await a.chat.completions.create(model="llama", messages=msgs)
            assert int(e429.value.response.headers["Retry-After"]) >= 1
            assert e429.value.code == "rate_limit_exceeded"
            for _ in range(5):
                await other.chat.completions.create(model="llama", messages=msgs)
            await a.close()
            await other.close()


async def test_fallback_model_is_used_and_said_in_a_header() -> None:
    async with t.backends(("big", "ok")) as (b,):
        s = t.settings(models=[{"name": t.MODEL, "aliases": ["llama"], "fallbacks": ["big"]},
                               {"name": "big-model", "aliases": ["big"]}],
                       upstreams=[t.upstream("big", b.url, ["big-model"])])
        async with t.running(s) as cp:
            client = cp.client()
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-synapse-fallback"] == f"{t.MODEL}->big-model"
            assert json.loads(b.bodies[-1])["model"] == "big-model"
            await client.close()


async def test_embeddings_through_an_embedding_backend() -> None:
    async with t.backends(("emb", "ok")) as (b,):
        s = t.settings(models=[{"name": "embedder"}],
                       upstreams=[t.upstream("emb", b.url, ["embedder"], task="embed")])
        async with t.running(s) as cp:
            client = cp.client()
            out = await client.embeddings.create(model="embedder", input=["a", "b"],
                                                 encoding_format="float")
            assert [d.embedding for d in out.data] == [[0.1, 0.2, 0.3]] * 2
            await client.close()


async def test_contract_rules_and_backend_refusals_are_openai_errors() -> None:
    async with t.backends(("picky", "400")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("picky", b.url)])) as cp:
            client = cp.client()
            msgs = [{"role": "user", "content": "hi"}]
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="llama", messages=msgs,
                                                     stream_options={"include_usage": True})
            assert err.value.param == "stream_options"
            with pytest.raises(openai.BadRequestError) as err:
                await client.completions.create(model="llama", prompt="")
            assert err.value.param == "prompt"
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="llama", messages=msgs)
            assert "bad thing" in err.value.message and err.value.code == "upstream_400"
            await client.close()


async def test_session_affinity_is_per_tenant() -> None:
    """Session ids are the tenants' own (often their users' e-mails): another tenant
    sending the same id is neither routed by it, nor told it exists, nor re-pins it."""
    async with t.backends(("one", "ok"), ("two", "ok")) as served:
        async with t.running(t.settings(upstreams=[t.upstream(b.name, b.url)
                                                   for b in served])) as cp:
            async with aiohttp.ClientSession() as s:
                async def chat(key: str, **how: str) -> tuple[str, str]:
                    body: dict[str, object] = {
                        "model": "llama", "messages": [{"role": "user", "content": "hi"}]}
                    headers = {"Authorization": f"Bearer {key}"}
                    if "user" in how:
                        body["user"] = how["user"]
                    if "session" in how:
                        headers["x-session-id"] = how["session"]
                    async with s.post(f"{cp.url}/v1/chat/completions", json=body,
                                      headers=headers) as resp:
                        assert resp.status == 200, await resp.text()
                        return resp.headers["x-synapse-route"], resp.headers[
                            "x-synapse-backend"]

                alice = [await chat(t.KEY_A, user="victim-user-42") for _ in range(3)]
                assert [r for r, _ in alice[1:]] == ["session", "session"], alice
                pinned = alice[-1][1]
                bob_first = await chat(t.KEY_B, session="victim-user-42")
                assert bob_first[0] != "session", "tenant b learnt tenant a's session id"
                assert (await chat(t.KEY_B, session="victim-user-42"))[0] == "session"
                assert await chat(t.KEY_A, user="victim-user-42") == ("session", pinned)


async def test_a_clients_request_id_is_echoed_but_engines_get_synapses() -> None:
    """vLLM names (and aborts) a request by the x-request-id it is sent, and any tenant can
    send any id: engines get an id Synapse made. Synapse's ids are random, so two of a
    tenant's own tell nothing of the requests between them."""
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            async with aiohttp.ClientSession() as s:
                async def chat(**headers: str) -> str:
                    async with s.post(f"{cp.url}/v1/chat/completions", json={
                            "model": "llama", "messages": [{"role": "user", "content": "hi"}]},
                            headers={"Authorization": f"Bearer {t.KEY_A}", **headers}) as resp:
                        assert resp.status == 200, await resp.text()
                        return resp.headers["x-request-id"]

                assert await chat(**{"x-request-id": "client-chosen-1"}) == "client-chosen-1"
                ours = [await chat() for _ in range(3)]
    engine_ids = [v for h in b.headers for k, v in h.items() if k.lower() == "x-request-id"]
    assert "client-chosen-1" not in engine_ids and len(set(engine_ids)) == 4
    for rid in ours + engine_ids:
        assert len(rid) == 24 and int(rid, 16) >= 0, rid    # 96 random bits, hex
    gaps = [abs(int(y, 16) - int(x, 16)) for x, y in itertools.pairwise(ours)]
    assert min(gaps) > 2**32, ("request ids count requests", ours)


REGEX = "(" + "|".join(f"w0q{i}x{i % 7}" for i in range(3000)) + ")"     # ~30 KB


async def test_an_oversized_structured_output_constraint_is_a_400_on_every_path() -> None:
    """vLLM compiles a constraint on threads that outlive its 5 s timeout: four 400 KB
    regexes kept an engine at 170 % CPU for every tenant (probe 68, F2). Refused before
    any engine sees it; a realistic schema still passes."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"},
                                               "steps": {"type": "array", "items": {
                                                   "type": "string"}}},
              "required": ["answer"], "additionalProperties": False}
    chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    refused = [
        ("/v1/chat/completions", {**chat, "structured_outputs": {"regex": REGEX}},
         "structured_outputs"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema",
         "json_schema": {"name": "x", "schema": {"enum": REGEX.split("|")}}}},
         "response_format"),
        ("/v1/chat/completions", {**chat, "guided_grammar": "root ::= " + REGEX},
         "guided_grammar"),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "guided_regex": REGEX},
         "guided_regex"),
        ("/v1/completions", {"model": "llama", "prompt": "hi",
                             "structured_outputs": {"choice": REGEX.split("|")}},
         "structured_outputs"),
        ("/v1/responses", {"model": "llama", "input": "hi", "text": {"format": {
            "type": "json_schema", "name": "x", "schema": {"enum": REGEX.split("|")}}}},
         "text.format"),
    ]
    async with t.backends(("one", "ok")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            async with aiohttp.ClientSession() as s:
                for path, body, param in refused:
                    async with s.post(f"{cp.url}{path}", json=body, headers={
                            "Authorization": f"Bearer {t.KEY_A}"}) as resp:
                        err = (await resp.json())["error"]
                        assert resp.status == 400, err
                        assert err["param"] == param, err
                        assert "http.max_structured_output_bytes" in err["message"]
            assert b.bodies == []
            client = cp.client()
            await client.chat.completions.create(**chat, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
            await client.completions.create(model="llama", prompt="hi",
                                            extra_body={"structured_outputs": {"json": schema}})
            assert len(b.bodies) == 2
            await client.close()


ENUM = {"type": "object", "properties": {"v": {"enum": REGEX.split("|")}}}     # ~40 KB


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_batches_forced_tool_schemas_and_chat_templates_are_bounded_on_every_path(
        fast_lane: bool) -> None:
    """Three costs an engine took from one request while Synapse saw a small one (probe
    69): a completions batch of thousands of prompts (a sequence each), the tools'
    schemas a forced tool_choice compiles into a grammar, a request's own Jinja chat
    template. Refused before any engine sees them, on the fast lane and on aiohttp's
    path, for chat, completions, Responses and Anthropic Messages alike."""
    chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    tool = {"type": "function", "function": {"name": "f", "parameters": ENUM}}
    refused = [
        ("/v1/completions", {"model": "llama", "prompt": ["hi"] * 10_000}, "prompt",
         "http.max_sequences"),
        ("/v1/completions", {"model": "llama", "prompt": ["hi"] * 100, "n": 3}, "prompt",
         "http.max_sequences"),
        ("/v1/chat/completions", {**chat, "tools": [tool], "tool_choice": "required"},
         "tools", "http.max_tool_schema_bytes"),
        ("/v1/chat/completions", {**chat, "tools": [tool], "tool_choice": {
            "type": "function", "function": {"name": "f"}}}, "tools",
         "http.max_tool_schema_bytes"),
        ("/v1/responses", {"model": "llama", "input": "hi", "tool_choice": "required",
                           "tools": [{"type": "function", "name": "f", "parameters": ENUM}]},
         "tools", "http.max_tool_schema_bytes"),
        ("/v1/chat/completions", {**chat, "chat_template": "{{ messages }}"},
         "chat_template", "http.request_chat_templates"),
        ("/v1/completions", {"model": "llama", "prompt": "hi",
                             "chat_template_kwargs": {"chat_template": "{{ x }}"}},
         "chat_template_kwargs.chat_template", "http.request_chat_templates"),
    ]
    anthropic = {"model": "llama", "max_tokens": 16, "messages": chat["messages"],
                 "tools": [{"name": "f", "input_schema": ENUM}]}
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)])
        s = s.model_copy(update={"http": s.http.model_copy(update={
            "fast_lane": fast_lane, "max_tool_schema_bytes": 16 * 1024})})
        async with t.running(s) as cp:
            async with aiohttp.ClientSession(headers={
                    "Authorization": f"Bearer {t.KEY_A}"}) as session:
                for path, body, param, setting in refused:
                    async with session.post(f"{cp.url}{path}", json=body) as resp:
                        err = (await resp.json())["error"]
                        assert resp.status == 400, (path, err)
                        assert err["param"] == param and setting in err["message"], err
                for choice in ({"type": "any"}, {"type": "tool", "name": "f"}):
                    async with session.post(f"{cp.url}/v1/messages", json={
                            **anthropic, "tool_choice": choice}) as resp:
                        answer = await resp.json()
                        assert resp.status == 400, answer
                        assert "http.max_tool_schema_bytes" in str(answer), answer
                assert b.bodies == []
                # the same tools unforced, and a batch within the bound, pass
                async with session.post(f"{cp.url}/v1/chat/completions", json={
                        **chat, "tools": [tool], "tool_choice": "auto"}) as resp:
                    assert resp.status == 200, await resp.text()
                async with session.post(f"{cp.url}/v1/completions", json={
                        "model": "llama", "prompt": ["hi"] * 64, "n": 4}) as resp:
                    assert resp.status == 200, await resp.text()
            assert len(b.bodies) == 2


async def test_a_batch_in_flight_holds_a_seat_per_sequence() -> None:
    """The ledger the fair queue's seat rule reads counts a request's sequences — three
    prompts x n: 2 are six of the engine's seats — until its answer ends (probe 69)."""
    async with t.backends(("one", "slow")) as (b,):
        async with t.running(t.settings(upstreams=[t.upstream("one", b.url)])) as cp:
            assert await t.seats_mid_stream(
                cp, "one", model="llama", prompt=["a", "b", "c"], n=2, max_tokens=8) == (1, 6)
            assert cp.services.ledger.load("static/one").sequences == 0


async def test_an_embeddings_batch_in_flight_holds_a_seat_per_input() -> None:
    """vLLM pools each input of an embeddings array as a request of its own: three
    token-id arrays are three of the engine's seats until the answer ends, and an array
    over http.max_pooling_inputs is refused as a completions batch is over its bound."""
    async with t.backends(("emb", "hang")) as (b,):
        s = t.settings(models=[{"name": "embedder"}],
                       upstreams=[t.upstream("emb", b.url, ["embedder"], task="embed")])
        async with t.running(s) as cp:
            async with aiohttp.ClientSession(headers={
                    "Authorization": f"Bearer {t.KEY_A}"}) as session:
                async with session.post(f"{cp.url}/v1/embeddings", json={
                        "model": "embedder", "input": ["hi"] * 3000}) as resp:
                    err = (await resp.json())["error"]
                    assert resp.status == 400, err
                    assert err["param"] == "input"
                    assert "http.max_pooling_inputs" in err["message"]
                assert b.bodies == []

                async def embed() -> None:
                    async with session.post(f"{cp.url}/v1/embeddings", json={
                            "model": "embedder", "input": [[1, 2], [3], [4]]}) as resp:
                        await resp.read()
                call = asyncio.create_task(embed())
                load = cp.services.ledger.load("static/emb")
                await harness.until(lambda: b.bodies != [], 5, "the batch reached the engine")
                assert (load.in_flight, load.sequences) == (1, 3)
                call.cancel()
                await harness.until(lambda: load.in_flight == 0, 5, "the call was released")
                assert load.sequences == 0


@pytest.mark.parametrize(("path", "task", "many", "three", "param"), [
    ("/v1/rerank", "rerank", {"query": "q", "documents": ["d"] * 3000},
     {"query": "q", "documents": ["a", "b", "c"]}, "documents"),
    ("/v1/score", "score", {"text_1": "q", "text_2": ["d"] * 3000},
     {"text_1": ["a", "b", "c"], "text_2": ["x", "y", "z"]}, "text_2"),
])
async def test_a_rerank_or_score_in_flight_holds_a_seat_per_document(
        path: str, task: str, many: dict[str, object], three: dict[str, object],
        param: str) -> None:
    """vLLM scores each (query, document) pair of a rerank or score call as a pooling
    request of its own: three are three of the engine's seats until the answer ends, and
    more than http.max_pooling_inputs is refused as a completions batch is over its bound."""
    async with t.backends(("pool", "hang")) as (b,):
        s = t.settings(models=[{"name": "ranker"}],
                       upstreams=[{**t.upstream("pool", b.url, ["ranker"]), "tasks": [task]}])
        async with t.running(s) as cp:
            async with aiohttp.ClientSession(headers={
                    "Authorization": f"Bearer {t.KEY_A}"}) as session:
                async with session.post(f"{cp.url}{path}",
                                        json={"model": "ranker", **many}) as resp:
                    err = (await resp.json())["error"]
                    assert resp.status == 400, err
                    assert err["param"] == param
                    assert "http.max_pooling_inputs" in err["message"]
                assert b.bodies == []

                async def call() -> None:
                    async with session.post(f"{cp.url}{path}",
                                            json={"model": "ranker", **three}) as resp:
                        await resp.read()
                pending = asyncio.create_task(call())
                load = cp.services.ledger.load("static/pool")
                await harness.until(lambda: b.bodies != [], 5, "the call reached the engine")
                assert (load.in_flight, load.sequences) == (1, 3)
                pending.cancel()
                await harness.until(lambda: load.in_flight == 0, 5, "the call was released")
                assert load.sequences == 0


@pytest.mark.parametrize(("path", "task", "body", "param"), [
    ("/v1/rerank", "rerank", {"query": "q", "documents": ["a", {"text": "LONG"}]},
     "documents[1]"),
    ("/v1/rerank", "rerank", {"query": "LONG", "documents": ["a"]}, "query"),
    ("/v1/score", "score", {"text_1": "q", "text_2": ["a", "b", "LONG"]}, "text_2[2]"),
])
async def test_a_rerank_or_score_text_over_the_input_bound_is_a_400_naming_it(
        path: str, task: str, body: dict[str, object], param: str) -> None:
    """Each (query, document) pair is a sequence the engine tokenizes whole: one document
    of ~100k tokens reached it while only the count of documents was bounded (probe 187).
    Over http.max_pooling_input_bytes it is refused, naming the field and the index."""
    limit = 2048

    def sized(value: object, size: int) -> object:
        """``body``'s value with each "LONG" (or object of it) a text of ``size`` bytes."""
        if isinstance(value, list):
            return [sized(v, size) for v in value]
        if isinstance(value, dict):
            return {k: sized(v, size) for k, v in value.items()}
        return "x" * size if value == "LONG" else value
    sent = sized(body, limit + 1)
    assert isinstance(sent, dict)
    async with t.backends(("pool", "ok")) as (b,):
        s = t.settings(models=[{"name": "ranker"}],
                       upstreams=[{**t.upstream("pool", b.url, ["ranker"]), "tasks": [task]}],
                       http={"max_pooling_input_bytes": limit})
        async with t.running(s) as cp, aiohttp.ClientSession(headers={
                "Authorization": f"Bearer {t.KEY_A}"}) as session:
            async with session.post(f"{cp.url}{path}",
                                    json={"model": "ranker", **sent}) as resp:
                err = (await resp.json())["error"]
                assert resp.status == 400, err
                assert err["param"] == param
                assert "http.max_pooling_input_bytes" in err["message"]
            assert b.bodies == []
            at_bound = sized(body, limit)
            assert isinstance(at_bound, dict)
            async with session.post(f"{cp.url}{path}",
                                    json={"model": "ranker", **at_bound}) as resp:
                assert resp.status == 200, await resp.text()
            assert len(b.bodies) == 1       # at the bound: the engine gets it


async def test_cache_transfer_and_media_overrides_are_refused_on_every_path() -> None:
    """kv_transfer_params would let a tenant steer an engine's KV connector (the peer to
    pull blocks from, the blocks); mm_processor_kwargs and media_io_kwargs set what a
    request's media cost the engine. Refused before any engine sees them, on every path
    vLLM reads them from; the media overrides pass with http.request_media_kwargs."""
    messages = [{"role": "user", "content": "hi"}]
    bodies = {"/v1/chat/completions": {"model": "llama", "messages": messages},
              "/v1/completions": {"model": "llama", "prompt": "hi"},
              "/v1/embeddings": {"model": "llama", "input": "hi"},
              "/v1/responses": {"model": "llama", "input": "hi"},
              "/v1/messages": {"model": "llama", "max_tokens": 16, "messages": messages}}
    fields = [("kv_transfer_params", {"do_remote_prefill": True, "remote_host": "10.0.0.9",
                                      "remote_port": 5600, "remote_block_ids": [7]}),
              ("mm_processor_kwargs", {"max_pixels": 10**9}),
              ("media_io_kwargs", {"video": {"num_frames": 100_000}})]
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)])
        async with t.running(s) as cp:
            async with aiohttp.ClientSession(headers={
                    "Authorization": f"Bearer {t.KEY_A}"}) as session:
                for path, body in bodies.items():
                    for name, value in fields:
                        async with session.post(f"{cp.url}{path}",
                                                json={**body, name: value}) as resp:
                            answer = await resp.json()
                            assert resp.status == 400, (path, name, answer)
                            assert name in str(answer), (path, answer)
            assert b.bodies == []
        s = s.model_copy(update={"http": s.http.model_copy(update={
            "request_media_kwargs": True})})
        async with t.running(s) as cp:
            client = cp.client()
            await client.chat.completions.create(model="llama", messages=messages,
                                                 extra_body={"mm_processor_kwargs": {
                                                     "max_pixels": 1024 * 1024}})
            assert json.loads(b.bodies[-1])["mm_processor_kwargs"] == {
                "max_pixels": 1024 * 1024}
            with pytest.raises(openai.BadRequestError, match="kv_transfer_params"):
                await client.chat.completions.create(model="llama", messages=messages,
                                                     extra_body={"kv_transfer_params": {
                                                         "remote_port": 5600}})
            await client.close()


async def test_background_responses_and_engine_priorities_are_refused_on_every_path() -> None:
    """A background response is answered at once by an engine with the Responses store,
    unaccounted, its seat freed, its result unfetchable through Synapse; a priority would
    jump an engine's queue (--scheduling-policy priority) past Synapse's fair queue
    (probe 82). Refused before any engine sees them; false and 0 pass."""
    messages = [{"role": "user", "content": "hi"}]
    bodies = {"/v1/chat/completions": {"model": t.MODEL, "messages": messages},
              "/v1/completions": {"model": t.MODEL, "prompt": "hi"},
              "/v1/responses": {"model": t.MODEL, "input": "hi"},
              "/v1/messages": {"model": t.MODEL, "max_tokens": 16, "messages": messages}}
    async with responses_engine.engine() as eng, t.running(
            responses_engine.settings(eng)) as cp:
        async with aiohttp.ClientSession(headers={
                "Authorization": f"Bearer {t.KEY_A}"}) as session:
            refused = [(path, {**body, "priority": -10}, "priority")
                       for path, body in bodies.items()]
            refused += [("/v1/responses", {**bodies["/v1/responses"], "background": b},
                         "background") for b in (True, "yes", 1)]
            for path, body, name in refused:
                async with session.post(f"{cp.url}{path}", json=body) as resp:
                    answer = await resp.json()
                    assert resp.status == 400, (path, answer)
                    assert name in str(answer), (path, answer)
            assert eng.bodies == []
            for path, body in bodies.items():
                async with session.post(f"{cp.url}{path}", json={
                        **body, "priority": 0, "background": False}) as resp:
                    assert resp.status == 200, (path, await resp.text())
            assert eng.bodies[-1]["background"] is False
