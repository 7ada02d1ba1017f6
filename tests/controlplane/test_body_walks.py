"""A request body's cost to the event loop is bounded by the server's walks of it, not by
what a tenant packs into it: the cache key's canonical form takes no call
per plain value. The body's own shape (containers refused before parsing, depth measured
without a step of Python per container) is tests/controlplane/test_json_body.py's. Calls
are counted, never timed."""

from __future__ import annotations

import pytest

from controlplane.core import cache_port, cache_rules
from tests import call_counts


def test_the_cache_key_takes_no_call_per_plain_value(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = call_counts.counting(monkeypatch, cache_rules, "_normalise")
    body = {"model": "m", "temperature": 0.0, "prompt_ids": list(range(50_000)),
            "scores": [0.5, 1.0, 2] * 10_000, "objs": [{"a": 1, "b": "x"}] * 1000,
            "messages": [{"role": "user", "content": "hi"}]}
    keys = cache_rules.derive(cache_port.CacheRequest("t", "m", "chat", body, "", "r"), "e")
    assert calls[0] < 2_000     # the 1,000 objects' own calls, none per number
    # the same key as the canonical form written a value at a time
    same = {**body, "temperature": 0, "scores": [0.5, 1, 2] * 10_000}
    assert cache_rules.derive(cache_port.CacheRequest("t", "m", "chat", same, "", "r"),
                              "e").exact_key == keys.exact_key


def test_the_cache_key_of_many_fractions_takes_no_call_per_number(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A body of fractions (embeddings sent back, scores) is written by orjson in one
    call per list, not by the json module, which spells each float through a call of
    ``float.__repr__``; the key is the one the json module's text made."""
    import json
    fractions = [0.25, -1.5, 3.0, 0.1, 7, 12.75] * 20_000
    body = {"model": "m", "temperature": 0.7, "vectors": [fractions, fractions[:999]],
            "messages": [{"role": "user", "content": "hi"}]}
    expected = json.dumps(cache_rules._normalise(["chat", body], []), sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
    dumps = call_counts.counting(monkeypatch, json, "dumps")
    assert cache_rules._canonical(["chat", body]) == expected
    assert dumps[0] == 0
