"""What a simulated engine serves: the task names, defaults per engine and paths live in
:mod:`synapse_common.tasks` (one table for the simulator, the agent and the control
plane); this module re-exports them under the names the simulator has always used.

The simulator advertises its tasks in ``/v1/models`` (``tasks`` on each model),
``/version`` / TEI's ``/info``, and lists its routes in ``GET /openapi.json`` — the same
document a real vLLM serves, so one discovery method (paths → tasks) covers both.
A reranker is ``--task rerank --task score --task tokenize``, a Whisper server
``--task transcription --task tokenize``; ``--task generate`` alone imitates an older
vLLM or another OpenAI-compatible server (no Responses, no Messages).
"""

from __future__ import annotations

from synapse_common.tasks import (
    ALLOWED,
    DEFAULTS,
    EMBED,
    GENERATE,
    MESSAGES,
    RERANK,
    RESPONSES,
    SCORE,
    SPEECH,
    TOKENIZE,
    TRANSCRIPTION,
    resolve,
)

__all__ = ["ALLOWED", "DEFAULTS", "EMBED", "GENERATE", "MESSAGES", "RERANK", "RESPONSES",
           "SCORE", "SPEECH", "TOKENIZE", "TRANSCRIPTION", "resolve"]
