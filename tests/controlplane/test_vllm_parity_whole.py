"""A cached streamed answer, served whole or replayed, reads as vLLM's own would.

The references are what vLLM 0.32's OpenAI server sends, built with its own response
models as its ``serving.py`` builds them (two choices, ``n=2``): chunks serialized with
``exclude_unset`` (the usage chunk also ``exclude_none``), the whole answer with
``model_dump`` (every field, null when unset). Before, a stream folded for the cache lacked
the whole answer's null fields (``message.refusal``, ``service_tier``, ``routed_experts``
…), so a client reading them got a KeyError on a hit and not on a miss; a replay of ``n``
choices put the fingerprint on the last choice's finish chunk only, where vLLM puts it on
every choice's; a replayed usage chunk kept the null fields vLLM streams without; and a
folded usage lacked the null fields vLLM's whole usage carries (``prompt_tokens_details``,
``completion_tokens_details``, and inside the former ``multimodal_tokens``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import orjson
import pytest

from controlplane.core import sse, stream_fold, stream_replay

FP = "fp"
CAPTURES = pathlib.Path(__file__).parent / "data" / "vllm-0.32"   # a real vLLM's answers
USAGE = {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
WHOLE_USAGE = {**USAGE, "prompt_tokens_details": None, "completion_tokens_details": None}


def _chat_chunk(choice: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [choice], **top}


def vllm_chat_stream(include_usage: bool) -> list[dict[str, Any]]:
    """vLLM 0.32's chat stream of two choices answering "Hi!"."""
    out = [_chat_chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None},
                       prompt_token_ids=None, prompt_text=None) for i in range(2)]
    out += [_chat_chunk({"index": i, "delta": {"content": "Hi"}, "logprobs": None,
                         "finish_reason": None, "token_ids": None}) for i in range(2)]
    stamp = {} if include_usage else {"system_fingerprint": FP}
    out += [_chat_chunk({"index": i, "delta": {"content": "!"}, "logprobs": None,
                         "finish_reason": "stop", "stop_reason": None, "token_ids": None},
                        **stamp) for i in range(2)]
    if include_usage:
        out.append({**_chat_chunk({}), "choices": [], "usage": USAGE,
                    "system_fingerprint": FP})
    return out


def vllm_chat_whole(usage: dict[str, Any] = WHOLE_USAGE) -> dict[str, Any]:
    """vLLM 0.32's whole chat answer to the same request."""
    message = {"role": "assistant", "content": "Hi!", "refusal": None, "annotations": None,
               "audio": None, "function_call": None, "reasoning": None}
    choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": "stop",
                "stop_reason": None, "token_ids": None, "routed_experts": None}
               for i in range(2)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": choices, "service_tier": None, "system_fingerprint": FP,
            "usage": usage,
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _cmpl_chunk(choices: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": choices, **top}


def vllm_completions_stream(include_usage: bool) -> list[dict[str, Any]]:
    """vLLM 0.32's completions stream of two choices answering "Hi!"."""
    out = []
    for text, finish in (("Hi", None), ("!", "stop")):
        stamp = {"system_fingerprint": FP} if finish and not include_usage else {}
        out += [_cmpl_chunk([{"index": i, "text": text, "logprobs": None,
                              "finish_reason": finish, "stop_reason": None,
                              "prompt_token_ids": None, "token_ids": None}], **stamp)
                for i in range(2)]
    if include_usage:
        out.append(_cmpl_chunk([], usage=USAGE, system_fingerprint=FP))
    return out


def vllm_completions_whole(usage: dict[str, Any] = WHOLE_USAGE) -> dict[str, Any]:
    choices = [{"index": i, "text": "Hi!", "logprobs": None, "finish_reason": "stop",
                "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                "prompt_token_ids": None, "routed_experts": None} for i in range(2)]
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": choices, "service_tier": None, "system_fingerprint": FP,
            "usage": usage,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


ENDPOINTS = {"chat": (vllm_chat_stream, vllm_chat_whole),
             "completions": (vllm_completions_stream, vllm_completions_whole)}


def as_sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(sse.event(c) for c in chunks) + sse.event(sse.DONE)


def folded(chunks: list[dict[str, Any]]) -> stream_fold.Assembled:
    asm = sse.assemble(sse.SSEParser().feed(as_sse(chunks)))
    assert asm.complete
    return asm.response()


def replayed(response: Any, include_usage: bool) -> list[dict[str, Any]]:
    raw = b"".join(stream_replay.replay(response, include_usage=include_usage))
    return [orjson.loads(e) for e in sse.SSEParser().feed(raw) if e != sse.DONE]


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_a_folded_vllm_stream_is_vllms_whole_answer(endpoint: str) -> None:
    stream, whole = ENDPOINTS[endpoint]
    hit = folded(stream(include_usage=True))
    assert dict(hit) == whole(), "vLLM's whole answer, usage with its nulls"
    choice = hit["choices"][0]
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    assert hit["service_tier"] is None and hit["kv_transfer_params"] is None
    if endpoint == "chat":
        assert choice["message"]["refusal"] is None and "tool_calls" not in choice["message"]


def test_a_vllm_whole_answers_own_fields_are_kept() -> None:
    stream = vllm_chat_stream(include_usage=True)
    stream[0] = {**stream[0], "prompt_token_ids": [1, 2, 3]}
    stream[-1] = {**stream[-1], "usage": {**USAGE, "prompt_tokens_details":
                                          {"cached_tokens": 2}}}
    stream[-2] = {**stream[-2], "choices": [{**stream[-2]["choices"][0],
                                             "stop_reason": "!"}]}
    hit = folded(stream)
    assert hit["prompt_token_ids"] == [1, 2, 3] and hit["system_fingerprint"] == FP
    assert [c["stop_reason"] for c in hit["choices"]] == [None, "!"]
    assert hit["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 2, "created_cache_tokens": None, "multimodal_tokens": None}
    assert hit["usage"]["completion_tokens_details"] is None


def test_another_backends_stream_is_folded_as_sent() -> None:
    """An OpenAI stream (no ``stop_reason``) gets none of vLLM's own fields."""
    chunks = [{"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
               "model": "gpt", "service_tier": "default", "system_fingerprint": "fp_o",
               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish}]}
              for delta, finish in (({"role": "assistant", "content": "", "refusal": None},
                                     None), ({"content": "Hi"}, None), ({}, "stop"))]
    hit = folded(chunks)
    assert hit["choices"][0] == {"index": 0, "message": {
        "role": "assistant", "content": "Hi", "refusal": None},
        "logprobs": None, "finish_reason": "stop"}
    assert "kv_transfer_params" not in hit and hit["service_tier"] == "default"


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("stored_from", ["stream", "whole"])
def test_a_replay_of_n_choices_carries_the_fingerprint_where_vllm_does(
        endpoint: str, include_usage: bool, stored_from: str) -> None:
    """vLLM stamps every choice's finish chunk (or, when it sends one, the usage chunk
    alone), and sends its usage chunk without null fields."""
    stream, whole = ENDPOINTS[endpoint]
    stored = folded(stream(include_usage=True)) if stored_from == "stream" else whole()
    live = stream(include_usage)
    again = replayed(stored, include_usage)

    def stamped(chunks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((c["choices"][0]["index"] if c["choices"] else "usage",
                       c["system_fingerprint"]) for c in chunks if "system_fingerprint" in c)

    assert stamped(again) == stamped(live)
    assert [c["usage"] for c in again if "usage" in c] == (
        [USAGE] if include_usage else [])


def test_a_null_fingerprint_is_not_stamped_on_a_replay() -> None:
    """vLLM stamps its chunks only when it has a fingerprint."""
    stored = {**vllm_chat_whole(), "system_fingerprint": None}
    assert not [c for c in replayed(stored, False) if "system_fingerprint" in c]


def paths(value: Any, prefix: str = "") -> set[str]:
    """Every key of ``value``, as a dotted path (a list's by its first item's)."""
    out: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            out |= {prefix + key} | paths(item, f"{prefix}{key}.")
    elif isinstance(value, list) and value:
        out |= paths(value[0], prefix + "[].")
    return out


@pytest.mark.parametrize("stream, whole", [("chat_stream_usage.sse", "chat_full.json"),
                                           ("chat_stop_stream.sse", "chat_stop_full.json")])
def test_a_real_vllm_stream_folds_into_the_keys_of_its_whole_answer(stream: str,
                                                                     whole: str) -> None:
    """Recorded from a real vLLM 0.32: whole, ``usage.prompt_tokens_details`` carries
    ``multimodal_tokens: null`` and ``completion_tokens_details`` is null; streamed, the
    usage chunk leaves both out, and a replay sends it so."""
    raw = (CAPTURES / stream).read_bytes()
    asm = sse.assemble(sse.SSEParser().feed(raw))
    assert asm.complete
    hit = asm.response()
    sent_whole = json.loads((CAPTURES / whole).read_text())
    assert paths(hit) == paths(sent_whole)
    assert hit["usage"]["completion_tokens_details"] is None
    live_usage = [orjson.loads(e) for e in sse.SSEParser().feed(raw)
                  if e != sse.DONE and b'"usage"' in e.encode()]
    assert [c["usage"] for c in replayed(hit, True) if "usage" in c] == [
        c["usage"] for c in live_usage], "replayed without the nulls vLLM streams without"
