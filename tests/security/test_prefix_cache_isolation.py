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

from controlplane.core import cache_salt
from tests import fleet, harness
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


def test_whoever_reaches_an_engine_cannot_name_a_tenants_partition(secure: SecureFleet) -> None:
    """An engine's port can be reached without Synapse (vLLM's ``/invocations`` takes no
    API key; without NetworkPolicies any pod reaches it). Salts are keyed with a key
    derived from the agent token, so the tenant's name is not enough to time its
    prefixes there. The engine key stands in here for that unauthenticated path."""
    context = _context("keyed")
    assert cached_tokens(secure.urls[0], fleet.TENANT_KEY, context, "Who binds clause 7?") == 0

    def direct(salt: str) -> int:       # on both engines: the prompt went to one of them
        return max(cached_tokens(url, harness.engine_key_at(url), context, "Who binds clause 8?",
                                 cache_salt=salt) for url in secure.engine_urls)

    # The salt computed from the tenant's name, as before keying: nothing cached there.
    assert direct(cache_salt.for_tenant("team")) == 0
    # The keyed salt, which only a holder of the agent token derives, does hit: the
    # check above would have seen the prefix.
    assert direct(cache_salt.for_tenant("team", None, cache_salt.key_for(fleet.AGENT_TOKEN))) > 0
