"""Engines' prefix caches are partitioned per tenant (``controlplane.core.cache_salt``).

A prompt whose prefix an engine still holds is answered sooner, so with one cache for
everyone a tenant could time guessed prefixes to learn what another sent. Each request
reaches the engine with its tenant's ``cache_salt``: another tenant's identical prompt
is prefilled from scratch, even when it sends a ``cache_salt`` of its own, while the same
tenant's repeat still hits. Checked on the security fleet (simulators behind an agent,
which account cached tokens as vLLM does); ``tests/engines`` checks it on the real vLLM.
"""

from __future__ import annotations

import json
from typing import Any

from tests import fleet
from tests.security.conftest import SecureFleet


def _context(tag: str) -> str:
    """A long system prompt (many full KV blocks) that no other test sends."""
    return " ".join(f"{tag} clause {i} binds party {i % 5}." for i in range(300))


def cached_tokens(url: str, key: str, context: str, question: str, **extra: Any) -> int:
    body = {"model": fleet.MODEL, "max_tokens": 2,
            "messages": [{"role": "system", "content": context},
                         {"role": "user", "content": question}], **extra}
    # No temperature: sampled at the default, so the response cache stays out of it.
    reply = fleet.request(url, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                          key=key)
    assert reply.status == 200, reply.body[:300]
    usage = json.loads(reply.body)["usage"]
    assert usage["prompt_tokens"] > 1000
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def test_another_tenants_identical_prompt_finds_nothing_cached(secure: SecureFleet) -> None:
    url = secure.urls[0]
    context = _context("isolation")
    assert cached_tokens(url, fleet.TENANT_KEY, context, "Who binds clause 3?") == 0
    assert cached_tokens(url, fleet.TENANT_KEY, context, "Who binds clause 4?") > 0
    # Nor does a salt of the other tenant's choosing (each is a partition of its own, so
    # each is tried once: a repeat would hit what the other tenant itself just cached).
    for salt in ("team", "cache"):
        assert cached_tokens(url, fleet.OTHER_KEY, context, "Who binds clause 5?",
                             cache_salt=salt) == 0
    assert cached_tokens(url, fleet.OTHER_KEY, context, "Who binds clause 6?") == 0


def test_a_tenants_own_salt_partitions_its_own_prompts(secure: SecureFleet) -> None:
    url = secure.urls[0]
    context = _context("partition")
    assert cached_tokens(url, fleet.TENANT_KEY, context, "one", cache_salt="a") == 0
    assert cached_tokens(url, fleet.TENANT_KEY, context, "two", cache_salt="b") == 0
    assert cached_tokens(url, fleet.TENANT_KEY, context, "three", cache_salt="a") > 0
