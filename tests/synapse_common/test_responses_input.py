"""The Responses rules both readers share: instructions lead as a system turn, a
developer message is a system turn, a function call and its output are the assistant's
and the tool's turns."""

from __future__ import annotations

from synapse_common import responses_input


def test_instructions_lead_as_a_system_turn_and_empty_ones_make_none() -> None:
    assert responses_input.instructions({"instructions": "Be brief."}) == [
        {"role": "system", "content": "Be brief."}]
    assert responses_input.instructions({"instructions": ""}) == []
    assert responses_input.instructions({}) == []


def test_roles_and_function_turns() -> None:
    assert responses_input.ROLES["developer"] == "system"
    assert responses_input.function_turn({"type": "function_call", "arguments": "{}"}) == {
        "role": "assistant", "content": "{}"}
    assert responses_input.function_turn({"type": "function_call_output", "output": 4}) == {
        "role": "tool", "content": "4"}
    assert responses_input.function_turn({"role": "user", "content": "hi"}) is None
