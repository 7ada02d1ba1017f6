"""The cache rules: scope, semantic text, exact key, cacheability and bypass.

This is the one home of the rules in DESIGN.md "Cache rules"; L1, L2, the response cache
and the invalidation path all call it, so two layers can never disagree on what "the same
request" means.

Design decisions:

- **Scope** = tenant, canonical model, embedder id and a *context hash*. The context hash
  is conservative on purpose: it covers the whole request body except the last user
  message and a short list of fields that provably do not change the answer (``model`` —
  replaced by the canonical model —, ``stream`` and ``stream_options``, which only change
  the framing, and ``user``, an end-user tag for abuse monitoring). Everything else —
  system prompts, earlier turns, tools / functions / tool_choice, response_format, every
  sampling parameter, and any field we do not know — is context. An unknown field
  therefore splits the scope rather than risking a wrong answer.
- Numbers are canonicalised (``0`` and ``0.0`` are the same temperature), so a client that
  serialises floats differently still hits; strings, lists and objects are compared
  exactly.
- **Semantic text** = the text of the last user message (text parts joined). When the last
  message is not a user text message (a tool result, an image part, an assistant prefill),
  there is no semantic text: the whole message list is context and only the exact layer
  applies. Nor when the request asks the engine to echo its prompt (:data:`ECHOING`:
  ``echo``, vLLM's ``return_prompt_text``, ``return_token_ids``, ``prompt_logprobs``):
  the answer then carries the prompt, which only an identical request may be given.
- **Exact key** = SHA-256 over the scope hash and the semantic text (or, without one, the
  canonical last message).
- **Temperature**: a request that sets none gets the backend's default, which for OpenAI
  and vLLM is 1.0; ``default_temperature`` says what we assume, so a ceiling of 0.7 does
  not cache requests that never asked for determinism.
- **Cache-Control**: ``no-cache`` skips the lookup but still stores; ``no-store`` still
  looks up but never stores; both together make the request a plain bypass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import orjson

from controlplane.core import cache_port
from controlplane.core import usage as usage_mod

# Fields that never change the generated content (see the module docstring).
NON_SEMANTIC_FIELDS = frozenset({"model", "stream", "stream_options", "user"})

BYPASS_N = "n>1"
BYPASS_TEMPERATURE = "temperature"
BYPASS_NO_CACHE = "no-cache"
BYPASS_NO_STORE = "no-store"
BYPASS_INVALID = "invalid"


@dataclasses.dataclass(frozen=True)
class CacheScope:
    """What must match exactly for two requests to share an entry."""

    tenant: str
    model: str
    embedder: str
    context_hash: str

    @property
    def hash(self) -> str:
        return _sha256(_canonical([self.tenant, self.model, self.embedder, self.context_hash]))


@dataclasses.dataclass(frozen=True)
class CacheKeys:
    scope: CacheScope
    scope_hash: str
    semantic_text: str | None   # None: only the exact layer applies
    exact_key: str


@dataclasses.dataclass(frozen=True)
class Policy:
    """Whether a request may be looked up and whether its response may be stored."""

    lookup: bool
    store: bool
    reason: str = ""            # bypass reason ("" when looked up)


def derive(request: cache_port.CacheRequest, embedder: str) -> CacheKeys:
    """Scope, semantic text and exact key of a request (pure, never raises on odd input)."""
    context, semantic = _split(request.endpoint, request.body)
    scope = CacheScope(tenant=request.tenant, model=request.model, embedder=embedder,
                       context_hash=_sha256(_canonical([request.endpoint, context])))
    scope_hash = scope.hash
    tail = semantic if semantic is not None else _canonical(_last_message(request.body))
    exact = _sha256(_canonical([scope_hash, semantic is not None, tail]))
    return CacheKeys(scope=scope, scope_hash=scope_hash, semantic_text=semantic, exact_key=exact)


def policy(request: cache_port.CacheRequest, temperature_ceiling: float,
           default_temperature: float = 1.0) -> Policy:
    """Cacheability and bypass of a request, per DESIGN.md "Cache rules"."""
    body = request.body
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_number(n):
        return Policy(lookup=False, store=False, reason=BYPASS_INVALID)
    if n > 1:
        return Policy(lookup=False, store=False, reason=BYPASS_N)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = default_temperature
    if not _is_number(temperature):
        return Policy(lookup=False, store=False, reason=BYPASS_INVALID)
    if temperature > temperature_ceiling:
        return Policy(lookup=False, store=False, reason=BYPASS_TEMPERATURE)
    directives = cache_control_directives(request.cache_control)
    no_cache, no_store = "no-cache" in directives, "no-store" in directives
    if no_cache and no_store:
        return Policy(lookup=False, store=False, reason=BYPASS_NO_STORE)
    if no_cache:
        return Policy(lookup=False, store=True, reason=BYPASS_NO_CACHE)
    if no_store:
        return Policy(lookup=True, store=False, reason=BYPASS_NO_STORE)
    return Policy(lookup=True, store=True)


def cache_control_directives(header: str) -> frozenset[str]:
    """Lower-cased directive names of a Cache-Control header (arguments dropped)."""
    names = (part.split("=", 1)[0].strip().lower() for part in header.split(","))
    return frozenset(name for name in names if name)


def is_storable(response: Mapping[str, Any]) -> bool:
    """A complete, successful response: every choice finished with ``stop`` or ``length``,
    and its usage counts (when given) counts by the engine's rule
    (:func:`usage.count_of`): an answer whose usage was refused as absurd is relayed once,
    never replayed from the cache."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    if "error" in response or not _usage_counts(response.get("usage")):
        return False
    return all(isinstance(c, Mapping) and c.get("finish_reason") in ("stop", "length")
               for c in choices)


def _usage_counts(usage: Any) -> bool:
    if usage is None:
        return True
    if not isinstance(usage, Mapping):
        return False
    return all(value is None or usage_mod.count_of(value) is not None
               for key, value in usage.items() if key.endswith("_tokens"))


# Request fields asking the engine to put the prompt in its answer (when set and not false).
ECHOING = ("echo", "return_prompt_text", "return_token_ids", "prompt_logprobs")


def _split(endpoint: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(context, semantic text): context is the body without the semantic text."""
    context = {k: v for k, v in body.items() if k not in NON_SEMANTIC_FIELDS}
    if any(body.get(field) is not None and body.get(field) is not False for field in ECHOING):
        return context, None        # the answer holds the prompt: exact layer only
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            context.pop("prompt")
            return context, prompt
        return context, None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return context, None
    text = _user_text(messages[-1])
    if text is None:
        return context, None
    last = dict(messages[-1])
    last.pop("content")
    # The last message minus its text (role, name, ...) stays in the context.
    context["messages"] = [*messages[:-1], last]
    return context, text


def _user_text(message: Any) -> str | None:
    if not isinstance(message, Mapping) or message.get("role") != "user":
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        return None
    texts: list[str] = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            return None     # images / audio: no semantic text, exact layer only
        text = part.get("text")
        if not isinstance(text, str):
            return None
        texts.append(text)
    return "\n".join(texts)


def _last_message(body: Mapping[str, Any]) -> Any:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return messages[-1]
    return body.get("prompt")


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


# Values that are their own canonical form, and the key type of a dict that is; _SCALARS:
# plain values and floats, a list of which is normalised in one pass.
_PLAIN = frozenset({str, int, bool, type(None)})
_STR_KEYS = frozenset({str})
_SCALARS = _PLAIN | {float}
_NUMBERS = frozenset({int, float})


def _whole(value: float) -> int | str | None:
    """The canonical form of a float that has one: an integral float's int, the ``repr``
    of one that is not finite; None for a finite fraction (each walk writes those its own
    way)."""
    if not math.isfinite(value):
        return repr(value)
    return int(value) if value.is_integer() else None


def _plain_dict(value: Mapping[Any, Any]) -> bool:
    """A dict of plain values under string keys: its own canonical form, found by
    ``map(type, ...)`` at C speed, without a step per item."""
    return (type(value) is dict and _PLAIN.issuperset(map(type, value.values()))
            and _STR_KEYS.issuperset(map(type, value)))


def _normalise(value: Any, fractions: list[float]) -> Any:
    """Canonical form: integral floats become ints, containers recurse; the other finite
    floats are also appended to ``fractions``. A container of plain values only (strings,
    ints, booleans, nulls; string keys) is returned as it is, checked by ``map(type, ...)``
    at C speed: a Python call per item is what made a body of many values cost the loop."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if (whole := _whole(value)) is not None:
            return whole
        fractions.append(value)
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if _plain_dict(value):
            return value        # its own canonical form, found without a step per item
        return {str(k): _normalise(v, fractions) for k, v in value.items()}
    if isinstance(value, list | tuple):
        kinds = set(map(type, value))
        if _PLAIN.issuperset(kinds):
            return value        # (a prompt's token ids, say: one C pass, not one call each)
        if _SCALARS.issuperset(kinds):
            floats = [v for v in value if type(v) is float]
            if all(map(math.isfinite, floats)):     # numbers only: comprehensions, no calls
                fractions.extend([v for v in floats if not v.is_integer()])
                return [int(v) if type(v) is float and v.is_integer() else v for v in value]
        return [_normalise(v, fractions) for v in value]
    return repr(value)


def _fragmented(value: Any) -> Any:
    """:func:`_normalise`'s canonical form for orjson: each non-integral float is an
    ``orjson.Fragment`` of the json module's spelling (``float.__repr__``), and a list of
    numbers only is one fragment, its text written by ``map`` and ``str.join`` at C
    speed (:func:`_number_list`)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        whole = _whole(value)
        return orjson.Fragment(float.__repr__(value)) if whole is None else whole
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if _plain_dict(value):
            return value
        return {str(k): _fragmented(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        kinds = set(map(type, value))
        if _PLAIN.issuperset(kinds):
            return value
        if _NUMBERS.issuperset(kinds) and (text := _number_list(value)) is not None:
            return orjson.Fragment(text)
        return [_fragmented(v) for v in value]
    return repr(value)


def _number_list(numbers: list[Any] | tuple[Any, ...]) -> str | None:
    """The json module's text of a list of ints and floats, integral floats written as
    ints (as :func:`_normalise` makes them); None when a float is not finite, or is
    integral at 1e16 or over (its int is written in full), or is -0.0 (its int is 0).

    orjson writes it, at C speed: its spelling of a finite float is ``repr``'s (the
    shortest that reads back, exponent from 1e16 up) for 1e-4 <= |x| < 1e16, and written
    otherwise with an ``e`` or as ``0.0000...`` (``repr`` writes 1e-05 for its 0.00001),
    which sends the list to ``repr`` itself (a float's ``repr`` is most of the json
    module's time)."""
    try:
        text: str | None = orjson.dumps(numbers).decode()[1:-1] + ","
    except orjson.JSONEncodeError:      # an int beyond 64 bits
        text = None
    if text is None or "e" in text or "n" in text or "0.0000" in text:   # (n: null)
        try:
            text = ",".join(map(repr, numbers)) + ","
        except ValueError:              # an int over the interpreter's digit limit
            return None
        if "n" in text or "e+" in text:     # inf, nan; integral at 1e16 and over
            return None
    if "-0.0," in text:
        return None
    # the text of an integral float ends in ".0" (none has an exponent here): the int's
    return "[" + text.replace(".0,", ",")[:-1] + "]"


def _canonical(value: Any) -> str:
    """The canonical JSON text of ``value``: keys sorted, no spaces, text unescaped.

    orjson writes it several times faster than the json module (the whole body's text
    is in a cache key, so a large body's key cost the loop tens of milliseconds) and
    byte for byte the same, except for floats, which it spells differently (1e-05 as
    0.00001): each non-integral float goes to orjson as a fragment of the json module's
    spelling (:func:`_fragmented`). A value orjson refuses (an integer beyond 64 bits, a
    lone surrogate) goes through the json module, so every key stays what it was."""
    try:
        return orjson.dumps(_fragmented(value), option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        pass
    return json.dumps(_normalise(value, []), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def l2_scope(scope_hash: str, embedder_id: str) -> str:
    """The L2 partition of a scope: the scope hash bound to the embedder that made it, so
    vectors of two embedders (or revisions) are never compared."""
    return hashlib.sha256(f"{scope_hash}\x00{embedder_id}".encode()).hexdigest()
