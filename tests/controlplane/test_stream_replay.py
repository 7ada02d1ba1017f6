"""Whole answers through the cache's conversions (issue 14, finding 5): a stream folded
into a response keeps every field, a response replayed as a stream has the shape of a
live one (a usage chunk only when asked), and an entry that cannot give every field due
is not served."""

from __future__ import annotations

from typing import Any

import orjson

from controlplane.core import cache_entry, sse, stream_fold, stream_replay
from tests.stream_shape import shape

HEAD = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 7, "model": "m"}


def token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": text, "logprob": logprob, "bytes": list(text.encode())}]}


def openai_stream(usage: bool) -> list[dict[str, Any]]:
    """A stream as the simulator (and OpenAI) send it: role, one chunk per token with its
    logprobs, a reasoning piece first, a finish chunk with an empty delta."""
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    out = [{**HEAD, "choices": [{**choice, "delta": {"role": "assistant", "content": ""}}]},
           {**HEAD, "choices": [{**choice, "delta": {"reasoning_content": "think "}}]},
           {**HEAD, "choices": [{**choice, "delta": {"reasoning_content": "first"}}]}]
    for text, lp in (("Hello", -0.1), (" there", -0.2)):
        out.append({**HEAD, "choices": [{**choice, "delta": {"content": text},
                                         "logprobs": {"content": [token(text, lp)],
                                                      "refusal": None}}]})
    out.append({**HEAD, "choices": [{**choice, "delta": {}, "finish_reason": "stop",
                                     "stop_reason": None}]})
    if usage:
        out.append({**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                     "total_tokens": 7}})
    return out


def vllm_stream() -> list[dict[str, Any]]:
    """vLLM 0.32's form: ``token_ids: null`` on token chunks, the last token in the finish
    chunk with its logprobs, ``stop_reason``, the fingerprint on the terminal chunk."""
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}
    out = [{**HEAD, "choices": [role]}]
    out.append({**HEAD, "choices": [{"index": 0, "delta": {"content": "Hi"},
                                     "logprobs": {"content": [token("Hi", -0.5)]},
                                     "finish_reason": None, "token_ids": None}]})
    out.append({**HEAD, "system_fingerprint": "fp", "choices": [{
        "index": 0, "delta": {"content": "!"}, "logprobs": {"content": [token("!", -0.7)]},
        "finish_reason": "length", "stop_reason": None, "token_ids": None}]})
    return out


def as_sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(sse.event(c) for c in chunks) + sse.event(sse.DONE)


def events(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in sse.SSEParser().feed(raw) if e != sse.DONE]


def folded(raw: bytes) -> dict[str, Any]:
    asm = sse.assemble(sse.SSEParser().feed(raw))
    assert asm.complete
    return dict(asm.response())


def test_a_stream_folds_into_a_response_with_every_field() -> None:
    resp = folded(as_sse(openai_stream(usage=True)))
    choice = resp["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there",
                                 "reasoning_content": "think first"}
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["Hello", " there"]
    assert choice["logprobs"]["refusal"] is None
    assert choice["finish_reason"] == "stop" and "stop_reason" in choice
    assert resp["usage"]["total_tokens"] == 7 and resp["object"] == "chat.completion"


def test_a_replay_has_the_live_streams_shape_and_a_usage_chunk_only_when_asked() -> None:
    for usage in (False, True):
        live = openai_stream(usage)
        stored = sse.assemble(sse.SSEParser().feed(as_sse(openai_stream(usage=True))))
        replayed = events(b"".join(sse.replay(stored.response(), include_usage=usage)))
        assert shape(replayed) == shape(live)
        assert folded(as_sse(replayed)) == folded(as_sse(live))


def test_a_non_streamed_answer_replays_in_the_openai_form_and_folds_back_whole() -> None:
    stored = folded(as_sse(openai_stream(usage=True)))      # now a plain dict: no form
    stored = {**stored, "system_fingerprint": "synapse-simulator"}
    for usage in (False, True):
        replayed = events(b"".join(stream_replay.replay(stored, include_usage=usage)))
        live = openai_stream(usage)     # the fingerprint on the last chunk, as vLLM's
        live[-1] = {**live[-1], "system_fingerprint": "synapse-simulator"}
        assert shape(replayed) == shape(live)
        again = folded(as_sse(replayed))
        assert again["choices"] == stored["choices"]
        assert again["system_fingerprint"] == "synapse-simulator"
        assert again.get("usage") == (stored["usage"] if usage else None)
    assert all(set(c) >= {"id", "object", "created", "model"} for c in replayed)


def test_a_vllm_stream_replays_in_vllms_own_form() -> None:
    live = vllm_stream()
    stored = sse.assemble(sse.SSEParser().feed(as_sse(live))).response()
    replayed = events(b"".join(sse.replay(stored, include_usage=False)))
    assert shape(replayed) == shape(live)
    assert replayed[-1]["choices"][0]["delta"] == {"content": "!"}
    assert folded(as_sse(replayed)) == folded(as_sse(live))


def test_a_non_streamed_answer_replays_in_a_form_seen_from_the_same_model() -> None:
    form = sse.assemble(sse.SSEParser().feed(as_sse(vllm_stream()))).response().form
    stored = {"id": "chatcmpl-other", "object": "chat.completion", "created": 9, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yo!"},
                           "logprobs": {"content": [token("Yo", -1.0), token("!", -2.0)]},
                           "finish_reason": "stop", "stop_reason": None, "token_ids": None,
                           "routed_experts": None}],     # vLLM's, never in its streams
              "system_fingerprint": "fp2"}
    replayed = events(b"".join(stream_replay.replay(stored, form, include_usage=False)))
    assert shape(replayed) == shape(vllm_stream())
    assert {c["id"] for c in replayed} == {"chatcmpl-other"}, "the answer's own id"
    assert replayed[-1]["system_fingerprint"] == "fp2"
    # folded back, it is vLLM's whole answer again (routed_experts, never streamed, too)
    whole = stream_fold.as_vllm_whole(stored)
    assert folded(as_sse(replayed))["choices"] == whole["choices"]
    assert whole["choices"][0]["message"]["content"] == "Yo!"


def entry(usage: bool) -> cache_entry.Entry:
    raw = cache_entry.encode("scope", sse.assemble(sse.SSEParser().feed(
        as_sse(openai_stream(usage)))).response())
    found = cache_entry.decode(raw, "scope")
    assert found is not None and found.form is not None
    return found


def test_an_entry_without_usage_serves_only_streams_that_did_not_ask_for_it() -> None:
    plain, counted = entry(usage=False), entry(usage=True)
    stream, asks = {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}
    continuous = {"stream": True, "stream_options": {"include_usage": True,
                                                     "continuous_usage_stats": True}}
    assert cache_entry.serves(plain, stream)
    assert not cache_entry.serves(plain, {}) and not cache_entry.serves(plain, asks)
    assert all(cache_entry.serves(counted, body) for body in ({}, stream, asks))
    assert not cache_entry.serves(counted, continuous)
    assert cache_entry.decode(cache_entry.encode("scope", {"choices": []}), "other") is None


def test_a_form_keeps_the_shape_of_a_stream_and_nothing_of_its_request() -> None:
    """vLLM puts the request's prompt text and token ids in its chunks when asked
    (``return_prompt_text``, ``return_token_ids``). A form is replayed to other requests
    (another tenant's, before forms were kept per tenant): it must hold none of them."""
    secret = "BOB SECRET: merger with ACME closes on 2027-01-15"
    live = vllm_stream()
    live[0] = {**live[0], "prompt_text": f"<|user|>{secret}", "prompt_token_ids": [9, 8, 7],
               "kv_transfer_params": {"remote": "bob"}}
    live[1]["choices"][0] = {**live[1]["choices"][0], "token_ids": [4242],
                             "delta": {"content": "Hi", "note": {"by": "bob"}}}
    live[2]["choices"][0] = {**live[2]["choices"][0], "token_ids": [4343], "stop_reason": 13}
    form = sse.assemble(sse.SSEParser().feed(as_sse(live))).response().form
    text = orjson.dumps(form)
    for leaked in (b"BOB", b"4242", b"4343", b"bob", b"9,8,7", b"13"):
        assert leaked not in text, leaked
    stored = {"id": "chatcmpl-alice", "object": "chat.completion", "created": 9, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yo!"},
                           "logprobs": None, "finish_reason": "stop"}]}
    replayed = b"".join(stream_replay.replay(stored, form, include_usage=False))
    for leaked in (b"BOB", b"4242", b"4343", b"bob", b"9, 8, 7", b"[9,8,7]"):
        assert leaked not in replayed, leaked
    assert folded(replayed)["choices"][0]["message"]["content"] == "Yo!"
    # The shape stays: the fields are there, emptied.
    chunks = events(replayed)
    assert "prompt_text" in chunks[0] and chunks[0]["prompt_text"] is None
