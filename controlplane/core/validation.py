"""Validation of OpenAI request bodies: just what routing and safety need.

The body is parsed once, by :func:`json_body.load` (its shape: JSON, an object, bounded
containers and depth); this checks the fields Synapse itself reads (model, messages /
prompt / input, stream, max_tokens, n, temperature, user) and names the bad one in
``param``. Every other field is left to the backend and passed through untouched, so a
client using a newer OpenAI field is not refused here.

Two bounds protect the engines from one request's cost (probe 68), checked right after
parsing on every path: ``n`` (and the legacy ``best_of``) at most
``http.max_n`` — each choice is a sequence of its own, so one request of ``n: 64`` takes
64 of an engine's seats while the queue and the token limits see one request (admission
charges ``n`` x the completion estimate: :func:`sequences`); and each structured-output
constraint (``structured_outputs``, ``response_format``, the legacy ``guided_*`` fields,
Responses' ``text.format``) at most ``http.max_structured_output_bytes`` of JSON — the
engine compiles it into a grammar on threads that run on past its own compile timeout, so
a huge regex costs the engine's CPU for everyone while the request itself is refused.
Absent, they cost one ``isdisjoint`` over the body's keys.

More bounds of the same kind (probes 69 and 77):

* **Sequences.** A legacy ``/v1/completions`` body whose ``prompt`` is an array of strings
  (or of token-id arrays, as lm-eval-harness sends) is a batch: vLLM runs every prompt x
  ``n`` as a sequence of its own, so ``prompt: [10,000 prompts]`` took 10,000 seats while
  ``n`` stayed under ``http.max_n``; so does
  each embedding of ``prompt_embeds`` (with ``--enable-prompt-embeds``), and each input of
  an ``/v1/embeddings`` ``input`` array (strings, or arrays of token ids: vLLM pools each
  as a request of its own; :func:`input_batch`). The sequences of one generating request
  (:func:`prompt_batch` plus :func:`embeds_batch`, x ``n``) are bounded by
  ``http.max_sequences`` (by default a vLLM engine's usual ``max_num_seqs``; OpenAI itself
  takes 2,048 prompts), an embeddings body's inputs (and a rerank's documents, a score's
  pairs) by ``http.max_pooling_inputs`` (2,048, as OpenAI's embeddings: clients send
  batches of a thousand, and a pooling pass is short), by one rule
  (:func:`bound_sequences`), and are what the in-flight ledger counts as the request's
  seats. A setting of its own rather than ``http.max_n``: a batch of 16 one-choice
  prompts is an ordinary request, and refusing it for "n" would puzzle its sender.
  ``best_of`` is bounded by ``http.max_n`` but not counted: vLLM 0.32 has no such field
  (it runs ``n``). A prompt that is a string or token ids costs one ``type`` check.
  Each text of a pooling request (an embeddings input, a rerank's query and documents, a
  score's texts) is bounded too, by ``http.max_pooling_input_bytes`` of UTF-8
  (:func:`bound_input_bytes`, 400 naming the field and index): an engine tokenizes a
  text whole before refusing one longer than its context, and a pooling model's context
  is short.
* **Seed.** ``seed`` must be an integer in vLLM's range for it (a signed 64-bit
  integer, :func:`_seed`): past it, the engine fails on the request instead of refusing
  it.
* **Tool schemas the engine compiles.** With ``tool_choice: "required"`` (Anthropic's
  ``{"type": "any"}``) vLLM compiles the parameter schemas of every tool into one
  structured-output grammar, with a named tool that tool's, and under ``auto`` those of
  tools marked ``strict`` (a structural tag, with a tool-call parser such as hermes; the
  OpenAI Agents SDK marks every tool strict): the same kind of cost as a
  ``response_format``, bounded together by ``http.max_tool_schema_bytes``
  (:func:`_compiled_tools`), a setting of its own because an agent's ordinary tool set is
  many schemas where a ``response_format`` is one. Counted generously, because the
  dialects put a schema in different places and the engine ignores keys it does not
  know: an extra ``mode`` does not unforce a choice, and a decoy ``parameters`` beside an
  ``input_schema`` (or a ``function`` beside a Responses tool's own ``parameters``) is
  counted with it. Descriptions outside the schemas are not counted (they are not
  compiled); under ``none``, and under ``auto`` with no tool marked strict, nothing is.
  ``http.max_structured_output_bytes`` holds Anthropic's ``output_config.format`` (vLLM
  makes it a ``response_format``).
* **A request's own chat template.** vLLM renders ``chat_template`` (or
  ``chat_template_kwargs.chat_template``) as Jinja in its API server, and refuses it with
  a 400 unless started with ``--trust-request-chat-template``, which the agent passes only
  when an engine's ``extra_args`` add it (other engines ignore the field). Synapse refuses
  it the same way, before the queue (the rate limit, taken at the head, has counted the
  request), unless ``http.request_chat_templates`` is on, for every tenant (an operator who
  added the flag to every engine's ``extra_args``). No size bound when it is on: a
  template's size does not bound its rendering (a short loop can run long), so the choice
  is to trust the tenants or not, as vLLM's flag is.
* **Cache transfer parameters.** vLLM hands ``kv_transfer_params`` (chat, completions,
  Anthropic Messages; and through ``vllm_xargs``, which it merges into the same
  arguments, on every generating path) to its KV connector in disaggregated serving:
  they name the peer engine's host and port and the blocks to pull, so a tenant could
  point an engine at an address of its choosing or at another request's blocks;
  ``ec_transfer_params`` do the same for the encoder cache. They are for the proxy that
  pairs prefill and decode engines; Synapse configures no connector and refuses them on
  every path, with no setting to let them through. An engine without a connector
  ignores them; the refusal is for one an operator adds through an engine's
  ``extra_args``.
* **Multimodal processing overrides.** ``mm_processor_kwargs`` (chat, Responses, the
  pooling paths: embeddings, rerank, score) and ``media_io_kwargs`` (chat, chat-shaped
  embeddings) override the engine's multimodal processor and media loaders per request:
  an image's pixel cap, a video's frame count, which set what the request's media cost
  the engine while its tokens do not show it. Refused unless
  ``http.request_media_kwargs`` is on, as a request's chat template is.

Two fields that would let a request step outside what Synapse accounts and orders
(probe 82), refused on every path with a 400 naming the field:

* **Background responses.** ``background`` (a bool in vLLM's ``ResponsesRequest``, so
  every spelling pydantic's lax mode reads as true: :func:`_true`) makes an engine with
  the Responses store answer at once, queued and without usage, and generate afterwards:
  the request would be booked as no tokens, its seat freed while the engine still works,
  and its result could never be fetched, since Synapse serves no
  ``GET /v1/responses/{id}`` or cancel. ``false`` passes.
* **The engine's own queue order.** ``priority`` (an int in every vLLM request model,
  ``0`` by default) orders an engine's queue when it runs ``--scheduling-policy
  priority`` (an operator may add it to an engine's ``extra_args``): a tenant could jump
  that queue past Synapse's fair queue, whose class comes from the tenant's config or the
  ``fairness.queue.header`` header. ``0`` (and ``null``, which the engine refuses itself)
  passes.

Client headers that Synapse forwards or routes by (``x-request-id``, ``x-session-id``)
must be printable ASCII: anything else cannot go into an HTTP/1.1 header unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import orjson

from controlplane import errors
from controlplane.core import json_body

Endpoint = Literal["chat", "completions", "embeddings"]
# OpenAI's message roles. An unknown role is refused here, as OpenAI does, rather than
# rendered by a backend's chat template into a prompt the client did not mean.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclasses.dataclass(frozen=True, slots=True)
class Parsed:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool = False
    max_tokens: int = 0
    user: str = ""
    prompt_text: str = ""           # rendered later for chat (messages kept in body)
    include_usage: bool = False
    sequences: int = 1              # sequences generated: n (x the prompts of a batch)


SESSION_ID_MAX = 256
REQUEST_ID_MAX = 128


MAX_MESSAGES = 2048     # OpenAI's own limit on a chat's messages array
# The fields that hold a request's turns, bounded by http.max_messages: ``messages``
# (chat, Anthropic Messages and count_tokens, tokenize, chat-shaped embeddings) on every
# path, and a Responses body's ``input`` items (RESPONSES_TURNS), which that path walks
# into chat messages as chat walks its own. Not ``input`` elsewhere: an embeddings
# ``input`` is a batch (http.max_pooling_inputs) or one prompt's token ids.
TURNS = ("messages",)
RESPONSES_TURNS = ("messages", "input")
TURN_NAMES = {"messages": "messages", "input": "input items"}
MAX_N = 8
MAX_STRUCTURED_OUTPUT_BYTES = 16 * 1024
MAX_SEQUENCES = 256
MAX_POOLING_INPUTS = 2048   # OpenAI's own bound on an embeddings input array
MAX_TOOL_SCHEMA_BYTES = 64 * 1024
# Largest text of one pooling input (an embeddings input, a rerank's query or document, a
# score's text), in UTF-8 bytes: past the context of any pooling model in use (32k tokens
# at the most, a few bytes each), below what an engine takes seconds to tokenize.
MAX_POOLING_INPUT_BYTES = 256 * 1024
# A ``seed`` as vLLM takes it (a torch.long: its request models bound it so) and as
# OpenAI documents it (an integer).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
SAMPLING_RANGES = (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0))
# The fields the engine turns into a grammar to compile (vLLM 0.32 reads
# structured_outputs and response_format; the guided_* fields of older versions are
# bounded too, for engines that still honour them), with n and best_of: one set, so a
# body with none of them costs a single isdisjoint.
CONSTRAINTS = ("structured_outputs", "response_format", "guided_json", "guided_regex",
               "guided_grammar", "guided_choice", "guided_whitespace_pattern")
CHAT_TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs")
# vLLM's engine-to-engine cache transfer (KV blocks; the encoder cache), refused always
TRANSFER_FIELDS = ("kv_transfer_params", "ec_transfer_params")
# per-request arguments of vLLM's multimodal processor and media loaders
MEDIA_KWARGS_FIELDS = ("mm_processor_kwargs", "media_io_kwargs")
# The number fields of a form that the JSON path bounds: counts (n, and max_tokens,
# max_completion_tokens at most MAX_COUNT; n and best_of at most http.max_n) and
# sampling rates. vLLM's audio requests read n, max_completion_tokens, temperature and
# top_p; best_of and max_tokens are not theirs (the engine ignores them) but are held to
# the same rule as in a JSON body.
FORM_COUNTS = frozenset({"n", "best_of", "max_tokens", "max_completion_tokens"})
FORM_RATES = frozenset(name for name, _, _ in SAMPLING_RANGES)
_BOUNDED = frozenset({"n", "best_of", "text", "tools", "output_config", "prompt_embeds",
                      "vllm_xargs", "background", "priority", "seed", *CHAT_TEMPLATE_FIELDS,
                      *CONSTRAINTS, *TRANSFER_FIELDS, *MEDIA_KWARGS_FIELDS})
_UNFORCED = ("auto", "none")    # tool choices that compile no grammar (a tuple: a value
                                # of the wrong type may be unhashable)
_SCHEMA_KEYS = ("parameters", "input_schema")   # where a tool's schema is, by dialect
# tool choices that force a function tool (OpenAI, Responses, Anthropic); other objects
# name a hosted tool (file_search, ...) and force no schema
_FORCING = ("function", "tool", "any", "allowed_tools", "required")
_TRUE_STRINGS = frozenset({"1", "true", "t", "yes", "y", "on"})
_EMPTY: Mapping[str, Any] = {}
# Which tools' schemas the engine compiles: a test of a tool and of its ``function``.
_Wanted = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


@dataclasses.dataclass(frozen=True, slots=True)
class BodyLimits:
    """The bounds :func:`parse_json` holds a body to: each field is the ``http`` setting
    of its name (``services.build`` makes one from the config, once; every request passes
    that one), and its default is the setting's."""
    max_json_depth: int = json_body.MAX_DEPTH
    max_json_containers: int = json_body.MAX_CONTAINERS
    max_messages: int = MAX_MESSAGES
    max_n: int = MAX_N
    max_structured_output_bytes: int = MAX_STRUCTURED_OUTPUT_BYTES
    max_sequences: int = MAX_SEQUENCES
    max_tool_schema_bytes: int = MAX_TOOL_SCHEMA_BYTES
    request_chat_templates: bool = False
    request_media_kwargs: bool = False


DEFAULT_LIMITS = BodyLimits()


def parse_json(raw: bytes, limits: BodyLimits = DEFAULT_LIMITS,
               turns: tuple[str, ...] = TURNS) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is not one, nests deeper than
    ``limits.max_json_depth``, holds more than ``limits.max_json_containers`` arrays and
    objects (:func:`json_body.load`) or has an array of turns (``turns``: the fields that
    hold the path's conversation, ``messages`` by default, Responses' ``input`` too) of
    more than ``limits.max_messages`` items (each turn costs the validation, the cache
    key, the tokenizer and the template a walk: a body of many tiny turns would cost far
    more CPU per byte than its size says), or is over one of the engine bounds
    (:func:`engine_bounds`)."""
    body = json_body.load(raw, limits.max_json_depth, limits.max_json_containers)
    for field in turns:
        items = body.get(field)
        if type(items) is list and len(items) > limits.max_messages:
            raise errors.BadRequest(
                f"{field}: array too long: {len(items)} {TURN_NAMES.get(field, 'items')}; "
                f"at most {limits.max_messages} (http.max_messages)", param=field,
                code="array_above_max_length")
    batch = prompt_batch(body.get("prompt"))
    if batch > 1 or not _BOUNDED.isdisjoint(body):
        engine_bounds(body, limits, batch + embeds_batch(body.get("prompt_embeds")))
    return body


def prompt_batch(prompt: Any) -> int:
    """The prompts of a completions ``prompt``: an array of strings, or of token-id
    arrays, is a batch of them; a string or one array of token ids is one."""
    return len(prompt) if type(prompt) is list and prompt and type(prompt[0]) in (
        str, list) else 1


def embeds_batch(embeds: Any) -> int:
    """The prompts of a completions ``prompt_embeds`` (vLLM, with
    ``--enable-prompt-embeds``): each embedding is a prompt of its own, beside ``prompt``'s."""
    if embeds is None:
        return 0
    return len(embeds) if type(embeds) is list else 1


def engine_bounds(body: Mapping[str, Any], limits: BodyLimits, batch: int = 1) -> None:
    """400 naming the field when ``n`` or ``best_of`` is over ``limits.max_n``, the
    sequences (``batch`` prompts x ``n``) over ``max_sequences``, a structured-output
    constraint or the tool schemas the engine compiles (:func:`_compiled_tools`) over
    ``max_structured_output_bytes`` and ``max_tool_schema_bytes`` of JSON, the body
    carries its own chat template while ``request_chat_templates`` is off, cache transfer
    parameters (:func:`_no_transfer_params`), multimodal processing overrides while
    ``request_media_kwargs`` is off, a background response (:func:`_no_background`) or
    an engine queue priority (:func:`_no_engine_priority`). Values of the wrong type are
    left to the fields' own checks (and to the engine)."""
    choices = _choices(body, limits.max_n)
    max_sequences = limits.max_sequences
    max_constraint_bytes = limits.max_structured_output_bytes
    if "prompt_embeds" in body:
        bound_sequences(batch, choices, max_sequences, "prompt_embeds",
                        "prompts and embeddings")
    else:
        bound_sequences(batch, choices, max_sequences, "prompt", "prompts")
    for name in CONSTRAINTS:
        value = body.get(name)
        if value is not None:
            _constraint(name, value, max_constraint_bytes)
    text = body.get("text")       # Responses: text.format is its response_format
    if type(text) is dict and text.get("format") is not None:
        _constraint("text.format", text["format"], max_constraint_bytes)
    output = body.get("output_config")  # Anthropic: vLLM makes its format a response_format
    if type(output) is dict and output.get("format") is not None:
        _constraint("output_config.format", output["format"], max_constraint_bytes)
    tools = body.get("tools")
    if type(tools) is list and tools:
        _compiled_tools(tools, body.get("tool_choice"), limits.max_tool_schema_bytes)
    if not limits.request_chat_templates:
        _no_chat_template(body)
    _no_transfer_params(body)
    if not limits.request_media_kwargs:
        _no_media_kwargs(body)
    _no_background(body)
    _no_engine_priority(body)
    _seed(body)


def _seed(body: Mapping[str, Any]) -> None:
    """400 naming ``seed`` unless it is absent, null or an integer from :data:`SEED_MIN`
    to :data:`SEED_MAX`: the engine fails on one past its range instead of refusing it."""
    value = body.get("seed")
    if value is None:
        return
    if not _integral(value):
        raise _bad("seed", f"must be an integer, got {type(value).__name__}")
    if not SEED_MIN <= value <= SEED_MAX:
        raise _bad("seed", f"must be from {SEED_MIN} to {SEED_MAX} (a signed 64-bit "
                           f"integer), got {_shown(int(value))}")


def bound_input_bytes(field: str, value: Any, limit: int,
                      setting: str = "http.max_pooling_input_bytes") -> None:
    """400 naming the text (``field``, or ``field[i]`` for the i-th of an array; a string
    or an object's ``text``) when one is over ``limit`` bytes of UTF-8 (``setting``): each
    is a sequence of its own that the engine tokenizes whole before it can refuse it, so
    the count of inputs (:func:`bound_sequences`) does not bound a request's cost alone.
    Texts of up to ``limit // 4`` characters are never encoded (a character is at most
    four bytes)."""
    texts = value if type(value) is list else [value]
    short = limit // 4
    for i, text in enumerate(texts):
        if type(text) is dict:
            text = text.get("text")
        if type(text) is not str or len(text) <= short:
            continue
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            name = f"{field}[{i}]" if type(value) is list else field
            raise errors.BadRequest(
                f"{name}: the text is over {limit} bytes of UTF-8 ({setting}): each input "
                "is a sequence the engine tokenizes whole; split it", param=name,
                code="invalid_value")


def _choices(body: Mapping[str, Any], max_n: int) -> int:
    """The sequences ``n`` asks of each prompt (1 by default); 400 naming the field when
    ``n`` or ``best_of`` is over ``max_n``."""
    choices = 1
    for name in ("n", "best_of"):
        value: Any = body.get(name)
        if _integral(value):
            if value > max_n:
                raise errors.BadRequest(
                    f"{name}: {_shown(int(value))} choices; at most {max_n} (http.max_n): each is "
                    "a sequence an engine runs at once", param=name, code="invalid_value")
            if name == "n":     # vLLM 0.32 has no best_of: it runs n sequences
                choices = max(1, int(value))
    return choices


def bound_sequences(batch: int, choices: int, limit: int, field: str, what: str,
                    setting: str = "http.max_sequences") -> None:
    """400 when ``batch`` inputs of ``field`` (``what`` they are, said in the message) x
    ``choices`` each are over ``limit`` sequences (``setting``, named in the message),
    naming ``field``, or ``n`` when one input's choices alone are: each is a sequence the
    engine runs at once, a seat of its own. The one rule for every batch: a completions
    prompt array and its ``prompt_embeds`` (``http.max_sequences``), an embeddings input
    array, a rerank's documents and a score's pairs (``http.max_pooling_inputs``)."""
    if batch * choices <= limit:
        return
    if batch == 1:
        asked = f"n: {choices}"
    elif choices == 1:
        asked = f"{field}: {batch} {what} = {batch}"
    else:
        asked = f"{field}: {batch} {what} x {choices} choices = {batch * choices}"
    raise errors.BadRequest(
        f"{asked} sequences; at most {limit} ({setting}): each is a sequence an "
        "engine runs at once", param=field if batch > 1 else "n", code="invalid_value")


def _compiled_tools(tools: list[Any], choice: Any, limit: int) -> None:
    """400 when the parameter schemas the engine compiles into a grammar for ``tools``
    under ``choice`` are over ``limit`` bytes of JSON together: none under ``none``; every
    tool's when the choice forces a call (``required``, Anthropic's ``any``, any object
    but ``auto`` / ``none`` and ``allowed_tools`` in those modes), the named tool's for a
    named one (OpenAI chat's ``function.name``, Responses' and Anthropic's ``name``), and
    otherwise those of tools marked ``strict`` (vLLM compiles them as a structural tag
    even under ``auto``; with ``--tool-strict-level parameter`` it compiles every tool
    there, which is not counted: the agent never sets it). Counted generously, so that no
    reading of the body compiles more than was measured: every schema a tool carries
    (``parameters`` and ``input_schema``, at its top and in its ``function``), the tools
    nested in a tool (Responses' namespaces, whose tools vLLM names ``<namespace>__<name>``),
    ``strict`` in every spelling vLLM's parser takes as true (``1``, ``"yes"``, ...). A
    hosted tool's choice (``file_search``, ...) forces no function: strict tools only."""
    wanted: _Wanted
    kind = choice.get("type") if type(choice) is dict else choice
    if kind == "none":
        return
    if choice is None or (type(choice) is str and choice != "required"):
        wanted = _strict
    elif type(choice) is dict and (kind in _UNFORCED or (
            kind is not None and kind not in _FORCING) or (
            kind == "allowed_tools" and _mode(choice) in _UNFORCED)):
        wanted = _strict
    elif type(choice) is dict:
        function = choice.get("function")
        name = (function if type(function) is dict else choice).get("name")
        wanted = _named(name) if type(name) is str else _every
    else:                       # "required", or a value the engine will refuse itself
        wanted = _every
    size = _schemas(tools, wanted)
    if size > limit:
        raise errors.BadRequest(
            f"tools: the engine compiles {size} bytes of tool parameter schemas into a "
            f"grammar (a forced tool_choice, or tools marked strict); at most {limit} "
            "(http.max_tool_schema_bytes)", param="tools", code="constraint_too_large")


def _mode(choice: Mapping[str, Any]) -> Any:
    """An ``allowed_tools`` choice's mode: Responses keeps it at the top, Chat inside
    ``allowed_tools``."""
    inner = choice.get("allowed_tools")
    return inner.get("mode") if type(inner) is dict else choice.get("mode")


def _schemas(tools: list[Any], wanted: _Wanted) -> int:
    size = 0
    for tool in tools:
        if type(tool) is not dict:
            continue
        function = tool.get("function")
        fn = function if type(function) is dict else _EMPTY
        if wanted(tool, fn):
            for spec in (tool, fn):
                for key in _SCHEMA_KEYS:
                    value = spec.get(key)
                    if value is not None:
                        size += _json_size(value)
        nested = tool.get("tools")
        if type(nested) is list:
            size += _schemas(nested, wanted)
    return size


def _every(tool: Mapping[str, Any], fn: Mapping[str, Any]) -> bool:
    return True


def _strict(tool: Mapping[str, Any], fn: Mapping[str, Any]) -> bool:
    return _true(tool.get("strict")) or _true(fn.get("strict"))


def _true(value: Any) -> bool:
    """Whether pydantic's lax mode, as vLLM's request models parse, reads ``value`` as
    true (``True``, ``1``, ``"1"``, ``"true"``, ``"yes"``, ``"on"``, ... in any case)."""
    if type(value) is str:
        return value.strip().lower() in _TRUE_STRINGS
    return value is True or (type(value) in (int, float) and value == 1)


def _named(name: str) -> _Wanted:
    """A tool named ``name``, or ``<namespace>__<its name>`` as vLLM names a Responses
    namespace's tools (generously: any prefix)."""
    def named(tool: Mapping[str, Any], fn: Mapping[str, Any]) -> bool:
        return any(type(n) is str and n and (name == n or name.endswith("__" + n))
                   for n in (tool.get("name"), fn.get("name")))
    return named


def _no_chat_template(body: Mapping[str, Any]) -> None:
    kwargs = body.get("chat_template_kwargs")
    for name, value in (("chat_template", body.get("chat_template")),
                        ("chat_template_kwargs.chat_template",
                         kwargs.get("chat_template") if type(kwargs) is dict else None)):
        if value is not None:
            raise errors.BadRequest(
                f"{name}: a request's own chat template is refused, as vLLM refuses "
                "one unless started with --trust-request-chat-template; "
                "http.request_chat_templates lets it through", param=name,
                code="invalid_value")


def _no_transfer_params(body: Mapping[str, Any]) -> None:
    """400 when the body carries vLLM's cache transfer parameters, at its top or in
    ``vllm_xargs`` (vLLM hands both to its connector the same way): they name the peer
    engine (host, port) to pull KV or encoder-cache blocks from and the blocks to pull,
    so a tenant could make an engine fetch from an address of its choosing or name
    another request's blocks. Only a proxy that pairs prefill and decode engines may set
    them; Synapse configures no such connector, so no setting lets them through."""
    xargs = body.get("vllm_xargs")
    inner = xargs if type(xargs) is dict else _EMPTY
    for name in TRANSFER_FIELDS:
        for param, value in ((name, body.get(name)),
                             (f"vllm_xargs.{name}", inner.get(name))):
            if value is not None and value != {}:      # empty: vLLM ignores it too
                raise errors.BadRequest(
                    f"{param}: cache transfer parameters of vLLM's disaggregated serving "
                    "name the engine and the blocks to transfer cache from; only the "
                    "fabric may set them, and a request's own are refused", param=param,
                    code="invalid_value")


def form_field(name: str, value: str, max_n: int = MAX_N) -> None:
    """400 for a multipart form's field that the same rules refuse in a JSON body: vLLM's
    audio endpoints read their form into the same kind of request, ``vllm_xargs`` (JSON
    text) included, so cache transfer parameters would reach its connector from there;
    and ``n`` (a beam search's width with ``use_beam_search``) is a count of sequences as
    in a JSON body. Each value of a field is checked, so a field sent twice (the engine
    takes the last) is no way around a rule."""
    if name in TRANSFER_FIELDS:
        _no_transfer_params({name: value})
    elif name == "vllm_xargs":
        _no_transfer_params({"vllm_xargs": _form_json(name, value)})
    elif name in FORM_COUNTS:
        body = {name: _form_number(name, value)}
        if name != "best_of":       # as in a JSON body: best_of is only bounded
            _opt_int(body, name, 1)
        _choices(body, max_n)
    elif name in FORM_RATES:
        _sampling_ranges({name: _form_number(name, value)})


def _form_number(name: str, text: str) -> int | float:
    """The number a form field's text is, or 400 naming the field. The engine reads a form
    with pydantic's lax mode: ``" 5_12 "`` and ``"5.0"`` are the integer 512 and 5,
    ``"1e3"`` and ``"nan"`` floats; Python's ``int`` and ``float`` read each of these
    alike, and a text neither reads is one the engine refuses too. NaN and the
    infinities are refused whatever the field: no count or rate is one."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise _bad(name, f"must be a number, got {text[:40]!r}") from None
    if not math.isfinite(number):
        raise _bad(name, f"must be a finite number, got {text[:40]!r}")
    return number


def _form_json(name: str, text: str) -> Any:
    """A form field's JSON text, or 400 naming the field when orjson refuses it. The
    engine parses it with Python's ``json``, which also takes what is not JSON (``NaN``,
    ``Infinity``, integers past 64 bits, lone surrogates): a text orjson refuses could not
    be checked as the engine reads it, and it is nothing a client means as JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _bad(name, f"must be JSON (NaN and Infinity are not): {exc}") from None


def _no_media_kwargs(body: Mapping[str, Any]) -> None:
    """400 when the body carries its own multimodal processor or media loader arguments:
    they override the engine's per request (an image's pixel cap, a video's frames), so
    they set what the request's media cost the engine, which its tokens do not show."""
    for name in MEDIA_KWARGS_FIELDS:
        if body.get(name) not in (None, {}):        # empty: overrides nothing
            raise errors.BadRequest(
                f"{name}: a request's own multimodal processing arguments (image sizes, "
                "video frames, ...) change what it costs the engine; "
                "http.request_media_kwargs lets them through", param=name,
                code="invalid_value")


def _no_background(body: Mapping[str, Any]) -> None:
    """400 when the body asks for a background response: the engine would answer at once
    without usage and generate afterwards, unaccounted and holding no seat, and its result
    could not be fetched through Synapse, which serves no ``GET /v1/responses/{id}``."""
    if _true(body.get("background")):
        raise errors.BadRequest(
            "background: background responses are refused: their results cannot be "
            "fetched through Synapse (it serves no GET /v1/responses/{id} or cancel); "
            "send the request in the foreground, streamed for a long answer",
            param="background", code="invalid_value")


def _no_engine_priority(body: Mapping[str, Any]) -> None:
    """400 when the body sets an engine queue priority other than ``0``: an engine run
    with ``--scheduling-policy priority`` would serve it ahead of requests Synapse's fair
    queue already ordered. A string is refused too, even one the engine reads as ``0``."""
    value = body.get("priority")
    if value is None or (type(value) in (int, float, bool) and value == 0):
        return
    raise errors.BadRequest(
        "priority: a request's own engine queue priority is refused (only 0): Synapse's "
        "fair queue orders requests, in the class of the tenant's config "
        "(auth.tenants[].priority) or of the fairness.queue.header header where the "
        "tenant may name one", param="priority", code="invalid_value")


def _json_size(value: Any) -> int:
    return len(value.encode()) if type(value) is str else len(orjson.dumps(value))


def _constraint(name: str, value: Any, limit: int) -> None:
    size = _json_size(value)
    if size > limit:
        raise errors.BadRequest(
            f"{name}: the structured-output constraint is {size} bytes of JSON; at most "
            f"{limit} (http.max_structured_output_bytes)", param=name,
            code="constraint_too_large")


def printable_ascii(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and value.isascii() and value.isprintable()


def session_id(value: str | None) -> str:
    """The ``x-session-id`` header, or 400 naming it when it is not printable ASCII."""
    if not value:                   # absent or empty: no session
        return ""
    if not printable_ascii(value, SESSION_ID_MAX):
        raise errors.BadRequest(
            f"x-session-id: must be 1 to {SESSION_ID_MAX} printable ASCII characters",
            param="x-session-id", code="invalid_header")
    return value


def size_fields(parsed: Parsed) -> tuple[str, str]:
    """The names of the prompt and the max-tokens field as the client sent them."""
    prompt = "messages" if parsed.endpoint == "chat" else "prompt"
    if parsed.endpoint == "chat" and parsed.body.get("max_completion_tokens") is not None:
        return prompt, "max_completion_tokens"
    return prompt, "max_tokens"


# The largest count of tokens (max_tokens and the like) or choices a request may ask for:
# far above any model's context, and small enough that what is derived from it (an
# admission charge, a fair-queue tag of n x max_tokens over a weight) stays a finite,
# exact float. 1e308 is an integer to JSON and made a tenant's queue tag infinite.
MAX_COUNT = 2**31 - 1


def _bad(param: str, message: str) -> errors.BadRequest:
    return errors.BadRequest(f"{param}: {message}", param=param, code="invalid_value")


def _opt_int(body: Mapping[str, Any], name: str, low: int, high: int = MAX_COUNT) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON does not tell 3 from 3.0; JSON Schema calls both integers
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {type(value).__name__}")
    if value < low:
        raise _bad(name, f"must be at least {low}, got {_shown(value)}")
    if value > high:
        raise _bad(name, f"must be at most {high}, got {_shown(value)}")
    return value


def _shown(value: int) -> str:
    """An integer as an error quotes it: exact up to 20 digits, else not at all (a
    client's 10**400 would fill the message, and cannot even be a float to round)."""
    return str(value) if abs(value) < 10**20 else "an integer of more than 20 digits"


def model_name(body: Mapping[str, Any]) -> str:
    """The request's ``model``: a non-empty string, else the 400 that says where to look."""
    model = body.get("model")
    if model is None:
        raise errors.BadRequest("model: is required (GET /v1/models lists the models)",
                                param="model", code="missing_field")
    if not isinstance(model, str) or not model:
        raise _bad("model", "must be a non-empty string")
    return model


def _common(body: Mapping[str, Any]) -> tuple[str, bool, str]:
    model = model_name(body)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"must be a boolean, got {type(stream).__name__}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string")
    _sampling_ranges(body)
    _opt_int(body, "n", 1)
    return model, bool(stream), user or ""


def _sampling_ranges(body: Mapping[str, Any]) -> None:
    """400 naming the field when ``temperature`` or ``top_p`` is not a number in its
    range (NaN is in none)."""
    for name, low, high in SAMPLING_RANGES:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, "must be a number")
        if not low <= value <= high:
            raise _bad(name, f"must be between {low:g} and {high:g}, got {value}")


MAX_TOKEN_ID = 2**32 - 1


def _include_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    if opts and body.get("stream") is not True:     # empty: vLLM takes it too
        raise _bad("stream_options", "is only allowed when stream is true")
    return bool(opts.get("include_usage"))


def _token_ids(value: Any) -> bool:
    """A non-empty array of token ids (non-negative 32-bit integers)."""
    return (isinstance(value, list) and bool(value)
            and all(_integral(x) and 0 <= x <= MAX_TOKEN_ID for x in value))


def _integral(x: Any) -> bool:
    # JSON does not tell 3 from 3.0 (JSON Schema calls both integers); neither do we.
    return (isinstance(x, int) and not isinstance(x, bool)) or (
        isinstance(x, float) and x.is_integer())


def _strings(value: Any) -> bool:
    """A non-empty array of non-empty strings."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, str) and x for x in value)


def chat(body: dict[str, Any]) -> Parsed:
    model, stream, user = _common(body)
    messages = body.get("messages")
    if messages is None:
        raise errors.BadRequest("messages: is required", param="messages",
                                code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty array of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", "is required and must be a string")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role",
                       f"must be one of {', '.join(sorted(ROLES))}; got {role[:40]!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad(f"messages[{i}].content", "must be a string or an array of parts")
    legacy = _opt_int(body, "max_tokens", 1)
    max_tokens = _opt_int(body, "max_completion_tokens", 1) or legacy
    return Parsed("chat", body, model, stream, max_tokens, user,
                  include_usage=_include_usage(body), sequences=sequences(body))


def sequences(body: Mapping[str, Any]) -> int:
    """The sequences one prompt of the request generates: ``n``, 1 by default. Not
    ``best_of``: vLLM 0.32 has no such field and runs ``n`` (counting it let one tenant
    make a backend look full to the fair queue while the engine idled)."""
    if "n" not in body:
        return 1
    return max(_opt_int(body, "n", 1), 1)


def completions(body: dict[str, Any]) -> Parsed:
    model, stream, user = _common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise errors.BadRequest("prompt: is required", param="prompt", code="missing_field")
    if isinstance(prompt, str) and prompt:
        text = prompt
    elif _strings(prompt):
        text = "".join(prompt)
    elif _token_ids(prompt):
        text = _ids_text(prompt)
    elif _token_id_lists(prompt):
        text = " ".join(_ids_text(ids) for ids in prompt)   # every prompt counted
    else:
        raise _bad("prompt", "must be a non-empty string, a non-empty array of non-empty "
                             "strings, a non-empty array of token ids or a non-empty array "
                             "of those")
    # a batch of prompts is a generation per prompt, each of n sequences
    batch = prompt_batch(prompt) + embeds_batch(body.get("prompt_embeds"))
    return Parsed("completions", body, model, stream, _completion_tokens(body), user,
                  prompt_text=text, include_usage=_include_usage(body),
                  sequences=batch * sequences(body))


def _ids_text(ids: list[Any]) -> str:
    return " ".join(str(int(p)) for p in ids)


def _completion_tokens(body: Mapping[str, Any]) -> int:
    """A completions body's ``max_tokens`` (0: not given). ``0`` with ``echo`` scores the
    prompt without generating (lm-eval-harness's loglikelihood requests): vLLM allows it
    there only, and runs one token it drops, so it counts as 1 (the KV fit, the admission
    charge); the body goes upstream as sent."""
    if not _true(body.get("echo")):
        return _opt_int(body, "max_tokens", 1)
    value = _opt_int(body, "max_tokens", 0)
    return value if value or body.get("max_tokens") is None else 1


def embeddings(body: dict[str, Any], max_inputs: int = MAX_POOLING_INPUTS,
               max_input_bytes: int = MAX_POOLING_INPUT_BYTES) -> Parsed:
    """An embeddings body; its ``sequences`` are its inputs (:func:`input_batch`), bounded
    by ``max_inputs`` (``http.max_pooling_inputs``) by the rule a completions batch's
    prompts are, and each text by ``max_input_bytes`` (:func:`bound_input_bytes`)."""
    model, _, user = _common(body)
    data = body.get("input")
    if data is None:
        raise errors.BadRequest("input: is required", param="input", code="missing_field")
    if not ((isinstance(data, str) and data) or _strings(data) or _token_ids(data)
            or _token_id_lists(data)):
        raise _bad("input", "must be a non-empty string, a non-empty array of non-empty "
                            "strings, a non-empty array of token ids or a non-empty array "
                            "of those")
    batch = input_batch(data)
    bound_sequences(batch, 1, max_inputs, "input", "inputs", "http.max_pooling_inputs")
    bound_input_bytes("input", data, max_input_bytes)
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad("encoding_format", "must be 'float' or 'base64'")
    dims = body.get("dimensions")
    if dims is not None and not (_integral(dims) and 1 <= dims <= MAX_TOKEN_ID):
        raise _bad("dimensions", "must be a positive integer")
    return Parsed("embeddings", body, model, False, 0, user, sequences=batch)


def input_batch(data: Any) -> int:
    """The inputs of a valid embeddings ``input``: vLLM pools each string of an array, and
    each token-id array of an array of them, as a request of its own; a string or one
    array of token ids is one."""
    return len(data) if type(data) is list and type(data[0]) in (str, list) else 1


def _token_id_lists(value: Any) -> bool:
    """A non-empty array of token-id arrays (:func:`_token_ids`)."""
    return isinstance(value, list) and bool(value) and all(_token_ids(x) for x in value)
