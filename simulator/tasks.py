"""What a simulated engine serves: task names, the default set per engine, their paths.

A *task* is one API family an engine answers; the control plane's registry learns a
backend's tasks so that it routes each path only to backends that serve it:

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
``generate, responses, messages, tokenize``; a narrower set imitates an older vLLM or
another OpenAI-compatible server (``--task generate`` alone: no Responses, no Messages).
A reranker is ``--task rerank --task score --task tokenize``, a Whisper server
``--task transcription --task tokenize``.

The simulator advertises its tasks in ``/v1/models`` (``tasks`` on each model),
``/version`` / TEI's ``/info``, and lists its routes in ``GET /openapi.json`` — the same
document a real vLLM serves, so one discovery method (paths → tasks) covers both.
"""

from __future__ import annotations

from collections.abc import Sequence

GENERATE = "generate"
RESPONSES = "responses"
MESSAGES = "messages"
TOKENIZE = "tokenize"
RERANK = "rerank"
SCORE = "score"
TRANSCRIPTION = "transcription"
EMBED = "embed"
SPEECH = "speech"

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
