"""The tenant's ``cache_salt`` in the bytes sent to an engine, and in the router's hashes."""

from __future__ import annotations

import json

import orjson
import pytest

from controlplane.core import cache_salt, prefix_index
from synapse_common import tokens


def test_the_salt_depends_on_the_tenant_and_the_clients_own_salt():
    team, other = cache_salt.for_tenant("team"), cache_salt.for_tenant("other")
    assert team != other and team == cache_salt.for_tenant("team", None)
    assert cache_salt.for_tenant("team", "a") not in (team, cache_salt.for_tenant("team", "b"))
    assert cache_salt.for_tenant("team", 5) == team         # not a string: ignored
    # What a client may send as its own salt never yields another tenant's.
    assert cache_salt.for_tenant("other", team) != team
    assert len(team) == 32 and all(c in "0123456789abcdef" for c in team)


def test_a_keyed_salt_cannot_be_computed_from_the_tenants_name():
    key = cache_salt.key_for("agent-token-of-this-fleet")
    keyed = cache_salt.for_tenant("team", None, key)
    # Not the name's plain hash, which anyone reaching an engine could compute and send.
    assert keyed != cache_salt.for_tenant("team")
    assert keyed == cache_salt.for_tenant("team", None, cache_salt.key_for(
        "agent-token-of-this-fleet"))           # every replica derives the same
    assert keyed != cache_salt.for_tenant("team", None, cache_salt.key_for("another-token"))
    assert cache_salt.for_tenant("team", "a", key) not in (keyed, cache_salt.for_tenant(
        "team", "a"))
    assert cache_salt.key_for(None) == b"" == cache_salt.key_for("")
    # Not the engine key either: an engine that logs its key gives away no salt's key.
    from synapse_common import engine_key
    assert engine_key.derive("agent-token-of-this-fleet") != key.hex()


@pytest.mark.parametrize("body", [
    b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
    b'  {\n "model": "m", "stream": true}',
    b"{}",
    b"{ }",
    b'{"model":"m","cache_salt":"client-chosen","max_tokens":3}',
    b'{"model":"m","messages":[{"role":"user","content":"say \\"cache_salt\\""}]}',
])
def test_salted_sets_the_salt_and_keeps_everything_else(body):
    out = cache_salt.salted(body, "s3")
    parsed = orjson.loads(out)
    before = orjson.loads(body)
    assert parsed["cache_salt"] == "s3"
    assert {k: v for k, v in parsed.items() if k != "cache_salt"} == \
        {k: v for k, v in before.items() if k != "cache_salt"}


@pytest.mark.parametrize("body", [
    b'{"model":"m","cache\\u005fsalt":"%s"}',
    b'{"model":"m","\\u0063ache_salt":"%s","max_tokens":3}',
    b'{"model":"m","CACHE_SALT":1,"cache\\u005Fsalt" : "%s"}',
    b'{"model":"m","cache_salt":"x","cache\\u005fsalt":"%s"}',
])
def test_an_escaped_cache_salt_key_never_reaches_the_engine(body):
    """JSON lets a key be spelled with escapes: ``"cache\\u005fsalt"`` is ``cache_salt``
    to the engine's parser. Left beside the salt Synapse sets, the engine (whose parser
    keeps the last of two equal keys) took the client's value, so a tenant could pick
    any partition of the engines' prefix caches, another tenant's included (its salt is
    a hash of its name). The engine must get exactly one ``cache_salt``: the tenant's."""
    victim = cache_salt.for_tenant("team")
    out = cache_salt.salted(body.replace(b"%s", victim.encode()), cache_salt.for_tenant("other"))

    def one_of_each(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys reach the engine: {keys}"
        return dict(pairs)

    parsed = json.loads(out, object_pairs_hook=one_of_each)
    assert parsed["cache_salt"] == cache_salt.for_tenant("other")
    assert parsed["model"] == "m"


def test_the_router_hashes_of_a_salted_prompt_share_no_block_with_another_salt():
    ids = tuple(range(64))
    hasher = prefix_index.BlockHasher()
    plain = hasher(ids, 16)
    team = hasher(ids, 16, cache_salt.seed(cache_salt.for_tenant("team")))
    other = hasher(ids, 16, cache_salt.seed(cache_salt.for_tenant("other")))
    assert plain == tuple(tokens.block_hashes(ids, 16))
    assert not set(team) & set(other) and not set(team) & set(plain)
    # The simulator seeds its chain from the same salt: the same hashes as the router's.
    salt = cache_salt.for_tenant("team")
    assert team == tuple(tokens.block_hashes(ids, 16, tokens.salt_seed(salt)))
    assert cache_salt.seed("") == 0
