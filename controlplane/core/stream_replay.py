"""A stored response replayed as a stream with the shape of a live one.

Per choice: the role chunk (chat), the content, the finish chunk; then the usage chunk
(empty ``choices``) *only* when the request asked for it (``stream_options.include_usage``,
as a live stream does); then ``data: [DONE]``.

The chunks are in the stream's own form when the answer was stored from a stream (the
skeletons ``stream_fold`` recorded: a backend's extra fields such as vLLM's
``token_ids`` or ``stop_reason`` and where it puts them) or when the cache has seen a
stream of the same model (the caller passes that form), else in the OpenAI form the
simulator sends: role chunk ``{"role", "content": ""}``, content chunks, a finish chunk
with an empty delta (and ``stop_reason`` when the answer has one), the fingerprint at the
end only, as vLLM sends it: on the usage chunk when one is sent, else on the finish chunk
of every choice (``n`` > 1 too), and not at all when the answer's is ``null``; the usage
chunk without its ``null`` fields (vLLM drops them there). The answer's own ``id``, ``created``, ``model`` and
fingerprint fill the skeletons' fields of those names; ``object`` is always the answer's
kind's (``chat.completion.chunk`` or ``text_completion``), and a recorded form of the
other kind is never used.

A hit is a new answer: :func:`renewed` gives it a fresh ``id`` (the stored one's prefix,
``chatcmpl-`` or ``cmpl-``, and new random digits) and ``created`` now, as a backend gives
every answer, before it is sent whole or replayed.

The content of a choice goes out in one chunk per field, in the order a backend streams
them: reasoning (``reasoning_content`` / ``reasoning``) and other text fields, the content,
the tool calls. Its logprobs travel with the content chunk; when the recorded form puts
the last token in the finish chunk (vLLM does), the last token and its logprobs go there.
Folding the replay again gives back the stored response, field for field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from controlplane.core import stream_fold

DONE = "[DONE]"
_SPECIAL = frozenset({"role", "content", "tool_calls", "function_call"})
_OWN = ("id", "created", "model", "system_fingerprint")   # the answer's, in any form


def event(payload: Mapping[str, Any] | str) -> bytes:
    """One SSE event carrying ``payload`` (a JSON object, or ``[DONE]``)."""
    body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + body + b"\n\n"


def renewed(response: Mapping[str, Any], created: int, digits: str) -> Mapping[str, Any]:
    """``response`` as a new answer: ``id`` the stored one's prefix (up to its first
    ``-``; ``chatcmpl-`` or ``cmpl-`` by kind when it has none) and ``digits``, ``created``
    the given time. A client tells answers apart by id, and a stored id and time, up to a
    TTL old, would say the answer is that old one. The recorded form is kept."""
    out = dict(response)
    if isinstance(out.get("id"), str) and out["id"]:
        old = out["id"]
        cut = old.find("-")
        prefix = old[:cut + 1] if cut >= 0 else (
            "cmpl-" if out.get("object") == "text_completion" else "chatcmpl-")
        out["id"] = prefix + digits
    if "created" in out:
        out["created"] = created
    form = getattr(response, "form", None)
    return stream_fold.Assembled(out, form) if form is not None else out


def replay(response: Mapping[str, Any], form: Mapping[str, Any] | None = None,
           include_usage: bool = True) -> Iterator[bytes]:
    """A stored non-streaming response as SSE events, ending with ``data: [DONE]``."""
    chat = response.get("object", "chat.completion") != "text_completion"
    recorded = getattr(response, "form", None) or form or {}
    if _is_chat(recorded) not in (None, chat):
        recorded = {}       # another endpoint's stream: never its shape (default form)
    shape = _templates(response, chat, recorded)
    per_choice = [list(_choice_chunks(shape, choice, chat, "finish" in recorded))
                  for choice in response.get("choices") or ()]
    chunks = [chunk for choice_chunks in per_choice for chunk in choice_chunks]
    for chunk in chunks:
        if not include_usage:
            chunk.pop("usage", None)
    usage = response.get("usage")
    ends = [c[-1] for c in per_choice if c]     # each choice's finish chunk
    if include_usage and isinstance(usage, Mapping):
        # vLLM sends its usage chunk without its null fields (exclude_none).
        chunks.append({**shape["usage"], "usage": _without_nulls(usage)})
        ends = chunks[-1:]
    if _fingerprint_last(recorded) and response.get("system_fingerprint") is not None:
        for chunk in ends:
            chunk["system_fingerprint"] = response["system_fingerprint"]
    for chunk in chunks:
        yield event(chunk)
    yield event(DONE)


def _without_nulls(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Usage as vLLM's usage chunk sends it: no null field, in its parts neither."""
    return {k: _without_nulls(v) if isinstance(v, Mapping) else v
            for k, v in usage.items() if v is not None}


def _templates(response: Mapping[str, Any], chat: bool,
               recorded: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Skeletons by kind, filled with the answer's own id, created, model, fingerprint
    (which goes only on the last chunk where the recorded form had it there)."""
    shape = {**default_form(response, chat),
             **{k: v for k, v in recorded.items() if isinstance(v, Mapping)}}
    own = {k: response[k] for k in _OWN if k in response}
    last_only = _fingerprint_last(recorded)
    # ``object`` is the answer's kind's, whatever a recorded skeleton says.
    kind_of = {"object": "chat.completion.chunk" if chat else "text_completion"}
    return {kind: {**{k: v for k, v in t.items()
                      if not (last_only and k == "system_fingerprint")},
                   **{k: v for k, v in own.items() if k in t and not
                      (last_only and k == "system_fingerprint")}, **kind_of}
            for kind, t in shape.items()}


def _fingerprint_last(recorded: Mapping[str, Any]) -> bool:
    """Whether the fingerprint goes at the end only: where the recorded stream had it on
    its last chunk only, and in the default form (vLLM's: on the usage chunk when one is
    sent, else on each choice's finish chunk)."""
    return not recorded or recorded.get(stream_fold.FINGERPRINT) == "last"


def _is_chat(form: Mapping[str, Any]) -> bool | None:
    """Whether a recorded form is a chat stream's (None: no skeleton says)."""
    for skeleton in form.values():
        if isinstance(skeleton, Mapping) and "object" in skeleton:
            return bool(skeleton["object"] != "text_completion")
    return None


def default_form(response: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """Skeletons of the OpenAI stream form (vLLM's and the simulator's)."""
    head = _head(response, chat)
    body: dict[str, Any] = ({"delta": {}} if chat else {"text": ""})
    blank = {"index": 0, **body, "logprobs": None, "finish_reason": None}
    form = {"content": {**head, "choices": [blank]}, "finish": {**head, "choices": [blank]},
            "usage": {**head, "choices": []}}
    if chat:
        form["role"] = {**head, "choices": [{**blank, "delta": {"role": "assistant",
                                                                "content": ""}}]}
    return form


def _head(response: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    return {"id": response.get("id", ""),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": response.get("created", 0), "model": response.get("model", "")}


def _chunk(template: Mapping[str, Any], index: Any, **choice: Any) -> dict[str, Any]:
    shell = dict((template.get("choices") or [{}])[0])
    shell.update(index=index, **choice)
    if shell.get("logprobs") == stream_fold.LOGPROBS_PRESENT:
        shell["logprobs"] = None
    return {**template, "choices": [shell]}


def _choice_chunks(shape: Mapping[str, Any], choice: Mapping[str, Any], chat: bool,
                   recorded: bool) -> Iterator[dict[str, Any]]:
    idx = choice.get("index", 0)
    message = choice.get("message") or {}
    if chat and "role" in shape:
        role = _chunk(shape["role"], idx)
        role["choices"][0]["delta"] = {**role["choices"][0].get("delta", {}),
                                       "role": message.get("role", "assistant")}
        yield role
    pieces = _pieces(message) if chat else [{"text": choice.get("text") or ""}]
    logprobs, last_piece, last_logprobs = _split_last(shape, choice, pieces, chat)
    carrier = next((i for i, p in enumerate(pieces) if "content" in p or "text" in p), 0)
    for i, piece in enumerate(pieces):
        fields = ({"delta": piece} if chat else piece)
        yield _chunk(shape["content"], idx, **fields,
                     logprobs=logprobs if i == carrier else None, finish_reason=None)
    finish = _chunk(shape["finish"], idx, logprobs=last_logprobs,
                    finish_reason=choice.get("finish_reason"))
    shell = finish["choices"][0]
    if chat:
        shell["delta"] = {**(shell.get("delta") or {}), **last_piece}
    else:
        shell["text"] = last_piece.get("text", "")
    # Fields a backend adds to its choices (stop_reason, ...): those its stream form has.
    shell.update({k: v for k, v in choice.items() if k not in stream_fold.CHOICE_FIELDS
                  and (k in shell or not recorded)})
    yield finish


def _pieces(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The deltas of one message, in streaming order."""
    out: list[dict[str, Any]] = [{k: v} for k, v in message.items()
                                 if k not in _SPECIAL and isinstance(v, str) and v]
    if message.get("content"):
        out.append({"content": message["content"]})
    if message.get("tool_calls"):
        out.append({"tool_calls": [{**call, "index": i}
                                   for i, call in enumerate(message["tool_calls"])]})
    if message.get("function_call"):
        out.append({"function_call": message["function_call"]})
    return out or [{"content": ""}]


def _split_last(shape: Mapping[str, Any], choice: Mapping[str, Any],
                pieces: list[dict[str, Any]], chat: bool
                ) -> tuple[Any, dict[str, Any], Any]:
    """(logprobs of the content chunk, text of the finish chunk, its logprobs): where the
    recorded form had logprobs in the finish chunk, the last token's logprobs go there,
    with its text when the content ends with it (a stop token's is not in the content)."""
    logprobs = choice.get("logprobs")
    finish = (shape["finish"].get("choices") or [{}])[0]
    if finish.get("logprobs") != stream_fold.LOGPROBS_PRESENT or not isinstance(
            logprobs, Mapping):
        return logprobs, {}, None
    tokens = logprobs.get("content") if chat else logprobs.get("tokens")
    if not tokens:
        return logprobs, {}, None
    head = {k: v[:-1] if isinstance(v, list) else v for k, v in logprobs.items()}
    tail = {k: v[-1:] if isinstance(v, list) else v for k, v in logprobs.items()}
    last = tokens[-1]
    token = last.get("token", "") if isinstance(last, Mapping) else str(last)
    key = "content" if chat else "text"
    carrier = next((p for p in pieces if key in p), None)
    if not token or carrier is None or not carrier[key].endswith(token):
        return head, {}, tail
    carrier[key] = carrier[key][:-len(token)]
    return head, {key: token}, tail
