"""Engines' prefix caches, partitioned per tenant (vLLM's ``cache_salt``).

An engine that still holds a prompt's KV blocks answers the next request sharing that
prefix sooner. Shared across tenants, that speed tells one tenant what another sent:
time a guessed prefix, and a fast first token says someone asked it recently. vLLM
salts the hashes of a request's blocks with its ``cache_salt``, so prompts with other
salts share nothing. Synapse sets it on every generating request it sends to an engine
that takes it (:data:`ENGINES`):

- derived from the tenant (:func:`for_tenant`), so no client can pick another tenant's
  partition, and from the client's own ``cache_salt`` when it sent one (a tenant may
  still partition its own traffic); the client's value never reaches the engine as is;
- the router hashes a prompt's blocks from the same salt (:func:`seed`; the prompt keeps
  it, ``tokenization.Prompt.partition``), so its prefix index, and with it prefix
  locality, is per tenant as the engines' caches then are.

Backends of other kinds (OpenAI-compatible servers that may refuse an unknown field)
get the client's body unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import re

import orjson

from synapse_common import tokens

ENGINES = frozenset({"vllm", "simulator"})   # engines whose API takes cache_salt
FIELD = "cache_salt"
_FIELD_BYTES = b'"cache_salt"'
# A \u escape of a printable ASCII character: how a key can spell ``cache_salt`` without
# its bytes appearing (``"cache\u005fsalt"``). Non-ASCII escapes cannot spell it.
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")
SALTS_KEPT = 4096      # (tenant, client salt) pairs whose salt is kept


def for_tenant(tenant: str, client_salt: object = None) -> str:
    """The salt of ``tenant``'s requests (the client's own ``cache_salt`` folded in)."""
    return _salt(tenant, client_salt if isinstance(client_salt, str) else "")


@functools.lru_cache(maxsize=SALTS_KEPT)
def _salt(tenant: str, own: str) -> str:
    """Memoised per (tenant, client salt): every request of a tenant asks for the same
    one, and hashing it again was a visible share of a request's CPU."""
    h = hashlib.sha256(b"synapse-cache-salt\x00" + tenant.encode("utf-8", "surrogatepass")
                       + b"\x00" + own.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


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
