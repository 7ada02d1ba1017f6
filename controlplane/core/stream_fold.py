"""Folding stream chunks into the non-streaming response they add up to, losing nothing.

Per choice: the role; every string field of the deltas concatenated (``content``,
``reasoning_content`` or ``reasoning``, ``refusal``, and any such field a backend adds),
a field only ever sent as ``null`` kept as ``null``; tool calls (and the legacy
``function_call``) merged by index; logprobs merged (the token lists of chat and of
completions concatenated); the finish reason; any other choice field (``stop_reason``,
``token_ids``) as last sent. Top level: ``id``, ``created``, ``model`` and every other
field (``system_fingerprint``, ``service_tier``, …) as first sent; ``usage`` as sent (a
stream carries it only when ``stream_options.include_usage`` was asked).

The fold also records the stream's *form*: the first chunk of each kind (role, content,
finish, usage) as a skeleton (:func:`skeleton`). ``stream_replay`` fills these
skeletons, so a replayed answer has the shape of the backend's own stream. A form is
replayed to other requests than the one that streamed it, so a skeleton keeps shape and
nothing of that request: only the fields of the OpenAI chunk (:data:`SKELETON_TOP`,
:data:`SKELETON_CHOICE`), every other field's value emptied to ``null``, and in a delta
only the role, emptied strings and nulls. vLLM puts the request's prompt text and token
ids in its chunks when asked (``return_prompt_text``, ``return_token_ids``): kept, they
would be replayed to whoever the form serves next.

**A vLLM stream folds into vLLM's whole answer.** vLLM sends a whole answer with every
field of its response model, ``null`` when unset (``model_dump``), but its chunks carry
only the fields it set (``exclude_unset``). A stream of a recent vLLM's (a choice carrying
``token_ids``, which vLLM sets on every token chunk and OpenAI and the simulator never
send) therefore gets, where the stream left them out, the fields vLLM's own whole answer
of that endpoint carries (:data:`VLLM_WHOLE`, vLLM 0.32's ``ChatCompletionResponse`` /
``CompletionResponse``), at vLLM's defaults: a client that reads ``choices[0]["message"]
["refusal"]`` or ``["service_tier"]`` of a whole answer reads it on a hit as on a miss.
Another backend's stream is folded as sent: its chunks carry its own nulls. vLLM's usage
chunk drops its null fields (``exclude_none``), which its whole answer keeps (its
``UsageInfo``): a folded vLLM ``usage`` gets them back (:data:`VLLM_USAGE`, and
:data:`VLLM_PROMPT_DETAILS` inside ``prompt_tokens_details`` when that is sent), its
numbers as streamed; a replay drops them again, as vLLM's stream does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

CHOICE_FIELDS = frozenset({"index", "delta", "text", "logprobs", "finish_reason", "message"})
TOP_FIELDS = frozenset({"object", "choices", "usage"})
LOGPROBS_PRESENT = "present"    # a skeleton's marker: this chunk kind carried logprobs
# What a skeleton keeps with its value (the answer's own values replace id, created,
# model and the fingerprint on replay); any other field is kept as null.
SKELETON_TOP = frozenset({"id", "object", "created", "model", "system_fingerprint"})
SKELETON_CHOICE = frozenset({"index", "delta", "text", "logprobs", "finish_reason"})
FINGERPRINT = "fingerprint"     # form key: "last" when only the last chunk carries it (vLLM)
VLLM_MARK = "token_ids"         # a choice field only (recent) vLLM's streams send


class WholeFields(NamedTuple):
    """Fields of one endpoint's whole answer, by level, with vLLM's default values."""

    top: Mapping[str, Any]
    choice: Mapping[str, Any]
    message: Mapping[str, Any]


_NULLS = dict.fromkeys
# vLLM's whole answers by ``object``: the fields its response models (vLLM 0.32) always
# serialize; ``message.tool_calls`` only when not empty, so it is not among them.
VLLM_WHOLE = {
    "chat.completion": WholeFields(
        top=_NULLS(("service_tier", "system_fingerprint", "prompt_logprobs",
                    "prompt_token_ids", "prompt_text", "kv_transfer_params",
                    "ec_transfer_params", "metrics")),
        choice=_NULLS(("stop_reason", "token_ids", "routed_experts")),
        message=_NULLS(("refusal", "annotations", "audio", "function_call", "reasoning"))),
    "text_completion": WholeFields(
        top=_NULLS(("service_tier", "system_fingerprint", "kv_transfer_params",
                    "ec_transfer_params", "metrics")),
        choice=_NULLS(("stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids",
                       "routed_experts")),
        message={}),
}
# vLLM's ``UsageInfo`` (both endpoints) and its ``PromptTokenUsageInfo``: fields whose
# default is null, so a usage chunk leaves them out and a whole answer sends them null.
VLLM_USAGE = _NULLS(("prompt_tokens_details", "completion_tokens_details"))
VLLM_PROMPT_DETAILS = _NULLS(("cached_tokens", "created_cache_tokens", "multimodal_tokens"))


class Assembled(dict[str, Any]):
    """A non-streaming response folded from a stream; ``form`` is that stream's skeleton
    chunks by kind (``role``, ``content``, ``finish``, ``usage``)."""

    def __init__(self, data: Mapping[str, Any], form: Mapping[str, Any]) -> None:
        super().__init__(data)
        self.form = dict(form)


class _Choice:
    def __init__(self) -> None:
        self.role: str | None = None
        self.texts: dict[str, list[str]] = {}
        self.nulls: set[str] = set()
        self.tools: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, Any] | None = None
        self.logprobs: Any = None
        self.finish_reason: Any = None
        self.extras: dict[str, Any] = {}
        self.delta_extras: dict[str, Any] = {}

    def add_delta(self, delta: Mapping[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role":
                self.role = value or self.role
            elif key == "tool_calls":
                for call in value or ():
                    _add_tool_call(self.tools, call)
            elif key == "function_call" and isinstance(value, Mapping):
                self.function_call = self.function_call or {"name": "", "arguments": ""}
                for part in ("name", "arguments"):
                    self.function_call[part] += value.get(part) or ""
            elif isinstance(value, str):
                self.texts.setdefault(key, []).append(value)
            elif value is None:
                self.nulls.add(key)
            else:
                self.delta_extras[key] = value

    def text(self, key: str) -> str:
        return "".join(self.texts.get(key, ()))

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role or "assistant", "content": self.text("content")}
        for key in self.texts:
            out[key] = self.text(key)
        for key in self.nulls - set(out):
            out[key] = None
        out.update(self.delta_extras)
        if self.tools:
            out["tool_calls"] = [self.tools[k] for k in sorted(self.tools)]
            if not out["content"]:
                out["content"] = None
        if self.function_call is not None:
            out["function_call"] = self.function_call
        return out


def _add_tool_call(tools: dict[int, dict[str, Any]], call: Mapping[str, Any]) -> None:
    slot = tools.setdefault(int(call.get("index", 0)), {
        "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if call.get("id"):
        slot["id"] = call["id"]
    if call.get("type"):
        slot["type"] = call["type"]
    fn = call.get("function") or {}
    if fn.get("name"):
        slot["function"]["name"] += fn["name"]
    if fn.get("arguments"):
        slot["function"]["arguments"] += fn["arguments"]


def merge_logprobs(acc: Any, new: Any) -> Any:
    """Logprobs of two consecutive pieces: token lists concatenated, other fields kept."""
    if new is None:
        return acc
    if not isinstance(new, Mapping):
        return copy.deepcopy(new) if acc is None else acc
    out = dict(acc) if isinstance(acc, Mapping) else {}
    for key, value in new.items():
        if isinstance(value, list):
            before = out.get(key)
            out[key] = [*(before if isinstance(before, list) else ()), *value]
        elif out.get(key) is None:
            out[key] = value
    return out


class Fold:
    def __init__(self) -> None:
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._texts: dict[int, list[str]] = {}
        self._usage: Any = None
        self._chat = True
        self.form: dict[str, Any] = {}
        self._fingerprints: list[bool] = []     # first chunk's, last chunk's
        self._vllm = False                      # a choice carried VLLM_MARK

    def add(self, chunk: Mapping[str, Any]) -> None:
        has = "system_fingerprint" in chunk
        self._fingerprints[1:] = [has]
        if len(self._fingerprints) == 1:
            self._fingerprints.insert(0, has)
        for key, value in chunk.items():
            if key not in TOP_FIELDS and key not in self._meta:
                self._meta[key] = value
        if chunk.get("object") == "text_completion":
            self._chat = False
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choices = chunk.get("choices") or ()
        self._record(chunk, choices)
        for choice in choices:
            self._add_choice(choice)

    def _add_choice(self, choice: Mapping[str, Any]) -> None:
        idx = int(choice.get("index", 0))
        acc = self._choices.setdefault(idx, _Choice())
        if "text" in choice:
            self._chat = False
            self._texts.setdefault(idx, []).append(str(choice.get("text") or ""))
        acc.add_delta(choice.get("delta") or {})
        acc.logprobs = merge_logprobs(acc.logprobs, choice.get("logprobs"))
        if choice.get("finish_reason"):
            acc.finish_reason = choice["finish_reason"]
        for key, value in choice.items():
            if key not in CHOICE_FIELDS:
                acc.extras[key] = value
        self._vllm = self._vllm or VLLM_MARK in choice

    def _record(self, chunk: Mapping[str, Any], choices: Any) -> None:
        """Keep the first chunk of each kind as a skeleton of the stream's form."""
        if not choices:
            kind = "usage" if "usage" in chunk else ""
        else:
            first = choices[0]
            delta = first.get("delta") or {}
            kind = ("finish" if first.get("finish_reason") else
                    "role" if delta.get("role") else "content")
        if kind and kind not in self.form:
            self.form[kind] = skeleton(chunk)

    def finish_reasons(self) -> list[Any]:
        return [c.finish_reason for c in self._choices.values()]

    def response(self, default_created: int) -> Assembled:
        out: dict[str, Any] = {
            "id": self._meta.get("id", ""),
            "object": "chat.completion" if self._chat else "text_completion",
            "created": self._meta.get("created", default_created),
            "model": self._meta.get("model", ""),
            "choices": [self._render(i, c) for i, c in sorted(self._choices.items())],
        }
        out.update({k: v for k, v in self._meta.items() if k not in out})
        if self._usage is not None:
            out["usage"] = self._usage
        if self._vllm:
            out = as_vllm_whole(out)
        form = dict(self.form)
        if self._fingerprints[:1] == [False] and self._fingerprints[-1:] == [True]:
            form[FINGERPRINT] = "last"
        return Assembled(out, form)

    def _render(self, idx: int, acc: _Choice) -> dict[str, Any]:
        out: dict[str, Any] = {"index": idx}
        if self._chat:
            out["message"] = acc.message()
        else:
            out["text"] = "".join(self._texts.get(idx, ()))
        out["logprobs"] = acc.logprobs
        out["finish_reason"] = acc.finish_reason
        out.update(acc.extras)
        return out


def as_vllm_whole(response: Mapping[str, Any]) -> dict[str, Any]:
    """``response`` with every field vLLM's whole answer of its kind carries (see the
    module docstring): those it lacks added at vLLM's default, the others as they are."""
    fields = VLLM_WHOLE.get(str(response.get("object")))
    if fields is None:
        return dict(response)
    out = _with(response, fields.top)
    out["choices"] = [_with_defaults(c, fields) for c in response.get("choices") or ()]
    if isinstance(out.get("usage"), Mapping):
        out["usage"] = _vllm_usage(out["usage"])
    return out


def _vllm_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    out = _with(usage, VLLM_USAGE)
    if isinstance(out["prompt_tokens_details"], Mapping):
        out["prompt_tokens_details"] = _with(out["prompt_tokens_details"], VLLM_PROMPT_DETAILS)
    return out


def _with(fields: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` and, after them, each of ``defaults`` it lacks."""
    return {**fields, **{k: v for k, v in defaults.items() if k not in fields}}


def _with_defaults(choice: Any, fields: WholeFields) -> Any:
    if not isinstance(choice, Mapping):
        return choice
    out = _with(choice, fields.choice)
    if isinstance(out.get("message"), Mapping):
        out["message"] = _with(out["message"], fields.message)
    return out


def skeleton(chunk: Mapping[str, Any]) -> dict[str, Any]:
    """A chunk's shape and nothing of its request (see the module docstring): texts "",
    logprobs a marker, usage and every field not of the OpenAI chunk None."""
    out: dict[str, Any] = {k: (v if k in SKELETON_TOP and isinstance(v, str | int) else None)
                           for k, v in chunk.items() if k != "choices"}
    choices = []
    for choice in (chunk.get("choices") or ())[:1]:
        shell: dict[str, Any] = {k: None if k not in SKELETON_CHOICE else v
                                 for k, v in choice.items()}
        delta = shell.get("delta")
        if isinstance(delta, Mapping):
            shell["delta"] = {k: _emptied(k, v) for k, v in delta.items()
                              if isinstance(v, str) or v is None}
        elif "delta" in shell:
            shell["delta"] = {}
        if "text" in shell:
            shell["text"] = ""
        if shell.get("logprobs") is not None:
            shell["logprobs"] = LOGPROBS_PRESENT
        if "index" in shell and not isinstance(shell["index"], int):
            shell["index"] = 0
        if "finish_reason" in shell:       # the replay sets the answer's own
            shell["finish_reason"] = None
        choices.append(shell)
    out["choices"] = choices
    return out


def _emptied(key: str, value: str | None) -> str | None:
    """A delta's field in a skeleton: the role as sent (a fixed word), texts emptied."""
    if value is None or (key == "role" and value in ("assistant", "tool", "user", "system")):
        return value
    return ""
