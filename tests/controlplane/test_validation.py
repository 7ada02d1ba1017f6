"""The client input rules of the edge that are not one field's: nesting depth, and the
headers Synapse forwards or routes by."""

from __future__ import annotations

import json

import pytest

from controlplane import errors
from controlplane.core import validation


def nested(depth: int) -> bytes:
    """A body whose deepest array is ``depth`` levels down (the body itself is level 1)."""
    return b'{"model": "m", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_nesting_up_to_the_limit_passes_and_one_more_level_is_a_400() -> None:
    assert validation.parse_json(nested(8), max_depth=8)["model"] == "m"
    with pytest.raises(errors.BadRequest, match=r"deeper than 8 levels \(http\.max_json_depth\)"):
        validation.parse_json(nested(9), max_depth=8)


def test_more_messages_than_the_limit_is_a_400_naming_the_field() -> None:
    def body(n: int) -> bytes:
        return json.dumps({"model": "m",
                           "messages": [{"role": "user", "content": "x"}] * n}).encode()
    assert len(validation.parse_json(body(4), max_messages=4)["messages"]) == 4
    with pytest.raises(errors.BadRequest, match=r"5 messages; at most 4 \(http\.max_messages\)"
                       ) as info:
        validation.parse_json(body(5), max_messages=4)
    assert info.value.param == "messages" and info.value.code == "array_above_max_length"
    # the default is OpenAI's own limit
    assert len(validation.parse_json(body(2048))["messages"]) == 2048
    with pytest.raises(errors.BadRequest):
        validation.parse_json(body(2049))


def test_brackets_inside_strings_are_text_not_nesting() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user",
                                                   "content": "[[[[{{{{" * 50}]}).encode()
    assert validation.parse_json(body, max_depth=8)["messages"][0]["role"] == "user"


@pytest.mark.parametrize("value", ["日本", "café", "a\tb", "x" * 257])
def test_session_ids_must_be_printable_ascii(value: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        validation.session_id(value)
    assert info.value.param == "x-session-id"


def test_a_good_session_id_and_none_pass() -> None:
    assert validation.session_id("user-42:tab-3") == "user-42:tab-3"
    assert validation.session_id(None) == validation.session_id("") == ""


@pytest.mark.parametrize("dims", [-3, 0, 1.5, "8", True, [8]])
def test_an_embeddings_dimensions_that_is_no_positive_integer_is_a_400(dims: object) -> None:
    body = {"model": "m", "input": "hello", "dimensions": dims}
    with pytest.raises(errors.BadRequest) as refused:
        validation.embeddings(body)
    assert refused.value.param == "dimensions"
    assert validation.embeddings({**body, "dimensions": 8}).model == "m"
