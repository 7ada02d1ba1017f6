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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp

from agent.core import types
from synapse_common import tasks

log = logging.getLogger("agent.engine_tasks")
TIMEOUT_S = 15.0


async def discover(session: aiohttp.ClientSession, base_url: str, timeout_s: float,
                   headers: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The tasks the engine's ``/openapi.json`` shows; empty when it serves none (or no
    such document), None when the engine could not be asked. ``headers``: the engine
    key's, for an engine the agent started."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.get(base_url + "/openapi.json", timeout=timeout,
                               headers=headers) as resp:
            if resp.status != 200:
                return ()
            document = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("%s/openapi.json could not be read: %r", base_url, exc)
        return None
    except ValueError:
        return ()
    paths = document.get("paths") if isinstance(document, dict) else None
    return tasks.from_paths(paths) if isinstance(paths, dict) else ()


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
