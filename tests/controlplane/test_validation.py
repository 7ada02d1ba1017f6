"""The client input rules of the edge that are not one field's: nesting depth, and the
headers Synapse forwards or routes by."""

from __future__ import annotations

import json
from collections.abc import Callable

import pydantic
import pytest

from controlplane import errors
from controlplane.core import cache_port, cache_rules, validation
from controlplane.settings import server


def nested(depth: int) -> bytes:
    """A body whose deepest array is ``depth`` levels down (the body itself is level 1)."""
    return b'{"model": "m", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_nesting_up_to_the_limit_passes_and_one_more_level_is_a_400() -> None:
    assert validation.parse_json(nested(8), validation.BodyLimits(max_json_depth=8))["model"] == "m"
    with pytest.raises(errors.BadRequest, match=r"deeper than 8 levels \(http\.max_json_depth\)"):
        validation.parse_json(nested(9), validation.BodyLimits(max_json_depth=8))


def test_more_messages_than_the_limit_is_a_400_naming_the_field() -> None:
    def body(n: int) -> bytes:
        return json.dumps({"model": "m",
                           "messages": [{"role": "user", "content": "x"}] * n}).encode()
    assert len(validation.parse_json(body(4),
                                     validation.BodyLimits(max_messages=4))["messages"]) == 4
    with pytest.raises(errors.BadRequest, match=r"5 messages; at most 4 \(http\.max_messages\)"
                       ) as info:
        validation.parse_json(body(5), validation.BodyLimits(max_messages=4))
    assert info.value.param == "messages" and info.value.code == "array_above_max_length"
    # the default is OpenAI's own limit
    assert len(validation.parse_json(body(2048))["messages"]) == 2048
    with pytest.raises(errors.BadRequest):
        validation.parse_json(body(2049))


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


def chat_body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       **fields}).encode()


@pytest.mark.parametrize("name", ["n", "best_of"])
def test_more_choices_than_the_limit_is_a_400_naming_the_field(name: str) -> None:
    """One chat of n=64 took every seat of a vLLM engine for 82 s (probe 68, F1)."""
    assert validation.parse_json(chat_body(**{name: 8}))[name] == 8     # the default cap
    with pytest.raises(errors.BadRequest, match=r"at most 8 \(http\.max_n\)") as info:
        validation.parse_json(chat_body(**{name: 64}))
    assert info.value.param == name
    with pytest.raises(errors.BadRequest):
        validation.parse_json(chat_body(**{name: 3.0}), validation.BodyLimits(max_n=2))
    assert validation.parse_json(chat_body(**{name: 3}), validation.BodyLimits(max_n=3))[name] == 3


def test_a_request_generates_n_sequences_per_prompt() -> None:
    messages = [{"role": "user", "content": "x"}]
    assert validation.chat({"model": "m", "messages": messages}).sequences == 1
    assert validation.chat({"model": "m", "messages": messages, "n": 4}).sequences == 4
    batch = {"model": "m", "prompt": ["a", "b", "c"], "n": 2}
    assert validation.completions(batch).sequences == 6
    # vLLM 0.32 has no best_of (it runs n): counting it made a backend of idle seats look
    # full to the fair queue (probe 77)
    assert validation.completions({**batch, "best_of": 5}).sequences == 6
    assert validation.completions({"model": "m", "prompt": "a"}).sequences == 1
    # each embedding of prompt_embeds is a prompt of its own, beside prompt's
    embeds = {"model": "m", "prompt": ["a", "b"], "prompt_embeds": ["e1", "e2", "e3"]}
    assert validation.completions(embeds).sequences == 5


ALTERNATIVES = "(" + "|".join(f"w{i}q{i % 7}x" for i in range(3000)) + ")"   # ~25 KB
SCHEMA = {  # OpenAI's structured-output example, as big as realistic schemas get (~1 KB)
    "type": "object",
    "properties": {
        "steps": {"type": "array", "items": {
            "type": "object",
            "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
        "final_answer": {"type": "string"},
        "title": {"type": "string", "description": "a title for the research paper"},
        "authors": {"type": "array", "items": {"type": "string"}},
        "abstract": {"type": "string"},
        "keywords": {"type": "array", "items": {"type": "string"}}},
    "required": ["steps", "final_answer"], "additionalProperties": False}


@pytest.mark.parametrize(("fields", "param"), [
    ({"structured_outputs": {"regex": ALTERNATIVES}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "big", "schema": {"enum": ALTERNATIVES.split("|")}}}}, "response_format"),
    ({"guided_regex": ALTERNATIVES}, "guided_regex"),
    ({"guided_grammar": "root ::= " + ALTERNATIVES}, "guided_grammar"),
    ({"guided_choice": ALTERNATIVES.split("|")}, "guided_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "big",
                          "schema": {"enum": ALTERNATIVES.split("|")}}}}, "text.format"),
])
def test_an_oversized_structured_output_constraint_is_a_400_naming_it(
        fields: dict[str, object], param: str) -> None:
    """vLLM's grammar compile runs on past its 5 s timeout: four 400 KB regexes kept its
    engine at 170 % CPU for every tenant (probe 68, F2)."""
    with pytest.raises(errors.BadRequest, match=r"\(http\.max_structured_output_bytes\)"
                       ) as info:
        validation.parse_json(chat_body(**fields))
    assert info.value.param == param and info.value.code == "constraint_too_large"
    assert validation.parse_json(chat_body(**fields),
                                 validation.BodyLimits(max_structured_output_bytes=10**6))


def test_a_realistic_json_schema_passes() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "paper", "strict": True,
                                                  "schema": SCHEMA}}
    assert validation.parse_json(chat_body(response_format=fmt))["response_format"] == fmt
    assert validation.parse_json(chat_body(structured_outputs={"json": SCHEMA}))
    assert validation.parse_json(chat_body(text="a string text is no format"))


def completions_body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "prompt": "x", **fields}).encode()


def test_a_batch_of_more_sequences_than_the_limit_is_a_400_naming_the_prompt() -> None:
    """A completions prompt array of 10,000 strings is 10,000 sequences for the engine,
    with n well under http.max_n (probe 69)."""
    assert validation.parse_json(completions_body(prompt=["a"] * 256))    # the default cap
    with pytest.raises(errors.BadRequest, match=r"at most 256 \(http\.max_sequences\)"
                       ) as info:
        validation.parse_json(completions_body(prompt=["a"] * 10_000))
    assert info.value.param == "prompt" and "10000 prompts = 10000 sequences" in info.value.message
    with pytest.raises(errors.BadRequest, match=r"40 sequences") as info:
        validation.parse_json(completions_body(prompt=["a"] * 10, n=4),
                              validation.BodyLimits(max_sequences=32))
    assert info.value.param == "prompt"
    assert validation.parse_json(completions_body(prompt=["a"] * 10, best_of=4),
                                 validation.BodyLimits(max_sequences=32))      # best_of is not run
    assert validation.parse_json(completions_body(prompt=["a"] * 8, n=4),
                                 validation.BodyLimits(max_sequences=32))
    with pytest.raises(errors.BadRequest, match=r"http\.max_sequences") as info:
        validation.parse_json(completions_body(prompt_embeds=["e"] * 40),
                              validation.BodyLimits(max_sequences=32))
    assert info.value.param == "prompt_embeds" and "41 prompts and embeddings" in str(
        info.value.message)
    # one prompt of many token ids is one sequence
    assert validation.parse_json(completions_body(prompt=list(range(5000))),
                                 validation.BodyLimits(max_sequences=1))
    with pytest.raises(errors.BadRequest, match=r"http\.max_sequences") as info:
        validation.parse_json(chat_body(n=8),
                              validation.BodyLimits(max_sequences=4))  # n alone, under max_n
    assert info.value.param == "n"


TOOL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
HUGE_SCHEMA = {"type": "object", "properties": {"v": {"enum": ALTERNATIVES.split("|")}}}


def chat_tool(name: str, schema: object) -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "parameters": schema}}


@pytest.mark.parametrize("fields", [
    {"tools": [chat_tool("small", TOOL_SCHEMA), chat_tool("big", HUGE_SCHEMA)],
     "tool_choice": "required"},
    {"tools": [chat_tool("small", TOOL_SCHEMA), chat_tool("big", HUGE_SCHEMA)],
     "tool_choice": {"type": "function", "function": {"name": "big"}}},
    # Responses
    {"tools": [{"type": "function", "name": "big", "parameters": HUGE_SCHEMA}],
     "tool_choice": "required"},
    {"tools": [{"type": "function", "name": "big", "parameters": HUGE_SCHEMA}],
     "tool_choice": {"type": "function", "name": "big"}},
    # Anthropic Messages
    {"tools": [{"name": "big", "input_schema": HUGE_SCHEMA}], "tool_choice": {"type": "any"}},
    {"tools": [{"name": "big", "input_schema": HUGE_SCHEMA}],
     "tool_choice": {"type": "tool", "name": "big"}},
])
def test_tool_schemas_a_forced_tool_choice_compiles_are_bounded_as_constraints(
        fields: dict[str, object]) -> None:
    """With tool_choice required or a named tool, vLLM compiles the tools' parameter
    schemas into a structured-output grammar: a 25 KB enum there cost what it costs in a
    response_format, which was refused (probe 69)."""
    with pytest.raises(errors.BadRequest, match=r"\(http\.max_tool_schema_bytes\)"
                       ) as info:
        validation.parse_json(chat_body(**fields),
                              validation.BodyLimits(max_tool_schema_bytes=16 * 1024))
    assert info.value.param == "tools" and info.value.code == "constraint_too_large"
    assert validation.parse_json(chat_body(**fields),
                                 validation.BodyLimits(max_tool_schema_bytes=10**6))


def responses_tool(name: str, schema: object, **extra: object) -> dict[str, object]:
    return {"type": "function", "name": name, "parameters": schema, **extra}


@pytest.mark.parametrize("fields", [
    # an extra mode does not unforce a choice: the engine ignores it
    {"tools": [chat_tool("big", HUGE_SCHEMA)],
     "tool_choice": {"type": "function", "function": {"name": "big"}, "mode": "auto"}},
    {"tools": [{"name": "big", "input_schema": HUGE_SCHEMA}],
     "tool_choice": {"type": "any", "mode": "none"}},
    {"tools": [responses_tool("big", HUGE_SCHEMA)],
     "tool_choice": {"type": "function", "name": "big", "mode": "auto"}},
    # a decoy where the other dialect keeps its schema hides nothing
    {"tools": [{"name": "big", "parameters": None, "input_schema": HUGE_SCHEMA}],
     "tool_choice": {"type": "any"}},
    {"tools": [responses_tool("big", HUGE_SCHEMA, function={"name": "big",
                                                             "parameters": {}})],
     "tool_choice": "required"},
    # tools nested in a tool (a Responses namespace)
    {"tools": [{"type": "namespace", "name": "ns", "tools": [
        responses_tool("big", HUGE_SCHEMA)]}], "tool_choice": "required"},
    # under auto, a tool marked strict is compiled (a structural tag)
    {"tools": [chat_tool("big", HUGE_SCHEMA) | {"function": {
        "name": "big", "parameters": HUGE_SCHEMA, "strict": True}}]},
    {"tools": [responses_tool("big", HUGE_SCHEMA, strict=True)], "tool_choice": "auto"},
    # Anthropic's output_config.format becomes a response_format
    {"output_config": {"format": {"type": "json_schema", "schema": HUGE_SCHEMA}}},
    # strict as vLLM's parser reads it, in any spelling (review finding)
    {"tools": [chat_tool("big", HUGE_SCHEMA) | {"function": {
        "name": "big", "parameters": HUGE_SCHEMA, "strict": 1}}]},
    {"tools": [responses_tool("big", HUGE_SCHEMA, strict="Yes")], "tool_choice": "auto"},
    # a namespace's tool named as vLLM names it, <namespace>__<name> (review finding)
    {"tools": [{"type": "namespace", "name": "ns", "tools": [
        responses_tool("fn", HUGE_SCHEMA)]}],
     "tool_choice": {"type": "function", "name": "ns__fn"}},
    # a named choice without its type (vLLM's model defaults it to function)
    {"tools": [chat_tool("big", HUGE_SCHEMA)], "tool_choice": {"function": {"name": "big"}}},
])
def test_no_reading_of_the_tools_compiles_more_than_was_measured(
        fields: dict[str, object]) -> None:
    """Each of these passed the bound while vLLM compiled the huge schema (probe 77)."""
    with pytest.raises(errors.BadRequest, match=r"\(http\.max_(tool_schema|structured_output)"
                                                r"_bytes\)"):
        validation.parse_json(chat_body(**fields),
                              validation.BodyLimits(max_tool_schema_bytes=16 * 1024))
    assert validation.parse_json(chat_body(**fields),
                                 validation.BodyLimits(max_structured_output_bytes=10**6,
                                                       max_tool_schema_bytes=10**6))


def test_an_agents_ordinary_strict_tool_set_passes_and_none_compiles_nothing() -> None:
    """The OpenAI Agents SDK marks every tool strict: an agent's ordinary tools (here 40
    of six parameters, about 24 KB of schemas) were refused under auto by the 16 KiB
    structured-output bound meant for one schema; tools have a bound of their own. Under
    tool_choice none, and in Chat's allowed_tools form in auto mode, vLLM compiles nothing
    (review finding)."""
    params = {"type": "object", "additionalProperties": False,
              "required": ["query", "limit", "offset", "language", "since", "fields"],
              "properties": {
                  "query": {"type": "string", "description": "what to find"},
                  "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                  "offset": {"type": "integer", "minimum": 0},
                  "language": {"type": "string", "enum": ["en", "de", "fr"]},
                  "since": {"type": ["string", "null"], "description": "an ISO date"},
                  "fields": {"type": "array", "items": {"type": "string"}}}}
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": params,
                                               "strict": True}} for i in range(40)]
    assert len(json.dumps([t["function"]["parameters"] for t in tools])) > 16 * 1024
    assert validation.parse_json(chat_body(tools=tools))
    huge = [chat_tool("big", HUGE_SCHEMA) | {"function": {
        "name": "big", "parameters": HUGE_SCHEMA, "strict": True}}]
    assert validation.parse_json(chat_body(tools=huge, tool_choice="none"),
                                 validation.BodyLimits(max_tool_schema_bytes=1024))
    # a hosted tool's choice forces no function schema (review finding)
    assert validation.parse_json(chat_body(tools=[chat_tool("big", HUGE_SCHEMA)],
                                           tool_choice={"type": "file_search"}),
                                 validation.BodyLimits(max_tool_schema_bytes=1024))
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "big"}}]}}
    assert validation.parse_json(chat_body(tools=[chat_tool("big", HUGE_SCHEMA)],
                                           tool_choice=allowed),
                                 validation.BodyLimits(max_tool_schema_bytes=1024))
    with pytest.raises(errors.BadRequest, match=r"http\.max_tool_schema_bytes"):
        validation.parse_json(chat_body(tools=[chat_tool("big", HUGE_SCHEMA)], tool_choice={
            **allowed, "allowed_tools": {**allowed["allowed_tools"], "mode": "required"}}),
            validation.BodyLimits(max_tool_schema_bytes=1024))


@pytest.mark.parametrize("choice", [None, "auto", "none", {"type": "auto"},
                                    {"type": "none"},
                                    {"type": "function", "function": {"name": "small"}},
                                    {"type": "tool", "name": "small"}])
def test_tools_the_engine_compiles_no_grammar_for_pass_whatever_their_size(
        choice: object) -> None:
    tools = [chat_tool("small", TOOL_SCHEMA), chat_tool("big", HUGE_SCHEMA),
             {"name": "big", "input_schema": HUGE_SCHEMA}]
    fields = {"tools": tools} if choice is None else {"tools": tools, "tool_choice": choice}
    assert validation.parse_json(chat_body(**fields))["tools"] == tools


@pytest.mark.parametrize(("fields", "param"), [
    ({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
     "chat_template"),
    ({"chat_template_kwargs": {"chat_template": "{{ messages }}"}},
     "chat_template_kwargs.chat_template"),
])
def test_a_requests_own_chat_template_is_a_400_unless_let_through(
        fields: dict[str, object], param: str) -> None:
    """vLLM renders a request's chat template as Jinja in its API server and refuses one
    unless started with --trust-request-chat-template; Synapse refuses it the same way,
    before queue and rate limit, unless http.request_chat_templates (probe 69)."""
    with pytest.raises(errors.BadRequest, match=r"--trust-request-chat-template") as info:
        validation.parse_json(chat_body(**fields))
    assert info.value.param == param and "http.request_chat_templates" in info.value.message
    assert validation.parse_json(chat_body(**fields),
                                 validation.BodyLimits(request_chat_templates=True))
    # other template arguments are the model's business
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    assert validation.parse_json(chat_body(**kwargs))["chat_template_kwargs"] == {
        "enable_thinking": False}


def test_a_config_whose_n_bound_is_above_its_sequences_bound_is_refused_naming_both() -> None:
    """Every n between the two would be refused for its sequences (review finding)."""
    with pytest.raises(pydantic.ValidationError, match=r"max_n \(16\) is above max_sequences"):
        server.HttpSettings(max_n=16, max_sequences=8)
    assert server.HttpSettings(max_n=8, max_sequences=8).max_n == 8


def embeddings_body(data: object, **fields: object) -> dict[str, object]:
    return {"model": "m", "input": data, **fields}


@pytest.mark.parametrize(("data", "count"), [
    ("one text", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3], [4, 5.0]], 3),
])
def test_an_embeddings_input_array_is_a_sequence_per_input(data: object, count: int) -> None:
    """vLLM pools each text (or token-id array) of an input array as a request of its own:
    the ledger must count them all, not one."""
    assert validation.embeddings(embeddings_body(data)).sequences == count


@pytest.mark.parametrize("data", [[[1, 2], []], [[1, "a"]], [[]], ["a", [1]], [[1], "a"],
                                  [[-1]], [[[1]]]])
def test_an_embeddings_input_of_token_id_arrays_must_be_all_token_ids(data: object) -> None:
    with pytest.raises(errors.BadRequest) as info:
        validation.embeddings(embeddings_body(data))
    assert info.value.param == "input"


def test_an_embeddings_batch_over_the_inputs_bound_is_a_400_naming_the_input() -> None:
    """The rule of a completions batch's prompts, with a bound of its own: clients send
    embeddings in batches of a thousand (LangChain's default), which the 256 sequences of
    a generating request refused (review 83)."""
    assert validation.embeddings(embeddings_body(["a"] * 2048)).sequences == 2048
    with pytest.raises(errors.BadRequest, match=r"at most 2048 \(http\.max_pooling_inputs\)"
                       ) as info:
        validation.embeddings(embeddings_body(["a"] * 10_000))
    assert info.value.param == "input" and "10000 inputs" in info.value.message
    with pytest.raises(errors.BadRequest, match=r"5 sequences; at most 4") as info:
        validation.embeddings(embeddings_body([[1]] * 5), max_inputs=4)
    assert info.value.param == "input" and info.value.code == "invalid_value"
    assert validation.embeddings(embeddings_body([[1]] * 4), max_inputs=4)
    # one text, or one array of many token ids, is one sequence
    assert validation.embeddings(embeddings_body(list(range(5000))), max_inputs=1)


@pytest.mark.parametrize(("fields", "param"), [
    ({"kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.0.0.9",
                             "remote_port": 5600, "remote_block_ids": [1, 2]}},
     "kv_transfer_params"),
    ({"kv_transfer_params": []}, "kv_transfer_params"),
    ({"ec_transfer_params": {"remote_host": "10.0.0.9"}}, "ec_transfer_params"),
    ({"vllm_xargs": {"kv_transfer_params": "x"}}, "vllm_xargs.kv_transfer_params"),
])
@pytest.mark.parametrize("body", [chat_body, completions_body])
def test_cache_transfer_parameters_are_a_400_naming_the_field(
        fields: dict[str, object], param: str, body: Callable[..., bytes]) -> None:
    """vLLM hands kv_transfer_params (through vllm_xargs too) to its KV connector, which
    pulls blocks from the peer and block ids they name: a tenant could point an engine
    at an address of its choosing or at another request's blocks. No setting lets them
    through."""
    with pytest.raises(errors.BadRequest, match=r"transfer") as info:
        validation.parse_json(body(**fields),
                              validation.BodyLimits(request_media_kwargs=True,
                                                    request_chat_templates=True))
    assert info.value.param == param and info.value.code == "invalid_value"
    # other extension arguments are the engine's business, and empty ones name nothing
    assert validation.parse_json(body(vllm_xargs={"my_plugin": 1}))
    assert validation.parse_json(body(kv_transfer_params={}, mm_processor_kwargs={}))


@pytest.mark.parametrize("name", ["mm_processor_kwargs", "media_io_kwargs"])
@pytest.mark.parametrize("body", [
    chat_body, completions_body,
    lambda **f: json.dumps({"model": "m", "input": "x", **f}).encode(),  # embeddings, Responses
])
def test_per_request_media_processing_overrides_are_a_400_unless_let_through(
        name: str, body: Callable[..., bytes]) -> None:
    """A request's own multimodal processor and media loader arguments (an image's pixel
    cap, a video's frame count) set what its media cost the engine."""
    value = {"max_pixels": 10**9} if name == "mm_processor_kwargs" else {
        "video": {"num_frames": 100_000}}
    with pytest.raises(errors.BadRequest, match=r"\(?http\.request_media_kwargs") as info:
        validation.parse_json(body(**{name: value}))
    assert info.value.param == name and info.value.code == "invalid_value"
    assert validation.parse_json(body(**{name: value}),
                                 validation.BodyLimits(request_media_kwargs=True))[name] == value



def responses_body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "input": "x", **fields}).encode()


@pytest.mark.parametrize("value", [True, 1, 1.0, "true", "True", "yes", "on", "ON", "1",
                                   "t", "y"])
def test_a_background_response_is_a_400_naming_the_field(value: object) -> None:
    """An engine with the Responses store answers a background request at once, queued
    and without usage, and generates afterwards: booked as nothing, its seat freed, its
    result unfetchable through Synapse (probe 82, F2). Every spelling vLLM's pydantic
    model reads as true is refused."""
    with pytest.raises(errors.BadRequest, match=r"cannot be fetched through Synapse"
                       ) as info:
        validation.parse_json(responses_body(background=value))
    assert info.value.param == "background" and info.value.code == "invalid_value"


@pytest.mark.parametrize("value", [False, None, 0, "false", "no", "off"])
def test_a_foreground_response_passes_whatever_spells_it(value: object) -> None:
    assert validation.parse_json(responses_body(background=value))["background"] == value


@pytest.mark.parametrize("value", [1, -1, 10**9, 0.5, True, "0", "1", [0], {"p": 0}])
@pytest.mark.parametrize("body", [chat_body, completions_body, responses_body])
def test_an_engine_queue_priority_is_a_400_naming_the_field(
        value: object, body: Callable[..., bytes]) -> None:
    """With --scheduling-policy priority in an engine's extra_args, a request's own
    priority would order the engine's queue past Synapse's fair queue."""
    with pytest.raises(errors.BadRequest, match=r"fair queue orders requests") as info:
        validation.parse_json(body(priority=value))
    assert info.value.param == "priority" and info.value.code == "invalid_value"


@pytest.mark.parametrize("value", [0, 0.0, False, None])
def test_priority_zero_the_engines_default_passes(value: object) -> None:
    assert validation.parse_json(chat_body(priority=value))["priority"] == value


def completion(**fields: object) -> validation.Parsed:
    """A completions body as the edge parses it: the body's bounds, then its fields."""
    return validation.completions(validation.parse_json(completions_body(**fields)))


def test_a_batch_of_token_id_prompts_is_a_sequence_per_prompt() -> None:
    """lm-eval-harness sends a batch of token-id arrays as ``prompt``; vLLM answers a
    choice per prompt, so each is a sequence of its own, as a string of a batch is."""
    parsed = completion(prompt=[[504, 3575, 282], [4649, 314]], max_tokens=8)
    assert parsed.sequences == 2
    # every prompt's ids are counted, as a batch of strings counts every string
    assert all(str(i) in parsed.prompt_text for i in (504, 3575, 282, 4649, 314))
    assert completion(prompt=[[1, 2.0]], n=3).sequences == 3
    assert completion(prompt=[[1], [2], [3]], n=2).sequences == 6


def test_a_batch_of_token_id_prompts_is_bounded_as_a_batch_of_strings() -> None:
    with pytest.raises(errors.BadRequest, match=r"at most 4 \(http\.max_sequences\)") as info:
        validation.parse_json(completions_body(prompt=[[1]] * 3, n=2),
                              validation.BodyLimits(max_sequences=4))
    assert info.value.param == "prompt" and "3 prompts x 2 choices" in info.value.message
    with pytest.raises(errors.BadRequest, match=r"http\.max_json_containers"):
        validation.parse_json(completions_body(prompt=[[1]] * 300),
                              validation.BodyLimits(max_json_containers=100))


@pytest.mark.parametrize("prompt", [[[1, 2], []], [[1, "a"]], [[]], ["a", [1]], [[1], "a"],
                                    [[-1]], [[2**32]], [[[1]]], [[True]], [[1.5]]])
def test_a_batch_of_token_id_prompts_must_be_all_token_ids(prompt: object) -> None:
    with pytest.raises(errors.BadRequest) as info:
        completion(prompt=prompt)
    assert info.value.param == "prompt"


def test_a_batch_of_token_id_prompts_gets_no_semantic_cache_text() -> None:
    """The semantic layer matches text; a batch (of strings or of token ids) has none to
    match, so only the exact layer, keyed on the whole body, may answer it."""
    for prompt in ([[504, 3575], [4649]], ["a", "b"]):
        body = {"model": "m", "prompt": prompt, "temperature": 0}
        keys = cache_rules.derive(cache_port.CacheRequest("t", "m", "completions", body, "",
                                                          "r"), "e")
        other = cache_rules.derive(cache_port.CacheRequest(
            "t", "m", "completions", {**body, "prompt": [*prompt, prompt[0]]}, "", "r"), "e")
        assert keys.semantic_text is None and keys.exact_key != other.exact_key


@pytest.mark.parametrize("echo", [True, "true", 1])
def test_echo_with_max_tokens_0_scores_the_prompt(echo: object) -> None:
    """vLLM scores the prompt without generating for ``echo`` with ``max_tokens: 0`` (it
    runs one token and drops it): lm-eval-harness's loglikelihood requests. Counted as
    that one token, so the KV fit and the admission charge are the engine's own."""
    parsed = completion(prompt="The capital of France is", echo=echo, max_tokens=0,
                        logprobs=1)
    assert parsed.max_tokens == 1
    assert parsed.body["max_tokens"] == 0           # the body goes upstream as sent
    assert completion(prompt=[[1, 2], [3]], echo=echo, max_tokens=0).sequences == 2


@pytest.mark.parametrize("fields", [{}, {"echo": False}, {"echo": None}, {"echo": "no"}])
def test_max_tokens_0_without_echo_is_a_400(fields: dict[str, object]) -> None:
    with pytest.raises(errors.BadRequest, match=r"must be at least 1, got 0") as info:
        completion(max_tokens=0, **fields)
    assert info.value.param == "max_tokens"
    with pytest.raises(errors.BadRequest, match=r"must be at least 1, got 0"):
        validation.chat(json.loads(chat_body(max_tokens=0, echo=True)))
    with pytest.raises(errors.BadRequest, match=r"must be at least 0, got -1"):
        completion(max_tokens=-1, echo=True)


@pytest.mark.parametrize("options", [{}, None])
def test_empty_stream_options_pass_without_stream(options: object) -> None:
    """vLLM refuses ``stream_options`` without ``stream`` only when it is not empty."""
    for stream in ({}, {"stream": False}, {"stream": None}):
        assert not completion(stream_options=options, **stream).include_usage
        assert not validation.chat(json.loads(chat_body(stream_options=options,
                                                        **stream))).include_usage


@pytest.mark.parametrize("options", [{"include_usage": True}, {"include_usage": False},
                                     {"continuous_usage_stats": False}, "x", []])
def test_other_stream_options_without_stream_are_a_400(options: object) -> None:
    with pytest.raises(errors.BadRequest) as info:
        completion(stream_options=options)
    assert info.value.param == "stream_options"
    with pytest.raises(errors.BadRequest) as info:
        validation.chat(json.loads(chat_body(stream_options=options)))
    assert info.value.param == "stream_options"


@pytest.mark.parametrize("body", [chat_body, completions_body])
def test_a_seed_outside_the_signed_64_bit_range_is_a_400_naming_seed(
        body: Callable[..., bytes]) -> None:
    """vLLM takes a seed as a torch.long: past that range (probe 187's
    -99999999999999999999) the engine failed on the request instead of refusing it."""
    for seed in (-(2**63), 2**63 - 1, 0, 42, 7.0, None):
        validation.parse_json(body(seed=seed))
    for seed, said in ((-99999999999999999999, "more than 20 digits"), (2**63, str(2**63)),
                       (-(2**63) - 2**11, "-922337203685477"), (1e30, "more than 20 digits"),
                       ("5", "must be an integer"), (1.5, "must be an integer"),
                       (True, "must be an integer")):
        with pytest.raises(errors.BadRequest) as info:
            validation.parse_json(body(seed=seed))
        assert info.value.param == "seed" and said in info.value.message, info.value.message


def test_an_embeddings_text_over_the_input_bound_is_a_400_naming_it_and_its_index() -> None:
    """Each text is a sequence the engine tokenizes whole (http.max_pooling_input_bytes),
    counted in UTF-8 bytes: a short text of four-byte characters can be over it."""
    limit = validation.MAX_POOLING_INPUT_BYTES
    assert validation.embeddings(embeddings_body(["a", "x" * limit]))
    assert validation.embeddings(embeddings_body("é" * (limit // 2)))
    with pytest.raises(errors.BadRequest, match=r"http\.max_pooling_input_bytes") as info:
        validation.embeddings(embeddings_body(["a", "b", "x" * (limit + 1)]))
    assert info.value.param == "input[2]"
    with pytest.raises(errors.BadRequest) as info:
        validation.embeddings(embeddings_body("\U0001f600" * (limit // 4 + 1)))
    assert info.value.param == "input"
    # token ids are counted by the sequences' own bound only
    assert validation.embeddings(embeddings_body(list(range(limit + 1))))
