"""The tenant's ``cache_salt`` in the bytes sent to an engine, and in the router's hashes."""

from __future__ import annotations

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
