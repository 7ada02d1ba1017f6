"""The cache rules: what shares an entry, what is the semantic text, what bypasses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import cache_port, cache_rules

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
BASE = {"model": "llama", "temperature": 0,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "What is the capital of France?"}]}


def req(body=None, tenant="acme", model="llama-3-8b", endpoint="chat", cache_control=""):
    return cache_port.CacheRequest(tenant, model, endpoint, body if body is not None else BASE,
                                   cache_control)


def keys(**kw):
    return cache_rules.derive(req(**kw), EMBEDDER)


def test_semantic_text_is_the_last_user_message_and_the_rest_is_context():
    k = keys()
    assert k.semantic_text == "What is the capital of France?"
    other = keys(body={**BASE, "messages": [BASE["messages"][0],
                                            {"role": "user", "content": "Capital of France?"}]})
    assert other.scope_hash == k.scope_hash          # same context, different question
    assert other.exact_key != k.exact_key


def test_a_repeat_has_the_same_key_and_framing_fields_do_not_split_it():
    a = keys()
    b = keys(body={**BASE, "model": "alias-of-llama", "stream": True,
                   "stream_options": {"include_usage": True}, "user": "u-1"})
    assert (a.scope_hash, a.exact_key) == (b.scope_hash, b.exact_key)


def test_numbers_are_canonical():
    assert keys(body={**BASE, "temperature": 0.0}).exact_key == keys().exact_key


@pytest.mark.parametrize("change", [
    {"tenant": "globex"},
    {"model": "mistral-7b"},
    {"endpoint": "completions"},
])
def test_tenant_model_and_endpoint_are_scope(change):
    assert keys(**change).scope_hash != keys().scope_hash


@pytest.mark.parametrize("field,value", [
    ("top_p", 0.5), ("max_tokens", 10), ("max_completion_tokens", 10), ("stop", ["\n"]),
    ("seed", 3), ("presence_penalty", 0.5), ("frequency_penalty", 0.5),
    ("logit_bias", {"50256": -100}), ("logprobs", True), ("top_logprobs", 2),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("response_format", {"type": "json_object"}),
    ("some_future_field", "x"),
])
def test_every_other_field_is_context(field, value):
    assert keys(body={**BASE, field: value}).scope_hash != keys().scope_hash


def test_system_prompt_and_earlier_turns_are_context():
    other_system = {**BASE, "messages": [{"role": "system", "content": "You are verbose."},
                                         BASE["messages"][1]]}
    earlier = {**BASE, "messages": [BASE["messages"][0],
                                    {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"},
                                    BASE["messages"][1]]}
    assert keys(body=other_system).scope_hash != keys().scope_hash
    assert keys(body=earlier).scope_hash != keys().scope_hash


def test_last_message_not_user_text_means_exact_layer_only():
    tool = {**BASE, "messages": [*BASE["messages"],
                                 {"role": "tool", "content": "42", "tool_call_id": "c1"}]}
    image = {**BASE, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}
    for body in (tool, image):
        k = keys(body=body)
        assert k.semantic_text is None and len(k.exact_key) == 64
    parts = {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}]}
    assert keys(body=parts).semantic_text == "a\nb"


def test_completions_prompt_is_the_semantic_text():
    k = keys(endpoint="completions", body={"prompt": "Once upon", "max_tokens": 5})
    assert k.semantic_text == "Once upon"


@pytest.mark.parametrize("body,header,expected", [
    ({**BASE, "n": 2}, "", (False, False, "n>1")),
    ({**BASE, "temperature": 0.9}, "", (False, False, "temperature")),
    ({k: v for k, v in BASE.items() if k != "temperature"}, "", (False, False, "temperature")),
    ({**BASE, "temperature": "hot"}, "", (False, False, "invalid")),
    (BASE, "no-cache", (False, True, "no-cache")),
    (BASE, "No-Store", (True, False, "no-store")),
    (BASE, "no-cache, no-store", (False, False, "no-store")),
    (BASE, "max-age=0", (True, True, "")),
    ({**BASE, "stream": True}, "", (True, True, "")),
])
def test_policy(body, header, expected):
    p = cache_rules.policy(req(body=body, cache_control=header), temperature_ceiling=0.7)
    assert (p.lookup, p.store, p.reason) == expected


def test_default_temperature_is_configurable():
    body = {k: v for k, v in BASE.items() if k != "temperature"}
    p = cache_rules.policy(req(body=body), temperature_ceiling=0.7, default_temperature=0.0)
    assert p.lookup and p.store


@pytest.mark.parametrize("response,ok", [
    ({"choices": [{"finish_reason": "stop"}]}, True),
    ({"choices": [{"finish_reason": "length"}, {"finish_reason": "stop"}]}, True),
    ({"choices": [{"finish_reason": "tool_calls"}]}, False),
    ({"choices": [{"finish_reason": None}]}, False),
    ({"choices": []}, False),
    ({"error": {"message": "x"}, "choices": [{"finish_reason": "stop"}]}, False),
    # usage the engine's rule refuses (a compromised engine's): relayed once, never replayed
    ({"choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 5,
      "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": None}}, True),
    ({"choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 2**63}}, False),
    ({"choices": [{"finish_reason": "stop"}], "usage": {"completion_tokens": -1}}, False),
    ({"choices": [{"finish_reason": "stop"}], "usage": {"input_tokens": "7"}}, False),
    ({"choices": [{"finish_reason": "stop"}], "usage": "lots"}, False),
])
def test_only_complete_responses_are_storable(response, ok):
    assert cache_rules.is_storable(response) is ok


@pytest.mark.parametrize("field,value", [("return_prompt_text", True), ("return_token_ids", True),
                                         ("prompt_logprobs", 1), ("prompt_logprobs", 0),
                                         ("echo", True)])
def test_a_request_whose_answer_echoes_its_prompt_has_no_semantic_text(field, value):
    """Its answer carries the prompt (vLLM's prompt_text and prompt_token_ids, the
    completions echo): only an identical request may be given it, never a paraphrase."""
    k = keys(body={**BASE, field: value})
    assert k.semantic_text is None
    assert keys(body={**BASE, field: value}).exact_key == k.exact_key   # repeats still hit
    assert keys(body={**BASE, field: False}).semantic_text is not None
    completion = {"model": "llama", "temperature": 0, "prompt": "Say hi", field: value}
    assert keys(body=completion, endpoint="completions").semantic_text is None


def _json_module_canonical(value):
    """The canonical text as the json module writes it (what every key was made from
    before orjson wrote it): the keys of entries already stored depend on it."""
    import json
    return json.dumps(cache_rules._normalise(value, []), sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


# Lists of numbers are written in one piece (orjson, else repr): every spelling of a float
# (exponents either side of 1e-4 and 1e16, -0.0, integral, not finite) and ints beside.
_edge_floats = st.sampled_from([0.0, -0.0, 1.0, 1e16, -1e16, 9999999999999998.0, 1e-4,
                                9.9e-05, 1e-05, 10.00001, 5e-324, 2.0**53 + 2,
                                1.7976931348623157e308, float("nan"), float("-inf")])
_number_lists = st.lists(st.floats() | _edge_floats
                         | st.integers(min_value=-(2**70), max_value=2**70)
                         | st.floats(min_value=-1e4, max_value=1e4).map(lambda f: round(f, 2)),
                         max_size=12)


@given(_json_values | _number_lists | st.dictionaries(st.text(max_size=2), _number_lists,
                                                       max_size=3))
@settings(max_examples=800, deadline=None)
def test_the_canonical_text_is_the_json_modules_byte_for_byte(value):
    assert cache_rules._canonical(value) == _json_module_canonical(value)


def test_the_canonical_text_of_odd_values_is_the_json_modules():
    for value in [{"t": 1e-05, "u": [2.5e-07]}, {"big": 2**80}, {"lone": "\ud800x"},
                  {"é": 1, "e": 2.0, "\u2028": "\x00\x1f\x7f"}, [float("inf")],
                  {"b": {"z": 1, "a": [1.0, True, None]}}, [0.5, -0.0, 2.0],
                  [1e16, 0.5], [1e-05, 3.0, 0.25], [10.00001, 2], [0.5, 2**70],
                  [0.5, float("nan")], [1.5, 2.0, 1e-4, 123456789012345.0]]:
        assert cache_rules._canonical(value) == _json_module_canonical(value)
