"""The tenant's ``cache_salt`` in the bytes sent to an engine, and in the router's hashes."""

from __future__ import annotations

import hmac
import json
import tracemalloc

import orjson
import pytest

from controlplane.core import cache_salt, prefix_index, tenants, types
from synapse_common import tokens
from tests import call_counts


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


@pytest.mark.parametrize(("own", "keyed", "salt"), [
    (None, False, "480e549c8887842519913961cdd972e9"),
    ("", True, "112db3ecd55a6277c620f5a854043f7b"),
    ("a" * 128, True, "94daae5c2fed55bfbe7fe9a263bd30e8"),
    ("a" * 129, True, "6a6e215840c9c8f41c423b981e0ad470"),
    ("é" * 300, False, "dc37cfee43f670db169293da55f015d3"),
])
def test_a_salt_is_the_same_kept_or_not(own: str | None, keyed: bool, salt: str) -> None:
    """Whether the memo keeps a client's salt changes nothing an engine sees: the same
    tenant's partition on every replica, old and new alike."""
    key = cache_salt.key_for("agent-token-of-this-fleet") if keyed else b""
    salts = cache_salt.Salts(key)
    assert cache_salt.for_tenant("team", own, key) == salt
    for _ in range(2):                          # computed, then (when kept) remembered
        assert salts.for_tenant("team", own) == salt


def test_huge_client_salts_are_not_kept() -> None:
    """A client chooses its salt's length: what the memo keeps of unique huge ones is
    bounded however many arrive."""
    salts = cache_salt.Salts()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        # each salt as a request's body brings it: dropped once its request is done
        made = {salts.for_tenant("hoarder", f"{i:04d}" + "s" * 256 * 1024)
                for i in range(20)}
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(made) == 20
    assert kept < 256 * 1024, kept              # not even one of them


def test_one_tenants_salts_never_push_out_anothers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo is per tenant: a tenant sending many salts pushes out its own, never
    another's (whose next request would pay the hash again: a timing channel)."""
    hashed = call_counts.counting(monkeypatch, hmac, "new")
    salts = cache_salt.Salts(cache_salt.key_for("agent-token-of-this-fleet"), tenants=2)
    quiet = salts.for_tenant("quiet", "mine")
    for i in range(cache_salt.SALTS_KEPT + 1):
        salts.for_tenant("noisy", f"salt-{i}")
    made = hashed[0]
    assert salts.for_tenant("quiet", "mine") == quiet
    assert hashed[0] == made                    # remembered still


def test_the_memo_holds_each_configured_tenant_its_share() -> None:
    """Bounded in total whatever the number of tenants (a fixed memo per tenant held
    that many times over with many tenants, in every worker)."""
    salts = cache_salt.Salts(b"k" * 32, tenants=8)
    for tenant in range(8):
        for i in range(cache_salt.SALTS_KEPT):
            salts.for_tenant(f"t{tenant}", f"salt-{i}")
    assert len(salts._memo) <= cache_salt.SALTS_KEPT
    assert "k" * 32 not in repr(salts) and (b"k" * 32).hex() not in repr(salts)


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


# -- which backends take it, and what the others' answers may say (probe 82, F1) ---------


def _document(schema: dict, *, path: str = "/v1/chat/completions") -> dict:
    """An OpenAPI document in FastAPI's shape (vLLM's): the body schema by reference."""
    return {"openapi": "3.1.0", "paths": {path: {"post": {"requestBody": {"content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}},
        "/health": {"get": {}}}, "components": {"schemas": {"ChatCompletionRequest": schema}}}


def test_a_server_takes_the_salt_when_its_chat_or_completions_schema_shows_it():
    vllm = {"type": "object", "properties": {"messages": {}, "cache_salt": {"anyOf": [
        {"type": "string"}, {"type": "null"}]}}}
    assert cache_salt.offered(_document(vllm))
    assert cache_salt.offered(_document(vllm, path="/v1/completions"))
    assert cache_salt.offered(_document({"allOf": [{"properties": {"cache_salt": {}}}]}))
    # A server whose chat request has no such field, one that names it elsewhere only,
    # and documents that are not OpenAPI at all: not salted.
    assert not cache_salt.offered(_document({"properties": {"messages": {}}}))
    assert not cache_salt.offered(_document(vllm, path="/v1/embeddings"))
    for junk in (None, [], "x", {"paths": []}, {"paths": {"/v1/chat/completions": []}},
                 {"paths": {"/v1/chat/completions": {"post": {"requestBody": {"content": {
                     "application/json": {"schema": {"$ref": "#/nowhere/x"}}}}}}}}):
        assert not cache_salt.offered(junk)
    looped = _document({"$ref": "#/components/schemas/ChatCompletionRequest"})
    assert not cache_salt.offered(looped), "a reference cycle ends"


def _backend(engine: str = "", **kw) -> types.BackendState:
    return types.BackendState(key="static/u", node="static", name="u", url="http://u",
                              models=("m",), engine=engine, source="static", **kw)


def test_an_unsalted_generating_backend_two_tenants_reach_shares_its_cache():
    both = [tenants.Tenant("a"), tenants.Tenant("b")]
    assert cache_salt.sharing(_backend(""), both) == ("a", "b")
    for kind in ("sglang", "tgi", "llamacpp", "ollama", "openai"):
        assert cache_salt.sharing(_backend(kind), both) == ("a", "b"), kind
    assert cache_salt.sharing(_backend("vllm"), both) == ()
    assert cache_salt.sharing(_backend("", takes_salt=True), both) == ()
    assert cache_salt.sharing(_backend("", task="embed"), both) == (), "it generates nothing"
    assert cache_salt.sharing(_backend("", tasks=frozenset({"messages"})), both) == ("a", "b")
    assert cache_salt.sharing(_backend(""), [tenants.Tenant("a")]) == ()
    assert cache_salt.sharing(_backend(""), []) == (), "authentication off: one tenant"
    # b may not use the backend's model: only a reaches it
    other = [tenants.Tenant("a"), tenants.Tenant("b", frozenset({"n"}))]
    assert cache_salt.sharing(_backend(""), other) == ()


CHAT = {"id": "c", "choices": [{"message": {"content": "the cached_tokens were 272"}}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 2, "total_tokens": 302,
                  "prompt_tokens_details": {"cached_tokens": 272}}}
MESSAGE = {"id": "msg", "type": "message", "usage": {
    "input_tokens": 12, "output_tokens": 2, "cache_read_input_tokens": 272,
    "cache_creation_input_tokens": 16}}
RESPONSE = {"id": "resp", "usage": {"input_tokens": 300, "output_tokens": 2,
                                    "input_tokens_details": {"cached_tokens": 272,
                                                             "cached_tokens_per_turn": [272]}}}


def test_hidden_zeroes_the_cached_counts_of_a_whole_answer():
    out = orjson.loads(cache_salt.hidden(orjson.dumps(CHAT)))
    assert out["usage"] == {**CHAT["usage"], "prompt_tokens_details": {"cached_tokens": 0}}
    assert out["choices"] == CHAT["choices"], "the content is the model's, kept"
    # Anthropic counts the prompt without its cache reads and writes: folded back in, so
    # input_tokens does not tell the cached part either.
    assert orjson.loads(cache_salt.hidden(orjson.dumps(MESSAGE)))["usage"] == {
        "input_tokens": 300, "output_tokens": 2, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0}
    assert orjson.loads(cache_salt.hidden(orjson.dumps(RESPONSE)))["usage"][
        "input_tokens_details"] == {"cached_tokens": 0, "cached_tokens_per_turn": [0]}
    plain = b'{"usage": {"prompt_tokens": 3}}'
    assert cache_salt.hidden(plain) is plain


def test_a_stream_split_anywhere_has_its_counts_zeroed():
    events = [{"choices": [{"delta": {"content": "hi"}}]}, {"choices": [], "usage": CHAT["usage"]}]
    stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    expected = stream.replace(b'"cached_tokens":272', b'"cached_tokens":0')
    for cut in range(len(stream) + 1):
        hider = cache_salt.StreamHider()
        out = hider.feed(stream[:cut]) + hider.feed(stream[cut:]) + hider.rest()
        assert out == expected, cut
    anthropic = (b"event: message_start\r\ndata: " + orjson.dumps({"message": MESSAGE})
                 + b"\r\n\r\n")
    hider = cache_salt.StreamHider()
    out = hider.feed(anthropic) + hider.rest()
    assert b'"cache_read_input_tokens":0' in out and b'"input_tokens":300' in out
    assert out.endswith(b"\r\n\r\n") and out.startswith(b"event: message_start\r\n")


LLAMACPP = {"id": "c", "choices": [{"message": {"content": "ok"}}],
            "usage": {"prompt_tokens": 300, "completion_tokens": 2, "total_tokens": 302},
            "timings": {"cache_n": 272, "prompt_n": 28, "prompt_ms": 4.2,
                        "predicted_n": 2, "predicted_ms": 30.1}}
DEEPSEEK = {"id": "c", "usage": {"prompt_tokens": 300, "completion_tokens": 2,
                                 "prompt_cache_hit_tokens": 256,
                                 "prompt_cache_miss_tokens": 44}}


def test_counts_under_other_names_are_hidden_too():
    """Review 90, F2: llama.cpp's ``timings`` (``cache_n`` is the count, ``prompt_ms``
    the prefill's time) and DeepSeek's ``prompt_cache_hit_tokens`` / ``miss`` reached
    tenants as they were, whole and in a stream's last chunk."""
    out = orjson.loads(cache_salt.hidden(orjson.dumps(LLAMACPP)))
    assert "timings" not in out and out["usage"] == LLAMACPP["usage"]
    assert orjson.loads(cache_salt.hidden(orjson.dumps(DEEPSEEK)))["usage"] == {
        "prompt_tokens": 300, "completion_tokens": 2, "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 300}
    last = {k: v for k, v in LLAMACPP.items() if k != "usage"}
    stream = (b"data: " + orjson.dumps(last) + b"\n\ndata: " + orjson.dumps(DEEPSEEK)
              + b"\n\ndata: [DONE]\n\n")
    for cut in range(0, len(stream) + 1, 5):
        hider = cache_salt.StreamHider()
        out = hider.feed(stream[:cut]) + hider.feed(stream[cut:]) + hider.rest()
        assert b"timings" not in out and b"272" not in out and b"256" not in out, cut
        assert b'"prompt_cache_miss_tokens":300' in out and out.endswith(b"[DONE]\n\n")


@pytest.mark.parametrize("answer", [
    # JSON that orjson refuses: a lone surrogate in the content, a number out of range.
    b'{"choices":[{"message":{"content":"\\ud800"}}],"usage":{"prompt_tokens":300,'
    b'"prompt_tokens_details":{"cached_tokens":272}}}',
    b'{"x":1e400,"usage":{"prompt_tokens":300,"prompt_tokens_details":'
    b'{"cached_tokens": 272}},"timings":{"cache_n":272,"prompt_ms":4.2}}',
    b'{"x":1e400,"usage":{"input_tokens":28,"cache_read_input_tokens":272,'
    b'"prompt_cache_hit_tokens":"272","cached_tokens_per_turn":[272, 272]}}',
    # Counts given as a float or a string.
    b'{"usage":{"prompt_tokens":300,"prompt_tokens_details":{"cached_tokens":272.0}}}',
    b'{"usage":{"prompt_tokens":300,"prompt_tokens_details":{"cached_tokens":"272"}}}',
])
def test_counts_are_hidden_when_the_answer_does_not_parse_or_is_not_an_integer(answer):
    """Review 90, F3: an answer orjson refuses passed with its counts as they were (the
    zeroing failed open), and so did a count written as a float or a string."""
    whole = cache_salt.hidden(answer)
    hider = cache_salt.StreamHider()
    streamed = hider.feed(b"data: " + answer + b"\r\n\r\n") + hider.rest()
    for out in (whole, streamed):
        assert b"272" not in out, out
        assert b'"prompt_tokens":300' in out or b'"input_tokens":300' in out, out
    assert streamed.startswith(b"data: ") and streamed.endswith(b"\r\n\r\n")


class _Counted(dict):
    """A schema that counts how often it is looked at."""

    looks = 0

    def get(self, key, default=None):
        _Counted.looks += 1
        return super().get(key, default)


def test_a_document_that_refers_to_its_schemas_many_times_is_read_in_bounded_work():
    """Review 90, F4: every ``$ref`` was followed again each time it was met, so a
    schema whose ``allOf`` named the same schemas many times over cost work that grew
    with the square of the document (a 340 KB one blocked the event loop for minutes).
    Each reference is followed once, and the schemas looked at are bounded."""
    schemas = {f"S{i}": _Counted(allOf=[{"$ref": f"#/components/schemas/S{i + 1}"}] * 40)
               for i in range(6)}
    schemas["S6"] = _Counted(properties={"cache_salt": {}})
    doc = _document({"allOf": [{"$ref": "#/components/schemas/S0"}] * 40})
    doc["components"]["schemas"].update(schemas)
    _Counted.looks = 0
    assert cache_salt.offered(doc), "found behind the references all the same"
    assert _Counted.looks < 100, _Counted.looks
    wide = _document({"anyOf": [{"properties": {f"f{i}": {}}} for i in range(50_000)]
                      + [{"properties": {"cache_salt": {}}}]})
    assert not cache_salt.offered(wide), "past the schemas looked at: not salted"
