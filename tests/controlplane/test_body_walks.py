"""A request body's cost to the event loop is bounded by the server's walks of it, not by
what a tenant packs into it (probe 108 F1): a body of many arrays and objects is refused
before it is parsed (``http.max_json_containers``), its depth is measured without a step
of Python per container, and the cache key's canonical form takes no call per plain value.
Calls are counted, never timed."""

from __future__ import annotations

import json

import pytest

from controlplane import errors
from controlplane.core import cache_port, cache_rules, validation


def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_body_of_more_containers_than_the_limit_is_refused_before_parsing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loads = _counting(monkeypatch, validation.orjson, "loads")
    raw = ('{"model": "m", "x": [' + ",".join(['{"a":1}'] * 9000) + "]}").encode()
    with pytest.raises(errors.BadRequest, match=r"9002 arrays and objects; at most 8000 "
                       r"\(http\.max_json_containers\)") as info:
        validation.parse_json(raw, max_containers=8000)
    assert info.value.code == "invalid_json"
    assert loads[0] == 0
    assert validation.parse_json(raw, max_containers=9002)["model"] == "m"


def test_a_limit_below_the_walk_threshold_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """http.max_json_containers goes down to 256: a small body over a small limit is
    refused before parsing too, not only one of thousands of brackets."""
    loads = _counting(monkeypatch, validation.orjson, "loads")
    raw = ('{"model": "m", "x": [' + ",".join(["[]"] * 300) + "]}").encode()
    with pytest.raises(errors.BadRequest, match=r"302 arrays and objects; at most 256 "):
        validation.parse_json(raw, max_containers=256)
    assert loads[0] == 0
    assert validation.parse_json(raw, max_containers=302)["model"] == "m"


def test_brackets_inside_strings_are_not_containers() -> None:
    text = '[{"\\"\\\\[' * 5000         # brackets, escaped quotes and backslashes in a string
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                      "x": ["]]", "[\\", {"k[": "}"}]}).encode()
    assert validation.parse_json(raw, max_containers=8)["messages"][0]["content"] == text


def _levels(n: int) -> str:
    return "[" * n + "1" + "]" * n


def _x(*items: str) -> bytes:
    return ('{"x": ' + ", ".join(items) + "}").encode()


def test_many_brackets_are_measured_for_depth_without_walking_the_body(
        monkeypatch: pytest.MonkeyPatch) -> None:
    walks = _counting(monkeypatch, validation, "_within_depth")
    many = ",".join([_levels(6)] * 2000)    # the body, "x" and 6 levels: 8 in all
    assert validation.parse_json(_x("[" + many + "]"), max_depth=8)
    with pytest.raises(errors.BadRequest, match=r"deeper than 8 levels"):
        validation.parse_json(_x("[" + many, _levels(7) + "]"), max_depth=8)
    assert walks[0] == 0
    # a few brackets are still walked, and judged the same
    assert validation.parse_json(_x(_levels(7)), max_depth=8)
    with pytest.raises(errors.BadRequest, match=r"deeper than 8 levels"):
        validation.parse_json(_x(_levels(8)), max_depth=8)
    assert walks[0] > 0


def test_the_cache_key_takes_no_call_per_plain_value(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch, cache_rules, "_normalise")
    body = {"model": "m", "temperature": 0.0, "prompt_ids": list(range(50_000)),
            "scores": [0.5, 1.0, 2] * 10_000, "objs": [{"a": 1, "b": "x"}] * 1000,
            "messages": [{"role": "user", "content": "hi"}]}
    keys = cache_rules.derive(cache_port.CacheRequest("t", "m", "chat", body, "", "r"), "e")
    assert calls[0] < 2_000     # the 1,000 objects' own calls, none per number
    # the same key as the canonical form written a value at a time
    same = {**body, "temperature": 0, "scores": [0.5, 1, 2] * 10_000}
    assert cache_rules.derive(cache_port.CacheRequest("t", "m", "chat", same, "", "r"),
                              "e").exact_key == keys.exact_key
