"""Parsing and checking OpenAI chat / completions request bodies, vLLM style.

Hand-written checks instead of a pydantic model of the whole body: this is the hot path
of a process that must answer thousands of requests a second on one core, and only a
few fields change what the simulator does. Invalid values are answered 400
``BadRequestError`` with the offending field in ``param`` (vLLM answers request
validation errors 400, not FastAPI's 422); unknown fields are ignored, as vLLM does.

Fields that matter: ``model``, ``messages`` / ``prompt``, ``n``, ``max_tokens``
(or ``max_completion_tokens``), ``stop``, ``seed``, ``stream``, ``stream_options``,
``ignore_eos`` (vLLM extension). Sampling fields (``temperature``, ``top_p``, penalties)
are type-checked and otherwise have no effect: the output is a function of prompt and
seed only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import orjson

from simulator import errors, toolcalls
from synapse_common import tokens

MAX_N = 128


@dataclasses.dataclass
class GenRequest:
    chat: bool
    model: str | None
    prompts: list[str]  # chat: the messages through the chat template; else each prompt
    messages: list[dict[str, Any]] | None  # chat only
    n: int
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool
    tools: list[toolcalls.Tool] = dataclasses.field(default_factory=list)  # chat only
    tool_choice: str = "none"
    last_user: str = ""  # chat: the last user message's text (steers tool_choice auto)
    cache_salt: str | None = None  # partitions the prefix cache, as vLLM's


@dataclasses.dataclass(frozen=True)
class BodyRefusal:
    """How a server refuses a body that is not a JSON object: its error class, and its
    messages for a body that does not parse (``{}`` takes the parser's reason) and for
    one that parses to something else."""

    error: type[errors.SimError]
    unparsed: str
    not_an_object: str


VLLM_BODY = BodyRefusal(errors.BadRequest, "The request body is not valid JSON: {}",
                        "The request body must be a JSON object.")


def parse_body(raw: bytes, refusal: BodyRefusal = VLLM_BODY) -> dict[str, Any]:
    """The JSON object a request body holds, or the error ``refusal`` names (vLLM's 400
    unless told otherwise)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise refusal.error(refusal.unparsed.format(exc)) from None
    if not isinstance(body, dict):
        raise refusal.error(refusal.not_an_object)
    return body


def integer(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.BadRequest(f"{name} must be an integer, got {value!r}.", param=name)
    if value < minimum:
        raise errors.BadRequest(f"{name} must be at least {minimum}, got {value}.", param=name)
    return value


def number(body: Mapping[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise errors.BadRequest(f"{name} must be a number, got {value!r}.", param=name)


def boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise errors.BadRequest(f"{name} must be a boolean, got {value!r}.", param=name)
    return value


def cache_salt(body: Mapping[str, Any]) -> str | None:
    """vLLM's ``cache_salt``: prompts under different salts share no cached block."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt or len(salt) > 128 or any(
            c in salt for c in "@/\\\x00"):
        raise errors.BadRequest("Parameter 'cache_salt' must be a non-empty string of at most "
                                "128 characters without '@', '/', '\\' or NUL.",
                                param="cache_salt")
    return salt


def stop_list(body: Mapping[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise errors.BadRequest("stop must be a string or a list of strings.", param="stop")


def model_name(body: Mapping[str, Any]) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise errors.BadRequest("model must be a string.", param="model")
    return value or None


def check_served(model: str | None, served: Sequence[str]) -> None:
    """vLLM's 404 for a model this engine does not serve (``None``: none asked, fine)."""
    if model is not None and model not in served:
        raise errors.NotFound(f"The model `{model}` does not exist.", param="model")


def check_format(fmt: str, formats: Collection[str]) -> None:
    """The 400 for an audio ``response_format`` the simulator does not produce."""
    if fmt not in formats:
        raise errors.BadRequest(f"response_format {fmt!r} is not produced by the "
                                f"simulator (it makes {', '.join(formats)}).",
                                param="response_format")


def served_model(model: str | None, served: Sequence[str]) -> str:
    """The model asked for, or the engine's first when the request names none."""
    check_served(model, served)
    return served[0] if model is None else model


def text_of(content: Any) -> str:
    """Plain text of a content value: a string, or the text of a list of parts in any of
    the three dialects (``text``, ``input_text``, ``output_text`` parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(p.get("text", "")) for p in content
                       if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    raise errors.BadRequest("content must be a string or a list of content parts.",
                            param="content")


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.BadRequest("messages must be a non-empty list of messages.",
                                param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise errors.BadRequest(f"messages[{i}] must be an object with a string 'role'.",
                                    param="messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise errors.BadRequest(f"messages[{i}].content must be a string or a list of "
                                    "content parts.", param="messages")
    return messages


def _prompts(body: Mapping[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [_ids_text(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
               for p in prompt):
            return [_ids_text(p) for p in prompt]
    raise errors.BadRequest("prompt must be a string, a list of strings, or token ids.",
                            param="prompt")


def _ids_text(ids: list[int]) -> str:
    # Token-id prompts have no text; a stable stand-in keeps output and caching
    # deterministic. Its token count is not the id count (a documented approximation).
    return " ".join(str(i) for i in ids)


def parse(body: Mapping[str, Any], chat: bool) -> GenRequest:
    """Check a chat (``chat=True``) or completions body; raises ``errors.BadRequest``."""
    messages = _messages(body) if chat else None
    prompts = [tokens.render_chat(messages)] if messages is not None else _prompts(body)
    max_tokens = integer(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", 1)
    n = integer(body, "n", 1) or 1
    if n > MAX_N:
        raise errors.BadRequest(f"n must be at most {MAX_N}, got {n}.", param="n")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        number(body, name)
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise errors.BadRequest("Stream options can only be defined when `stream=True`.",
                                    param="stream_options")
        if not isinstance(options, dict):
            raise errors.BadRequest("stream_options must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise errors.BadRequest(f"seed must be an integer, got {seed!r}.", param="seed")
    gen = GenRequest(chat=chat, model=model_name(body), prompts=prompts, messages=messages, n=n,
                     max_tokens=max_tokens, stop=stop_list(body), seed=seed, stream=stream,
                     include_usage=include_usage, ignore_eos=boolean(body, "ignore_eos"),
                     cache_salt=cache_salt(body))
    if messages is not None:
        gen.tools, gen.tool_choice = toolcalls.chat_tools(body)
        gen.last_user = next((text_of(m.get("content")) for m in reversed(messages)
                              if m.get("role") == "user"), "")
    return gen


def context_error(max_model_len: int, prompt_tokens: int, max_tokens: int | None,
                  chat: bool) -> errors.BadRequest | None:
    """vLLM's context-length errors, or None when the request fits."""
    where = "messages" if chat else "prompt"
    if prompt_tokens >= max_model_len:
        return errors.BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_tokens} input tokens. Please reduce the length of the "
            f"input {where}.", param="input_tokens")
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        return errors.BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
            f"{where}, {max_tokens} in the completion). Please reduce the length of the "
            f"{where} or completion.", param="max_tokens")
    return None
