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
- the router hashes a prompt's blocks from the same salt (:func:`seed`; the prompt keeps
  it, ``tokenization.Prompt.partition``), so its prefix index, and with it prefix
  locality, is per tenant as the engines' caches then are.

Backends of other kinds (OpenAI-compatible servers that may refuse an unknown field)
get the client's body unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re

import orjson

from synapse_common import subkeys, tokens

ENGINES = frozenset({"vllm", "simulator"})   # engines whose API takes cache_salt
FIELD = "cache_salt"
_FIELD_BYTES = b'"cache_salt"'
# A \u escape of a printable ASCII character: how a key can spell ``cache_salt`` without
# its bytes appearing (``"cache\u005fsalt"``). Non-ASCII escapes cannot spell it.
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")
SALTS_KEPT = 4096      # (tenant, client salt) pairs whose salt is kept
KEY_CONTEXT = b"synapse/cache-salt/v1"


def key_for(agent_token: str | None) -> bytes:
    """The salts' key: HMAC-SHA256(agent token, :data:`KEY_CONTEXT`); empty without a
    token (salts are then unkeyed). Not the engine key (another context): an engine that
    logs its key gives away no tenant's salt."""
    if not agent_token:
        return b""
    return subkeys.derive(agent_token, KEY_CONTEXT)


def for_tenant(tenant: str, client_salt: object = None, key: bytes = b"") -> str:
    """The salt of ``tenant``'s requests (the client's own ``cache_salt`` folded in),
    keyed with ``key`` (:func:`key_for`)."""
    return _salt(key, tenant, client_salt if isinstance(client_salt, str) else "")


@functools.lru_cache(maxsize=SALTS_KEPT)
def _salt(key: bytes, tenant: str, own: str) -> str:
    """Memoised per (key, tenant, client salt): every request of a tenant asks for the
    same one, and hashing it again was a visible share of a request's CPU."""
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
