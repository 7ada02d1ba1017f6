"""The JSON request of each path beyond chat and completions, read for what Synapse needs
(pure): the model, whether it streams, the prompt the router and the token limits see,
the size fields, and whether the answer may be cached.

Only the fields Synapse reads are checked (400 naming the field); everything else passes
to the backend untouched, as on the chat path. A rerank's documents and a score's pairs
are a pooling request each to a vLLM engine, so they count as seats in the in-flight
ledger (``Call.sequences``) and are bounded by ``http.max_pooling_inputs``, by the rule a
completions batch's prompts are (:func:`validation.bound_sequences`); each of their texts
by ``http.max_pooling_input_bytes`` (:func:`bound_input_bytes`), as an embeddings input's.

=====================  ==========  ==================================  =================
path                   task        prompt (router, token limits)       response cache
=====================  ==========  ==================================  =================
``/v1/responses``      responses   ``instructions`` + ``input`` as      see below
                                   chat messages; ``max_output_tokens``
``/v1/messages``       messages    the chat translation's messages;    as chat, in a
                       (generate)  ``max_tokens``                      scope of its own
``/v1/rerank``         rerank      query + documents (size only)       no
``/v1/score``          score       both sides (size only)              no
``/tokenize``,         tokenize    the text (size only, never the      no
``/detokenize``                    prefix index)
``/v1/audio/speech``   speech      the input text (size only)          no
=====================  ==========  ==================================  =================

Why so little is cached: rerank and score are cheap forward passes whose scores a
semantic neighbour would not share, and exact repeats are rare; tokenize costs less
than a cache lookup; audio is large, binary and mostly unique (speech in, or a file
upload). A Responses call is cacheable only when it is stateless and asks nothing to be
kept: no ``previous_response_id`` (the answer depends on a stored conversation on one
engine), no ``background`` (refused before this, :mod:`validation`: its answer would
be polled by id later), ``store`` false (a cached answer's id was never stored anywhere,
so a later ``previous_response_id`` naming it could not be honoured), and only function
tools (built-in tools — web search, file search — act on the world at answer time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from controlplane import errors
from controlplane.core import anthropic_request, validation
from synapse_common import responses_input, tasks


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    task: str
    model: str
    stream: bool = False
    messages: list[dict[str, Any]] | None = None   # the prompt as chat messages, or
    text: str = ""                                 # as text
    max_tokens: int = 0
    user: str = ""
    exact: bool = False             # tokenized and remembered in the prefix index
    fields: tuple[str, str] = ("input", "max_tokens")   # prompt and size fields (400s)
    no_cache: str = "not cacheable"  # why the response cache is bypassed ("" = may cache)
    sequences: int = 1              # requests the engine runs for it (seats): documents,
                                    # pairs


def _stream(body: Mapping[str, Any]) -> bool:
    value = body.get("stream", False)
    if value is not None and not isinstance(value, bool):
        raise errors.BadRequest("stream: must be a boolean", param="stream",
                                code="invalid_value")
    return bool(value)


def _count(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if (isinstance(value, bool) or not isinstance(value, int) or value < 1
            or value > validation.MAX_COUNT):
        raise errors.BadRequest(f"{name}: must be an integer of at least 1 and at most "
                                f"{validation.MAX_COUNT}", param=name, code="invalid_value")
    return value


def _required_text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise errors.BadRequest(f"{name}: a non-empty string is required", param=name,
                                code="invalid_value")
    return value


def _text(value: Any) -> str:
    """The text of a content value: a string, or the text of a list of parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(p.get("text", "")) for p in value if isinstance(p, Mapping))
    return ""


# -- /v1/responses -----------------------------------------------------------------------


def responses(body: Mapping[str, Any]) -> Call:
    model = validation.model_name(body)
    messages = responses_messages(body)
    user = body.get("user")
    return Call(tasks.RESPONSES, model, _stream(body), messages=messages,
                max_tokens=_count(body, "max_output_tokens"),
                user=user if isinstance(user, str) else "", exact=True,
                fields=("input", "max_output_tokens"), no_cache=responses_no_cache(body))


def responses_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` (a string or a list of items) as chat messages."""
    out = responses_input.instructions(body)
    value = body.get("input")
    if isinstance(value, str) and value:
        return [*out, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise errors.BadRequest("input: must be a non-empty string or a non-empty list of "
                                "items", param="input", code="invalid_value")
    for item in value:
        if not isinstance(item, Mapping):
            raise errors.BadRequest("input: each item must be an object", param="input",
                                    code="invalid_value")
        out.append(_item(item))
    return out


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    if "role" in item:
        return {"role": responses_input.ROLES.get(str(item["role"]), "user"),
                "content": _text(item.get("content"))}
    turn = responses_input.function_turn(item)
    return turn if turn is not None else {"role": "user", "content": _text(item.get("content"))}


def responses_no_cache(body: Mapping[str, Any]) -> str:
    """Why a Responses call must not be cached ("" when it may be)."""
    if body.get("previous_response_id") is not None:
        return "previous_response_id"
    if body.get("background") is True:
        return "background"
    if body.get("store") is not False:
        return "store"
    tools = body.get("tools") or []
    if not isinstance(tools, list) or any(
            not isinstance(t, Mapping) or t.get("type") != "function" for t in tools):
        return "built-in tools"
    return ""


# -- /v1/messages ------------------------------------------------------------------------


def messages(body: Mapping[str, Any]) -> tuple[Call, dict[str, Any]]:
    """The call, and the chat completions request it translates to (Anthropic's fields
    checked by :func:`anthropic_request.to_chat`, 400 naming the field)."""
    chat = anthropic_request.to_chat(body)
    call = Call(tasks.MESSAGES, chat["model"], chat.get("stream") is True,
                messages=chat["messages"], max_tokens=chat["max_tokens"],
                user=chat.get("user", ""), exact=True, fields=("messages", "max_tokens"),
                no_cache="")
    return call, chat


# -- rerank, score, tokenize, speech ----------------------------------------------------


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [_text([v]) if isinstance(v, Mapping) else str(v) for v in value]
    return []


def rerank(body: Mapping[str, Any]) -> Call:
    model = validation.model_name(body)
    query = _required_text(body, "query")
    docs = _strings(body.get("documents"))
    if not docs:
        raise errors.BadRequest("documents: a non-empty list is required",
                                param="documents", code="invalid_value")
    return Call(tasks.RERANK, model, text="\n".join([query, *docs]),
                fields=("documents", "max_tokens"), no_cache="rerank", sequences=len(docs))


SCORE_SIDES = ("text_1", "text_2", "queries", "documents", "items", "data_1", "data_2")


def bound_input_bytes(task: str, body: Mapping[str, Any], limit: int) -> None:
    """400 naming the field and index when a text of a rerank (its query, each document)
    or a score (each text of each side) is over ``limit`` bytes
    (``http.max_pooling_input_bytes``, :func:`validation.bound_input_bytes`)."""
    if task == tasks.RERANK:
        validation.bound_input_bytes("query", body.get("query"), limit)
        validation.bound_input_bytes("documents", body.get("documents"), limit)
    elif task == tasks.SCORE:
        for name in SCORE_SIDES:
            validation.bound_input_bytes(name, body.get(name), limit)


def score(body: Mapping[str, Any]) -> Call:
    model = validation.model_name(body)
    sides = [_strings(body.get(name)) for name in SCORE_SIDES]
    texts = [t for side in sides for t in side]
    if not texts:
        raise errors.BadRequest("text_1 and text_2 (or queries and documents) are required",
                                param="text_1", code="missing_field")
    # one side against each of the other's (1 x N), or pairwise (N x N): a pair each
    return Call(tasks.SCORE, model, text="\n".join(texts), fields=("text_2", "max_tokens"),
                no_cache="score", sequences=max(len(side) for side in sides))


def tokenize(body: Mapping[str, Any]) -> Call:
    model = validation.model_name(body)
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs:
        text = "\n".join(_text(m.get("content")) for m in msgs if isinstance(m, Mapping))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise errors.BadRequest("prompt (a string) or messages (a non-empty list) is "
                                "required", param="prompt", code="missing_field")
    return Call(tasks.TOKENIZE, model, text=text, fields=("prompt", "max_tokens"),
                no_cache="tokenize")


def detokenize(body: Mapping[str, Any]) -> Call:
    model = validation.model_name(body)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise errors.BadRequest("tokens: a list of token ids is required", param="tokens",
                                code="invalid_value")
    return Call(tasks.TOKENIZE, model, text=" " * len(ids), fields=("tokens", "max_tokens"),
                no_cache="tokenize")


def speech(body: Mapping[str, Any]) -> Call:
    model = validation.model_name(body)
    text = _required_text(body, "input")
    return Call(tasks.SPEECH, model, text=text, fields=("input", "max_tokens"),
                no_cache="audio")
