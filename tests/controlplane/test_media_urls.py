"""Media URLs an engine would fetch (controlplane.core.media_urls): internal addresses are
refused before anything is routed, naming the field; public URLs and data: URLs pass."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from controlplane import errors
from controlplane.core import media_urls
from tests.controlplane import cp_testing as t
from tests.controlplane import test_responses_tenancy as responses_engine

INTERNAL = [
    "http://127.0.0.1/x.png", "http://localhost:8000/", "http://169.254.169.254/latest/",
    "http://[::1]/", "http://[::ffff:10.0.0.1]/", "http://10.1.2.3/", "http://192.168.1.1./",
    "http://127.1/", "http://2130706433/", "http://0x7f.1/", "http://0177.0.0.1/",
    "http://metadata.google.internal/", "http://printer.local/", "http://0/",
    "http://224.0.0.1/", "http://[fe80::1%25eth0]/",
    # parsers that disagree, and what is not http(s)
    "http://public.example@127.0.0.1/", "http://127.0.0.1\\@public.example/",
    "http://a b.example/", "file:///etc/passwd", "ftp://example.com/a", "gopher://x/",
    "http:/example.com", 42,
    # what the engine's URL parser (urllib3, Python's idna codec) reads as an internal host
    "http://127%2e0%2e0%2e1:18690/", "http://loc%61lhost/", "http://%31%32%37.0.0.1/",
    "http://127\u30020\u30020\u30021/", "http://127\uff0e0\uff0e0\uff0e1/",
    "http://127\uff610\uff610\uff611/", "http://\uff11\uff12\uff17.0.0.1/",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",
    "http://127.0.0.1\u00ad/", "http://metadata.google\u3002internal/",
    # IPv6 forms that carry an internal IPv4 address
    "http://[::127.0.0.1]/", "http://[::a9fe:a9fe]/", "http://[::ffff:7f00:1]/",
    "http://[::ffff:0:127.0.0.1]/", "http://[64:ff9b::169.254.169.254]/",
    "http://[64:ff9b:1::8.8.8.8]/", "http://[2002:a9fe:a9fe::1]/",
]
PUBLIC = ["https://example.com/cat.png", "http://8.8.8.8/a.png", "data:image/png;base64,AA",
          "https://[2606:4700:4700::1111]/x", "https://cafe.example/x",
          "https://b\u00fccher.example/x", "http://[::ffff:8.8.8.8]/", "http://[2002:808:808::1]/",
          "HTTPS://Example.COM/a.png", "DATA:image/png;base64,AA"]


@pytest.mark.parametrize("url", INTERNAL)
def test_an_internal_or_ambiguous_url_is_refused_naming_the_field(url: Any) -> None:
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check(url, "messages[0].content[1].image_url", "public")
    assert err.value.param == "messages[0].content[1].image_url"
    assert err.value.code == "invalid_media_url"


@pytest.mark.parametrize("url", PUBLIC)
def test_public_and_inline_urls_pass(url: str) -> None:
    media_urls.check(url, "f", "public")
    media_urls.check(url, "f", "any")


def test_inline_takes_data_urls_only_and_any_takes_everything() -> None:
    media_urls.check("data:image/png;base64,AA", "f", "inline")
    with pytest.raises(errors.BadRequest):
        media_urls.check("https://example.com/cat.png", "f", "inline")
    media_urls.check("http://127.0.0.1/", "f", "any")


def test_urls_are_found_in_chat_parts_and_responses_input() -> None:
    chat = [{"role": "user", "content": "text only"},
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "video_url", "video_url": {"url": "http://10.0.0.5/v.mp4"}}]}]
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_chat(chat, "public")
    assert err.value.param == "messages[1].content[2].video_url"
    responses = {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this"},
        {"type": "input_image", "image_url": "http://169.254.169.254/"}]}]}
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_responses(responses, "public")
    assert err.value.param == "input[0].content[1].image_url"


LOOPBACK = "http://127.0.0.1:18690/x"
# parts vLLM's parser fetches (vllm/renderers/chat_utils.py): by type, and by key when a
# part has no type or carries a uuid; input_image in chat as in Responses
FETCHED_PARTS = [
    ({"image_url": {"url": LOOPBACK}}, "image_url"),
    ({"image_url": LOOPBACK}, "image_url"),
    ({"audio_url": {"url": LOOPBACK}}, "audio_url"),
    ({"video_url": {"url": LOOPBACK}}, "video_url"),
    ({"type": "input_image", "detail": "auto", "image_url": LOOPBACK}, "image_url"),
    ({"type": "image_url", "uuid": "u1", "image_url": LOOPBACK}, "image_url"),
    ({"type": "text", "text": "hi", "uuid": "u1", "video_url": LOOPBACK}, "video_url"),
    ({"type": "input_file", "file_url": LOOPBACK}, "file_url"),
]


@pytest.mark.parametrize(("part", "key"), FETCHED_PARTS)
def test_every_part_that_carries_a_url_is_checked_whatever_its_type(
        part: dict[str, Any], key: str) -> None:
    chat = [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_chat(chat, "public")
    assert err.value.param == f"messages[0].content[1].{key}"
    assert err.value.code == "invalid_media_url"
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_responses({"input": [{"role": "user", "content": [part]}]}, "public")
    assert err.value.param == f"input[0].content[0].{key}"
    with pytest.raises(errors.BadRequest) as err:     # an input item that is a part
        media_urls.check_responses({"input": [part]}, "public")
    assert err.value.param == f"input[0].{key}"
    public = {k: (v if k != key else {"url": "https://example.com/a"} if isinstance(v, dict)
                  else "https://example.com/a") for k, v in part.items()}
    media_urls.check_chat([{"role": "user", "content": [public]}], "public")


BODIES = [  # the other bodies whose URLs vLLM fetches: field named in the 400
    ({"messages": [{"role": "user", "content": [{"image_url": LOOPBACK}]}]},  # /tokenize
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [  # Anthropic, as vLLM translates it
        {"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "image", "source": {"type": "url", "url": LOOPBACK}}]}]}]},
     "messages[0].content[0].content[0].source.url"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": LOOPBACK}}]}]},
     "messages[0].content[0].source.url"),
    ({"query": "q", "documents": [{"content": [{"type": "image_url",  # /v1/rerank
                                                "image_url": {"url": LOOPBACK}}]}]},
     "documents[0].content[0].image_url"),
    ({"text_1": "a", "text_2": {"content": [{"video_url": {"url": LOOPBACK}}]}},  # score
     "text_2.content[0].video_url"),
]


@pytest.mark.parametrize(("body", "param"), BODIES)
def test_the_bodies_of_other_calls_are_checked_where_vllm_reads_urls(
        body: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_body(body, "public")
    assert err.value.param == param
    media_urls.check_body(body, "any")
    media_urls.check_body({"query": "q", "documents": ["a", {"content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
        "public")


async def test_over_http_the_engine_never_sees_an_internal_url() -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.round_robin(one)) as cp:
            client = cp.client()
            part = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="llama", messages=[
                    {"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
            assert err.value.body["param"] == "messages[0].content[1].image_url"
            assert not one.bodies
            part["image_url"] = {"url": "https://example.com/cat.png"}
            await client.chat.completions.create(model="llama", messages=[
                {"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
            assert len(one.bodies) == 1
            await client.close()


async def test_over_http_messages_and_responses_are_checked_too() -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.round_robin(one)) as cp, aiohttp.ClientSession() as http:
            image = {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/a"}}
            async with http.post(f"{cp.url}/v1/messages", headers={"x-api-key": t.KEY_A},
                                 json={"model": "llama", "max_tokens": 5, "messages": [
                                     {"role": "user", "content": [image]}]}) as resp:
                assert resp.status == 400 and "image_url" in (await resp.json())["error"][
                    "message"]
            async with http.post(f"{cp.url}/v1/responses",
                                 headers={"Authorization": f"Bearer {t.KEY_A}"},
                                 json={"model": "llama", "input": [{"role": "user", "content": [
                                     {"type": "input_image",
                                      "image_url": "http://[::1]/"}]}]}) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert body["error"]["param"] == "input[0].content[0].image_url"
            assert not one.bodies


async def test_over_http_untyped_parts_and_encoded_hosts_are_refused() -> None:
    """The probe's bypasses, through the control plane: a part with no type, a
    percent-encoded host, ideographic full stops, an IPv4-compatible IPv6 address."""
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.round_robin(one)) as cp, aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {t.KEY_A}"}
            for part in ({"image_url": {"url": LOOPBACK}},
                         {"type": "input_image", "image_url": LOOPBACK},
                         {"type": "image_url", "image_url": {"url": "http://127%2e0%2e0%2e1/"}},
                         {"type": "image_url", "image_url": {"url": "http://127\u30020\u30020\u30021/"}},
                         {"type": "image_url", "image_url": {"url": "http://[::127.0.0.1]/"}}):
                async with http.post(f"{cp.url}/v1/chat/completions", headers=auth,
                                     json={"model": "llama", "messages": [
                                         {"role": "user", "content": [part]}]}) as resp:
                    body = await resp.json()
                    assert resp.status == 400, (part, body)
                    assert body["error"]["code"] == "invalid_media_url"
            async with http.post(f"{cp.url}/v1/responses", headers=auth,
                                 json={"model": "llama", "input": [{"role": "user", "content": [
                                     {"video_url": {"url": LOOPBACK}}]}]}) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert body["error"]["param"] == "input[0].content[0].video_url"
            async with http.post(f"{cp.url}/tokenize", headers=auth, json={
                    "model": "llama", "messages": [{"role": "user", "content": [
                        {"image_url": {"url": LOOPBACK}}]}]}) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert body["error"]["code"] == "invalid_media_url"
            async with http.post(f"{cp.url}/v1/embeddings", headers=auth, json={
                    "model": "llama", "input": "x", "messages": [{"role": "user", "content": [
                        {"image_url": {"url": LOOPBACK}}]}]}) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert body["error"]["param"] == "messages[0].content[0].image_url"
            tool_result = {"type": "tool_result", "tool_use_id": "t1", "content": [
                {"type": "image", "source": {"type": "url", "url": LOOPBACK}}]}
            async with http.post(f"{cp.url}/v1/messages", headers={"x-api-key": t.KEY_A},
                                 json={"model": "llama", "max_tokens": 5, "messages": [
                                     {"role": "user", "content": [tool_result]}]}) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert "source.url" in body["error"]["message"]
            assert not one.bodies


async def test_every_endpoint_checks_urls_at_the_same_point_before_the_model() -> None:
    """The chat route and the other generation routes (``calls.begin``) check at the same
    point, right after parsing: an internal URL with an unknown model is the same 400
    everywhere, not a 404 on one route and a 400 on another."""
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.round_robin(one)) as cp, aiohttp.ClientSession() as http:
            part = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}
            async with http.post(f"{cp.url}/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {t.KEY_A}"},
                                 json={"model": "no-such-model", "messages": [
                                     {"role": "user", "content": [part]}]}) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert body["error"]["param"] == "messages[0].content[0].image_url"
            image = {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/a"}}
            async with http.post(f"{cp.url}/v1/messages", headers={"x-api-key": t.KEY_A},
                                 json={"model": "no-such-model", "max_tokens": 5,
                                       "messages": [{"role": "user", "content": [image]}]},
                                 ) as resp:
                assert resp.status == 400
            assert not one.bodies


def mcp_tools(url: Any) -> dict[str, Any]:
    return {"model": "llama", "input": "hi", "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "object"}},
        {"type": "mcp", "server_label": "docs", "server_url": url,
         "require_approval": "never"}]}


@pytest.mark.parametrize("url", INTERNAL)
def test_an_mcp_tools_internal_server_url_is_refused_as_a_media_url_is(url: Any) -> None:
    """An engine that connected to a request's MCP server_url could be aimed inside the
    cluster: the same rule as a media URL (vLLM 0.32 connects only to its --tool-server
    servers, by server_label)."""
    with pytest.raises(errors.BadRequest) as err:
        media_urls.check_body(mcp_tools(url), "public")
    assert err.value.param == "tools[1].server_url"
    assert err.value.code == "invalid_media_url"
    media_urls.check_body(mcp_tools(url), "any")


def test_an_mcp_tools_public_server_url_or_none_passes() -> None:
    media_urls.check_body(mcp_tools("https://mcp.example.com/sse"), "public")
    media_urls.check_body(mcp_tools(None), "public")      # by server_label alone
    with pytest.raises(errors.BadRequest, match=r"http\.media_urls is inline"):
        media_urls.check_body(mcp_tools("https://mcp.example.com/sse"), "inline")
    # a function tool's fields are not URLs an engine connects to
    media_urls.check_body({"model": "llama", "input": "hi", "tools": [
        {"type": "function", "name": "f", "server_url": "http://10.0.0.1/"}]}, "public")


async def test_over_http_an_mcp_server_url_inside_never_reaches_the_engine() -> None:
    async with responses_engine.engine() as eng, t.running(
            responses_engine.settings(eng)) as cp, aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {t.KEY_A}"}
        async with http.post(f"{cp.url}/v1/responses", headers=auth,
                             json=mcp_tools("http://169.254.169.254/")) as resp:
            body = await resp.json()
            assert resp.status == 400, body
            assert body["error"]["param"] == "tools[1].server_url"
        assert eng.bodies == []
        async with http.post(f"{cp.url}/v1/responses", headers=auth,
                             json=mcp_tools("https://mcp.example.com/sse")) as resp:
            await resp.read()
        assert eng.bodies[-1]["tools"][1]["server_url"] == "https://mcp.example.com/sse"
