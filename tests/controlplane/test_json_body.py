"""A request body's shape (controlplane.core.json_body), bounded before any field is read
and at a cost bounded by its bytes: a body of many arrays and objects is
refused before it is parsed (``http.max_json_containers``), and its depth
(``http.max_json_depth``) is measured without a step of Python per container. Calls are
counted, never timed."""

from __future__ import annotations

import json

import pytest

from controlplane import errors
from controlplane.core import json_body
from tests import call_counts


def test_a_body_of_more_containers_than_the_limit_is_refused_before_parsing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loads = call_counts.counting(monkeypatch, json_body.orjson, "loads")
    raw = ('{"model": "m", "x": [' + ",".join(['{"a":1}'] * 9000) + "]}").encode()
    with pytest.raises(errors.BadRequest, match=r"9002 arrays and objects; at most 8000 "
                       r"\(http\.max_json_containers\)") as info:
        json_body.load(raw, max_containers=8000)
    assert info.value.code == "invalid_json"
    assert loads[0] == 0
    assert json_body.load(raw, max_containers=9002)["model"] == "m"


def test_a_limit_below_the_walk_threshold_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """http.max_json_containers goes down to 256: a small body over a small limit is
    refused before parsing too, not only one of thousands of brackets."""
    loads = call_counts.counting(monkeypatch, json_body.orjson, "loads")
    raw = ('{"model": "m", "x": [' + ",".join(["[]"] * 300) + "]}").encode()
    with pytest.raises(errors.BadRequest, match=r"302 arrays and objects; at most 256 "):
        json_body.load(raw, max_containers=256)
    assert loads[0] == 0
    assert json_body.load(raw, max_containers=302)["model"] == "m"


def test_brackets_inside_strings_are_not_containers() -> None:
    text = '[{"\\"\\\\[' * 5000         # brackets, escaped quotes and backslashes in a string
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                      "x": ["]]", "[\\", {"k[": "}"}]}).encode()
    assert json_body.load(raw, max_containers=8)["messages"][0]["content"] == text


def _levels(n: int) -> str:
    return "[" * n + "1" + "]" * n


def _x(*items: str) -> bytes:
    return ('{"x": ' + ", ".join(items) + "}").encode()


def test_many_brackets_are_measured_for_depth_without_walking_the_body(
        monkeypatch: pytest.MonkeyPatch) -> None:
    walks = call_counts.counting(monkeypatch, json_body, "_within_depth")
    many = ",".join([_levels(6)] * 2000)    # the body, "x" and 6 levels: 8 in all
    assert json_body.load(_x("[" + many + "]"), max_depth=8)
    with pytest.raises(errors.BadRequest, match=r"deeper than 8 levels"):
        json_body.load(_x("[" + many, _levels(7) + "]"), max_depth=8)
    assert walks[0] == 0
    # a few brackets are still walked, and judged the same
    assert json_body.load(_x(_levels(7)), max_depth=8)
    with pytest.raises(errors.BadRequest, match=r"deeper than 8 levels"):
        json_body.load(_x(_levels(8)), max_depth=8)
    assert walks[0] > 0


def test_brackets_inside_strings_are_text_not_nesting() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user",
                                                   "content": "[[[[{{{{" * 50}]}).encode()
    assert json_body.load(body, max_depth=8)["messages"][0]["role"] == "user"
