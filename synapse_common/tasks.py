"""What an engine serves: task names, the paths of each task, the default set per engine.

A *task* is one API family an engine answers. The simulator serves the tasks it is given,
the agent reports each backend's tasks, and the control plane routes every path only to
backends that serve its task — all three read this one table:

==============  =======================================================  ==============
task            paths                                                    engines
==============  =======================================================  ==============
generate        ``/v1/chat/completions``, ``/v1/completions``            vllm
responses       ``/v1/responses`` (+ ``GET /v1/responses/{id}``)         vllm
messages        ``/v1/messages`` (+ ``/count_tokens``), Anthropic shape  vllm
tokenize        ``/tokenize``, ``/detokenize``                           vllm
rerank          vLLM ``/rerank``, ``/v1/rerank``, ``/v2/rerank``;        vllm, tei
                TEI ``/rerank`` (TEI's own shape)
score           ``/score``, ``/v1/score``                                vllm
transcription   ``/v1/audio/transcriptions``, ``/v1/audio/translations`` vllm
embed           ``/embed``, ``/v1/embeddings``                           tei
speech          ``/v1/audio/speech``                                     speech
==============  =======================================================  ==============

vLLM 0.32 registers chat, completions, Responses and Anthropic Messages together for any
model that generates, and ``/tokenize`` for every model, so the vLLM default is
``generate, responses, messages, tokenize``; rerank, score and transcription exist only
for models of that kind (a pooling or a Whisper model). vLLM's ``GET /openapi.json``
lists exactly the paths it registered, and the simulator's lists its own, so
:func:`from_paths` learns an engine's tasks from that document; an engine that serves
none (Ollama, a speech server) keeps the tasks its configuration or kind says.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

GENERATE = "generate"
RESPONSES = "responses"
MESSAGES = "messages"
TOKENIZE = "tokenize"
RERANK = "rerank"
SCORE = "score"
TRANSCRIPTION = "transcription"
EMBED = "embed"
SPEECH = "speech"

ALL = (GENERATE, RESPONSES, MESSAGES, TOKENIZE, RERANK, SCORE, TRANSCRIPTION, EMBED, SPEECH)
# The tasks that generate from a prompt up to a max-tokens field: admitted with a
# completion estimate, and billed it when their answer carries no usage.
GENERATING = frozenset({GENERATE, RESPONSES, MESSAGES})

# Every path an engine may serve, and the task it belongs to (discovery reads these).
PATHS: dict[str, str] = {
    "/v1/chat/completions": GENERATE,
    "/v1/completions": GENERATE,
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
    "/tokenize": TOKENIZE,
    "/detokenize": TOKENIZE,
    "/rerank": RERANK,
    "/v1/rerank": RERANK,
    "/v2/rerank": RERANK,
    "/score": SCORE,
    "/v1/score": SCORE,
    "/v1/audio/transcriptions": TRANSCRIPTION,
    "/v1/audio/translations": TRANSCRIPTION,
    "/embed": EMBED,
    "/v1/embeddings": EMBED,
    "/v1/audio/speech": SPEECH,
}

# The paths Synapse's own API serves, each with the task a backend needs to answer it.
ROUTES: dict[str, str] = {
    "/v1/chat/completions": GENERATE,
    "/v1/completions": GENERATE,
    "/v1/embeddings": EMBED,
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
    "/tokenize": TOKENIZE,
    "/detokenize": TOKENIZE,
    "/v1/rerank": RERANK,
    "/v1/score": SCORE,
    "/v1/audio/transcriptions": TRANSCRIPTION,
    "/v1/audio/translations": TRANSCRIPTION,
    "/v1/audio/speech": SPEECH,
}

# Per engine kind: what it can serve, and what it serves when nothing else is said.
ALLOWED: dict[str, tuple[str, ...]] = {
    "vllm": (GENERATE, RESPONSES, MESSAGES, TOKENIZE, RERANK, SCORE, TRANSCRIPTION),
    "tei": (EMBED, RERANK),
    "speech": (SPEECH,),
}
DEFAULTS: dict[str, tuple[str, ...]] = {
    "vllm": (GENERATE, RESPONSES, MESSAGES, TOKENIZE),
    "tei": (EMBED,),
    "speech": (SPEECH,),
}


def resolve(engine: str, tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks an engine serves: ``tasks`` checked against the engine, or its default
    set when empty. Raises ``ValueError`` naming what is wrong."""
    if not tasks:
        return DEFAULTS[engine]
    allowed = ALLOWED[engine]
    unknown = [t for t in tasks if t not in allowed]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not served by engine {engine!r} "
                         f"(it serves: {', '.join(allowed)})")
    return tuple(dict.fromkeys(tasks))  # de-duplicated, order kept


def check(tasks: Iterable[str]) -> tuple[str, ...]:
    """``tasks`` de-duplicated; ``ValueError`` naming any that is not a task."""
    out = tuple(dict.fromkeys(tasks))
    unknown = [t for t in out if t not in ALL]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))} "
                         f"(tasks: {', '.join(ALL)})")
    return out


def from_document(body: bytes) -> tuple[str, ...]:
    """The tasks the ``/openapi.json`` ``body`` lists (:func:`from_paths`); empty when it
    is not a JSON object with ``paths``. Parsing costs CPU with the body's size: call it
    off the event loop, on a body of at most :data:`read_limits.OPENAPI_MAX_BYTES`."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return ()
    paths = document.get("paths") if isinstance(document, dict) else None
    return from_paths(paths) if isinstance(paths, dict) else ()


def from_paths(paths: Iterable[str]) -> tuple[str, ...]:
    """The tasks an engine serves, from the paths its ``/openapi.json`` lists (in the
    order of :data:`ALL`; empty when it lists none of ours)."""
    found = {PATHS[p] for p in paths if p in PATHS}
    return tuple(t for t in ALL if t in found)
