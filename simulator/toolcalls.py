"""Deterministic tool calls: when the simulated model calls a tool, and with what.

The simulator behaves like a vLLM started with ``--enable-auto-tool-choice
--tool-call-parser …`` (without them vLLM 0.32 answers 400 to any request whose
``tool_choice`` is not ``none``). The rule, the same for chat, Responses and Messages:

* ``none`` (or no tools): never calls one;
* a named tool (chat ``{"type": "function", "function": {"name"}}``, Responses
  ``{"type": "function", "name"}``, Anthropic ``{"type": "tool", "name"}``): calls it;
* ``required`` / Anthropic ``any``: calls the first tool whose name appears in the last
  user message, else the first tool;
* ``auto`` (the default when tools are given): calls the first tool whose name appears
  in the last user message, else answers with text. Tests steer it by naming the tool.

Arguments are generated from the tool's JSON schema (required properties, or all of
them when none are required): strings are words of the simulator's vocabulary, numbers
small integers, booleans, the first ``enum`` value, one-item arrays, nested objects. They
are a function of (tool name, last user message, seed), like the simulator's text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from simulator import errors, textgen

MAX_DEPTH = 4  # nested objects / arrays in a generated argument


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    schema: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text, as the OpenAI shapes carry it
    id: str  # chatcmpl-tool-<16 hex>

    @property
    def input(self) -> Any:
        return orjson.loads(self.arguments)


# choice: "none" | "auto" | "required" | the name of one tool
def choose(tools: Sequence[Tool], choice: str, last_user: str, seed: int) -> Call | None:
    if not tools or choice == "none":
        return None
    by_name = {t.name: t for t in tools}
    if choice not in ("auto", "required"):
        if choice not in by_name:
            raise errors.BadRequest(f"tool_choice names {choice!r}, which is not in tools",
                                    param="tool_choice")
        return _call(by_name[choice], last_user, seed)
    lowered = last_user.lower()
    named = next((t for t in tools if t.name.lower() in lowered), None)
    if named is None and choice == "required":
        named = tools[0]
    return None if named is None else _call(named, last_user, seed)


def _call(tool: Tool, last_user: str, seed: int) -> Call:
    digest = hashlib.blake2b(f"{seed}\x00{tool.name}\x00{last_user}".encode(
        "utf-8", "surrogatepass"), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    value = _value(tool.schema, rng, 0)
    if not isinstance(value, dict):
        value = {}
    # vLLM names every call this way, in chat, Responses (call_id) and Messages (tool_use id)
    return Call(tool.name, orjson.dumps(value).decode(), "chatcmpl-tool-" + uuid.uuid4().hex[:16])


def _value(schema: Any, rng: random.Random, depth: int) -> Any:
    if not isinstance(schema, Mapping):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and "properties" in schema):
        return _object(schema, rng, depth)
    if kind == "array":
        return [] if depth >= MAX_DEPTH else [_value(schema.get("items", {}), rng, depth + 1)]
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return float(rng.randint(1, 100))
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(textgen.WORDS)


def _object(schema: Mapping[str, Any], rng: random.Random, depth: int) -> dict[str, Any]:
    props = schema.get("properties")
    if not isinstance(props, Mapping) or depth >= MAX_DEPTH:
        return {}
    required = schema.get("required")
    names = [n for n in required if n in props] if isinstance(required, list) and required \
        else list(props)
    return {name: _value(props[name], rng, depth + 1) for name in names}


def pieces(arguments: str) -> list[str]:
    """The argument text cut as a stream sends it: about one token (4 characters) each."""
    return [arguments[i:i + 4] for i in range(0, len(arguments), 4)] or [""]


# -- the three request dialects ------------------------------------------------------------

def _tool_list(value: Any, param: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise errors.BadRequest(f"{param} must be a list of objects.", param=param)
    return value


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise errors.BadRequest(f"{param} needs a tool name.", param=param)
    return value


def chat_tools(body: Mapping[str, Any]) -> tuple[list[Tool], str]:
    """Chat completions: ``tools: [{"type": "function", "function": {...}}]``."""
    tools = []
    for t in _tool_list(body.get("tools"), "tools"):
        fn = t.get("function")
        if isinstance(fn, Mapping):
            tools.append(Tool(_name(fn.get("name"), "tools"), fn.get("parameters") or {}))
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        choice = _name(fn.get("name") if isinstance(fn, Mapping) else None, "tool_choice")
    return tools, _mode(choice)


def responses_tools(body: Mapping[str, Any]) -> tuple[list[Tool], str]:
    """Responses: ``tools: [{"type": "function", "name", "parameters"}]`` (others ignored)."""
    tools = [Tool(_name(t.get("name"), "tools"), t.get("parameters") or {})
             for t in _tool_list(body.get("tools"), "tools") if t.get("type") == "function"]
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, Mapping):
        choice = _name(choice.get("name"), "tool_choice")
    return tools, _mode(choice)


def anthropic_tools(body: Mapping[str, Any]) -> tuple[list[Tool], str]:
    """Messages: ``tools: [{"name", "input_schema"}]``, ``tool_choice: {"type": …}``."""
    tools = [Tool(_name(t.get("name"), "tools"), t.get("input_schema") or {})
             for t in _tool_list(body.get("tools"), "tools")]
    choice = body.get("tool_choice")
    if choice is None:
        return tools, "auto" if tools else "none"
    if not isinstance(choice, Mapping):
        raise errors.BadRequest("tool_choice must be an object.", param="tool_choice")
    kind = choice.get("type")
    if kind == "tool":
        return tools, _name(choice.get("name"), "tool_choice")
    return tools, {"auto": "auto", "any": "required", "none": "none"}.get(str(kind), "auto")


def _mode(choice: Any) -> str:
    if not isinstance(choice, str):
        raise errors.BadRequest("tool_choice must be a string or an object.",
                                param="tool_choice")
    return choice
