"""What a backend serves: its tasks (``synapse_common.tasks``), reported to the control
plane so that each API path is routed only to backends that serve it.

In order: the backend's ``tasks`` from the config (or the control plane's spec); else what
the engine's ``GET /openapi.json`` lists (vLLM serves the document with exactly the
routes it registered — Responses and Messages for a model that generates, rerank and
score for a pooling model, transcription for Whisper — and the simulator serves its
own); else the spec's single ``task`` (TEI, a speech server or an external server that
serves no such document). Learnt when the engine becomes ready; when the engine could
not be asked (vLLM builds its OpenAPI document on the first request, which may take
seconds on a busy CPU), the runner asks again at its next probes (:data:`TIMEOUT_S` each).

The document is read to at most ``read_limits.OPENAPI_MAX_BYTES`` (the control plane's prober
reads an upstream's to the same bound), and a longer one counts as no document, so the
spec's task holds; it is parsed off the event loop. An ``external`` engine is any server
at a URL, and its document, read whole and parsed on the loop that reports the node,
would hold and stall the agent. A redirect is not followed (the control plane's prober
follows none either): it is an answer without a document, like any status but 200;
followed, a redirect would send the agent (and the engine key, for an engine it started)
wherever it pointed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aiohttp

from agent.core import types
from synapse_common import read_limits, tasks

log = logging.getLogger("agent.engine_tasks")
TIMEOUT_S = 15.0
CHUNK = 64 * 1024


async def discover(session: aiohttp.ClientSession, base_url: str, timeout_s: float,
                   headers: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The tasks the engine's ``/openapi.json`` shows; empty when it serves none (or no
    such document), None when the engine could not be asked. ``headers``: the engine
    key's, for an engine the agent started."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.get(base_url + "/openapi.json", timeout=timeout,
                               headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                return ()
            body = await read_at_most(resp, read_limits.OPENAPI_MAX_BYTES)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("%s/openapi.json could not be read: %s", base_url, failure(exc))
        return None
    if body is None:
        log.warning("%s/openapi.json is over %d bytes: read as no document",
                    base_url, read_limits.OPENAPI_MAX_BYTES)
        return ()
    return await asyncio.to_thread(tasks.from_document, body)


def failure(exc: BaseException) -> str:
    """What a failed call to an engine says in a log line: the error's class, and the
    status of a refused answer. Never its repr nor its message: an aiohttp error's repr
    holds the request's headers (the engine key among them) and its message may quote
    whatever the engine answered."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__} (status {exc.status})"
    return type(exc).__name__


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None once it is longer than ``limit`` bytes (said by its
    Content-Length, or read to the chunk that passes it: the rest is never read)."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def learn(session: aiohttp.ClientSession, spec: types.EngineSpec, base_url: str,
                headers: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The backend's tasks, by the rule above; None when the engine must be asked again."""
    if spec.tasks:
        return spec.tasks
    found = await discover(session, base_url, TIMEOUT_S, headers)
    if found is None:
        return None
    if found:
        log.info("backend %s serves %s (its /openapi.json)", spec.name, ", ".join(found))
        return found
    return (spec.task,)
