"""The API paths beyond chat, completions and embeddings (issue 20), registered in one
place: their handlers and the resources they need.

Every path here goes through the same front as chat (:mod:`controlplane.api.calls`) and
is routed only to backends that serve its task (``synapse_common.tasks.ROUTES``).
"""

from __future__ import annotations

from aiohttp import web

from controlplane.api import audio, calls, messages, passthrough

ROUTES = {
    "/v1/responses": passthrough.responses,
    "/v1/messages": messages.messages,
    "/v1/messages/count_tokens": messages.count_tokens,
    "/v1/rerank": passthrough.rerank,
    "/v1/score": passthrough.score,
    "/tokenize": passthrough.tokenize,
    "/detokenize": passthrough.detokenize,
    "/v1/audio/speech": passthrough.speech,
    "/v1/audio/transcriptions": audio.transcriptions,
    "/v1/audio/translations": audio.translations,
}


def install(app: web.Application) -> None:
    """Add the routes (POST) and the upload client's cleanup to ``app``."""
    for path, handler in ROUTES.items():
        app.router.add_post(path, handler, expect_handler=calls.continue_if_known)
    app.cleanup_ctx.append(audio.close_client)
