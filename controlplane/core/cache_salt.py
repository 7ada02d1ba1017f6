"""Engines' prefix caches, partitioned per tenant (vLLM's ``cache_salt``).

An engine that still holds a prompt's KV blocks answers the next request sharing that
prefix sooner. Shared across tenants, that speed tells one tenant what another sent:
time a guessed prefix, and a fast first token says someone asked it recently. vLLM
salts the hashes of a request's blocks with its ``cache_salt``, so prompts with other
salts share nothing. Synapse sets it on every request it sends to an engine that takes
it (:data:`ENGINES`), pooling calls included (vLLM caches the prefixes of decoder
embedding and scoring models too):

- derived from the tenant (:func:`for_tenant`), so no client can pick another tenant's
  partition, and from the client's own ``cache_salt`` when it sent one (a tenant may
  still partition its own traffic); the client's value never reaches the engine as is;
- keyed (:func:`key_for`: a key derived from the agent token, the secret every replica
  and the agents share): a salt is an HMAC, not a hash of the tenant's name anyone can
  compute. An engine's port may be reachable without Synapse (vLLM's ``/invocations``
  takes no API key; without NetworkPolicies any pod reaches it), and whoever can name a
  tenant's salt there can time that tenant's prefixes. Every replica and worker holds the
  same key, so a tenant's partition is one on every engine. Without an agent token the
  salt is the plain hash (unkeyed, as before: nothing secret to key it with);
- memoised per tenant (:class:`Salts`): each configured tenant its share of
  :data:`SALTS_KEPT` client salts of at most :data:`SALT_MEMO_CHARS`, as every
  :mod:`tenant_lru` table is, so what the memo holds is bounded whatever clients send
  and however many tenants are configured;
- the router hashes a prompt's blocks from the same salt (:func:`seed`; the prompt keeps
  it, ``tokenization.Prompt.partition``), so its prefix index, and with it prefix
  locality, is per tenant as the engines' caches then are.

Which backends take it (:func:`takes`): engines of :data:`ENGINES` (vLLM and the
simulator, by the agent's engine or a static upstream's ``kind``), and a backend whose
kind does not say (:func:`learns`: a static upstream without a ``kind``, an agent's
``external`` backend) when its own ``/openapi.json``, read once it answers, shows
``cache_salt`` in the request schema of its chat or completions path (:func:`offered`:
vLLM's FastAPI document and the simulator's do). Servers of other kinds (SGLang, TGI,
llama.cpp, Ollama, hosted APIs) and kind-less ones without that field get the client's
body unchanged, since they may refuse an unknown field.

Such an unsalted backend that generates and that more than one tenant may use (their
allow-lists) shares its prefix cache across them (:func:`sharing`): one warning names it
at start (or once its document was read), and its answers reach clients with the
cached-token counts zeroed (:func:`hidden`, :class:`StreamHider`:
``prompt_tokens_details.cached_tokens``, Responses' ``input_tokens_details``,
Anthropic's cache reads and writes folded back into ``input_tokens``, DeepSeek's hits
zeroed and its misses made the whole prompt, llama.cpp's ``timings`` dropped), which
otherwise told a tenant, without any timing, how much of its prompt another had just
sent (:func:`marked`; an agent's backend is marked as its report arrives); the relay
drops such a backend's timing headers too. It fails closed: a count that
is a float or a string is zeroed as well, and an answer the JSON parser refuses is zeroed
by substitution. Time to first token still tells it: only a salt closes that; so does an
Ollama whose ``prompt_tokens`` leaves out the cached tokens (nothing here can zero that). The ledger and the router read the
counts before they are zeroed. A backend that :func:`learns` counts as unsalted until its
document says otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from controlplane.core import response_ids, tenant_lru, types
from controlplane.core import tenants as tenants_mod
from synapse_common import subkeys, tasks, tokens

ENGINES = frozenset({"vllm", "simulator"})   # engines whose API takes cache_salt
GENERATING = frozenset({tasks.GENERATE, tasks.RESPONSES, tasks.MESSAGES})
# The request schemas that show whether a server takes the field (vLLM's and ours).
SCHEMA_PATHS = ("/v1/chat/completions", "/v1/completions")
FIELD = "cache_salt"
_FIELD_BYTES = b'"cache_salt"'
# A \u escape of a printable ASCII character: how a key can spell ``cache_salt`` without
# its bytes appearing (``"cache\u005fsalt"``). Non-ASCII escapes cannot spell it.
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")
SALTS_KEPT = 4096      # client salts whose salt is kept, each tenant its share
SALT_MEMO_CHARS = 128  # longer client salts are hashed at each request, never kept
WALK_NODES = 10_000    # schemas of a server's document looked at, at most
KEY_CONTEXT = b"synapse/cache-salt/v1"


def key_for(agent_token: str | None) -> bytes:
    """The salts' key: HMAC-SHA256(agent token, :data:`KEY_CONTEXT`); empty without a
    token (salts are then unkeyed). Not the engine key (another context): an engine that
    logs its key gives away no tenant's salt."""
    if not agent_token:
        return b""
    return subkeys.derive(agent_token, KEY_CONTEXT)


def for_tenant(tenant: str, client_salt: object = None, key: bytes = b"") -> str:
    """The salt of ``tenant``'s requests (the client's own ``cache_salt`` folded in, when
    a string), keyed with ``key`` (:func:`key_for`); :class:`Salts` remembers them."""
    return _salt(key, tenant, client_salt if isinstance(client_salt, str) else "")


class Salts:
    """:func:`for_tenant` with the process's key, memoised.

    Every request of a tenant asks for the same salt, and hashing it again was a visible
    share of a request's CPU. The memo is per tenant (each configured tenant its share of
    :data:`SALTS_KEPT`, its least recently used out first): shared, one tenant's salts
    pushed out another's, which then paid the hash again (a timing channel on how many
    salts the others use). Only client salts of at most :data:`SALT_MEMO_CHARS` are
    kept: the client chooses the string, and a memo keyed by it held whatever it sent (a
    megabyte each) without a bound in bytes. A longer one is hashed at each request,
    which costs no more than reading it did."""

    def __init__(self, key: bytes = b"", tenants: int = 1) -> None:
        self._key = key
        # tenant -> client salt (at most SALT_MEMO_CHARS) -> its salt
        self._memo: tenant_lru.TenantLRU[str] = tenant_lru.TenantLRU(SALTS_KEPT, tenants)

    def __repr__(self) -> str:
        return f"Salts(keyed={bool(self._key)}, kept={len(self._memo)})"   # never the key

    def for_tenant(self, tenant: str, client_salt: object = None) -> str:
        own = client_salt if isinstance(client_salt, str) else ""
        if len(own) > SALT_MEMO_CHARS:
            return _salt(self._key, tenant, own)
        salt = self._memo.get(tenant, own)
        if salt is None:
            salt = _salt(self._key, tenant, own)
            self._memo.put(tenant, own, salt)
        return salt


def _salt(key: bytes, tenant: str, own: str) -> str:
    message = (b"synapse-cache-salt\x00" + tenant.encode("utf-8", "surrogatepass")
               + b"\x00" + own.encode("utf-8", "surrogatepass"))
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(message).hexdigest()[:32]


def seed(salt: str) -> int:
    """The first parent of the router's block-hash chain for prompts under ``salt``."""
    return tokens.salt_seed(salt)


def salted(body: bytes, salt: str) -> bytes:
    """``body`` (a JSON object) with ``cache_salt`` set to ``salt``: spliced in front when
    the body has none (no parsing on the hot path), else the client's value replaced.

    Replaced by parsing whenever the body might spell the key with escapes: spliced in
    beside a ``"cache\\u005fsalt"``, ours would come first and the engine's parser, which
    keeps the last of equal keys, would take the client's value (any partition, another
    tenant's included)."""
    if _FIELD_BYTES in body or _ASCII_ESCAPE.search(body):
        return orjson.dumps({**orjson.loads(body), FIELD: salt})
    start = body.index(b"{") + 1
    rest = body[start:]
    separator = b"" if rest.lstrip().startswith(b"}") else b","
    return b'{"cache_salt":"' + salt.encode("ascii") + b'"' + separator + rest


# -- which backends take it, and what the others' answers may say ------------------------


def takes(backend: types.BackendState) -> bool:
    """Whether requests to ``backend`` carry the tenant's salt."""
    return backend.engine in ENGINES or backend.takes_salt


def learns(backend: types.BackendState) -> bool:
    """Whether ``backend``'s own ``/openapi.json`` says whether it takes the salt: a
    static upstream without a ``kind``, an agent's ``external`` backend (a URL the agent
    only probes); every other kind says it by itself."""
    return backend.engine == ("" if backend.source == "static" else "external")


def sharing(backend: types.BackendState,
            tenants: Iterable[tenants_mod.Tenant]) -> tuple[str, ...]:
    """The tenants that share ``backend``'s prefix cache: every tenant that may use one of
    its models, when it generates, is not salted and there are two or more of them (no
    tenants: authentication is off, every caller is one tenant)."""
    if takes(backend) or not any(backend.serves(task) for task in GENERATING):
        return ()
    names = tuple(t.name for t in tenants if any(t.allows(m) for m in backend.models))
    return names if len(names) > 1 else ()


def marked(backend: types.BackendState,
           tenants: Iterable[tenants_mod.Tenant]) -> types.BackendState:
    """``backend`` with ``shares_cache`` set when ``tenants`` share its prefix cache
    (:func:`sharing`): its answers' counts are then hidden."""
    if not sharing(backend, tenants):
        return backend
    return dataclasses.replace(backend, shares_cache=True)


def warning(backend: types.BackendState, names: tuple[str, ...]) -> str:
    """The warning for a backend whose prefix cache ``names`` share: it names the
    backend (and an agent's node), never its URL (which may carry credentials)."""
    unread = ", and its /openapi.json shows no cache_salt" if learns(backend) else ""
    if backend.source == "static":
        what = (f"upstream {backend.key} (kind {backend.engine})" if backend.engine
                else f"upstream {backend.key} (no kind{unread})")
        advice = "Give it kind: vllm if it is a vLLM, or its own upstream per tenant"
    else:
        what = (f"backend {backend.name} of node {backend.node} "
                f"(engine {backend.engine}{unread})")
        advice = ("Let the agent run it (engine: vllm) if it is a vLLM, or give each tenant "
                  "its own backend")
    return (f"{what} is sent no cache_salt, so the {len(names)} tenants that may use it "
            f"share its prefix cache: a tenant can tell from the time to the first token "
            f"whether another sent a prompt lately; the cached-token counts of its answers "
            f"are zeroed. {advice}")


def offered(document: Any) -> bool:
    """Whether an OpenAPI document (a server's ``/openapi.json``) shows ``cache_salt`` in
    the request body of its chat or completions path."""
    if not isinstance(document, Mapping):
        return False
    paths = document.get("paths")
    if not isinstance(paths, Mapping):
        return False
    for path in SCHEMA_PATHS:
        post = _at(paths, path, "post")
        schema = _at(post, "requestBody", "content", "application/json", "schema")
        if FIELD in _properties(document, schema):
            return True
    return False


def _at(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def _properties(document: Mapping[str, Any], schema: Any) -> set[str]:
    """The property names of ``schema``: through local ``$ref`` and ``allOf`` /
    ``anyOf`` / ``oneOf`` (as FastAPI and pydantic write them). Each reference is
    followed once and at most :data:`WALK_NODES` schemas are looked at: a document is the
    server's, and one that referred to the same schema many times over cost work that
    grew with the square of its size (minutes of a blocked event loop)."""
    found: set[str] = set()
    followed: set[str] = set()
    todo = [schema]
    for _ in range(WALK_NODES):
        if not todo:
            break
        node = todo.pop()
        if not isinstance(node, Mapping):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            if ref not in followed:
                followed.add(ref)
                todo.append(_at(document, *ref[2:].split("/")))
            continue
        if isinstance(props := node.get("properties"), Mapping):
            found.update(k for k in props if isinstance(k, str))
        for key in ("allOf", "anyOf", "oneOf"):
            if isinstance(inner := node.get(key), list):
                todo.extend(inner[:WALK_NODES])
    return found


# The keys of the counts zeroed: OpenAI's (chat, completions, Responses), vLLM's own,
# Anthropic's cache reads and writes, DeepSeek's hits and misses, and llama.cpp's
# ``timings`` (its ``cache_n`` is the count, its ``prompt_ms`` the prefill's time).
_COUNT_KEYS = re.compile(rb'"(?:cached_tokens|created_cache_tokens|cached_tokens_per_turn|'
                         rb'cache_read_input_tokens|cache_creation_input_tokens|'
                         rb'prompt_cache_hit_tokens|prompt_cache_miss_tokens|timings)"')
_ZEROED = ("cached_tokens", "created_cache_tokens", "prompt_cache_hit_tokens")
_ANTHROPIC = ("cache_read_input_tokens", "cache_creation_input_tokens")
_MISSES = "prompt_cache_miss_tokens"
_TIMINGS = "timings"


def hidden(data: bytes) -> bytes:
    """A whole answer (JSON, or an event stream read whole) with its cached-token counts
    zeroed; the same bytes when it has none."""
    if not _COUNT_KEYS.search(data):
        return data
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        if data.lstrip()[:1] in (b"{", b"["):
            return _scrubbed(data)
        return _hidden_lines(data)
    return orjson.dumps(parsed) if _zeroed(parsed) else data


def _zeroed(obj: Any) -> bool:
    """Zero the counts in ``obj`` in place (Anthropic's folded into ``input_tokens``,
    which counts the prompt without them; DeepSeek's misses made the whole prompt;
    llama.cpp's ``timings`` dropped); whether anything changed. A count is any number or
    string under one of those names: a float or a quoted count tells as much."""
    changed = False
    if isinstance(obj, list):
        for item in obj:
            changed |= _zeroed(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, dict | list):
                changed |= _zeroed(value)
        if obj.pop(_TIMINGS, None) is not None:
            changed = True
        for key in _ZEROED:
            if _count(obj.get(key)):
                obj[key], changed = 0, True
        turns = obj.get("cached_tokens_per_turn")
        if isinstance(turns, list) and any(turns):
            obj["cached_tokens_per_turn"], changed = [0] * len(turns), True
        for key in _ANTHROPIC:
            if n := _count(obj.get(key)):
                if isinstance(obj.get("input_tokens"), int):
                    obj["input_tokens"] += n
                obj[key], changed = 0, True
        if _MISSES in obj and obj[_MISSES] != obj.get("prompt_tokens"):
            prompt = obj.get("prompt_tokens")
            obj[_MISSES], changed = (prompt if isinstance(prompt, int) else 0), True
    return changed


def _count(value: object) -> int:
    """``value`` read as a count: a number, or a string of one; any other non-empty
    string counts as 1 (it is zeroed all the same); 0 for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError:
        return 1 if value else 0
    if not math.isfinite(number):
        return 1
    return int(number) or (1 if number else 0)


# Fail closed, for an answer orjson refuses (a lone surrogate, a number out of range):
# each innermost object that holds a count is zeroed as above when it parses alone (so
# Anthropic's reads are still folded in); then every count left anywhere is zeroed by
# substitution, DeepSeek's misses and llama.cpp's cache_n included (to 0: what the
# prompt was is not known there).
_INNERMOST = re.compile(rb"\{[^{}]*\}")
_TIMINGS_VALUE = re.compile(rb'("timings"\s*:\s*)\{[^{}]*\}')
_ANY_COUNT = re.compile(rb'"(cached_tokens|created_cache_tokens|cached_tokens_per_turn|'
                        rb'cache_read_input_tokens|cache_creation_input_tokens|'
                        rb'prompt_cache_hit_tokens|prompt_cache_miss_tokens|cache_n)"'
                        rb'\s*:\s*(?:"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|\[[^\]]*\])')


def _scrubbed(data: bytes) -> bytes:
    """``data``, which does not parse, with every count zeroed (and ``timings`` emptied)."""
    data = _TIMINGS_VALUE.sub(rb"\1{}", data)
    data = _INNERMOST.sub(_innermost, data)
    return _ANY_COUNT.sub(_zero_field, data)


def _innermost(match: re.Match[bytes]) -> bytes:
    text = match.group()
    if not _COUNT_KEYS.search(text):
        return text
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text         # zeroed by substitution next
    return orjson.dumps(parsed) if _zeroed(parsed) else text


def _zero_field(match: re.Match[bytes]) -> bytes:
    key = match.group(1)
    if key != b"cached_tokens_per_turn":
        return b'"' + key + b'":0'
    turns = match.group().partition(b"[")[2].rstrip(b"]").strip()
    return b'"' + key + b'":[' + b",".join(b"0" for _ in turns.split(b",") if turns) + b"]"


class StreamHider:
    """Zeroes the cached-token counts in an event stream's ``data:`` lines, one whole line
    at a time: a chunk's unfinished last line waits for the chunk that completes it (a
    count cut in two would otherwise pass half zeroed). The lines are cut by
    :class:`response_ids.WholeLines` (one home for that): linear work, and an unfinished
    line held only up to ``limit`` bytes, past which :meth:`feed` raises an
    ``UpstreamError`` (the relay ends the stream with its error event) rather than hold
    whatever a hostile or broken engine sends without a line break."""

    __slots__ = ("_lines",)

    def __init__(self, limit: int = response_ids.LINE_MAX) -> None:
        self._lines = response_ids.WholeLines(limit)

    def feed(self, chunk: bytes) -> bytes:
        """The complete lines received so far, their counts zeroed."""
        data = self._lines.feed(chunk)
        if not data or not _COUNT_KEYS.search(data):
            return data
        return _hidden_lines(data)

    def rest(self) -> bytes:
        """What is left after the stream ended (an unfinished line, zeroed if it can be)."""
        rest = self._lines.rest()
        return _line(rest) if rest else rest


def _hidden_lines(data: bytes) -> bytes:
    return b"\n".join(_line(line) for line in data.split(b"\n"))


def _line(line: bytes) -> bytes:
    if not line.startswith(b"data:") or not _COUNT_KEYS.search(line):
        return line
    cr = line.endswith(b"\r")
    try:
        parsed = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return b"data: " + _scrubbed(line[5:].strip()) + (b"\r" if cr else b"")
    if not _zeroed(parsed):
        return line
    return b"data: " + orjson.dumps(parsed) + (b"\r" if cr else b"")
