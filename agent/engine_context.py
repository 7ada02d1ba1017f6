"""How long a context a backend takes (``max_model_len``), reported to the control plane,
whose ``GET /v1/models`` lists it as vLLM's own listing does.

Asked of the engine itself when it becomes ready (and again later: :mod:`agent.runner`
says when): vLLM (and the simulator, which imitates
it) lists ``max_model_len`` per model in ``GET /v1/models``, the length it settled on
(its ``--max-model-len``, else the model's own, capped by what fits in its KV cache),
which the spec cannot know. Of the entries for the backend's models the smallest length
is taken (one engine has one length; an alias listed twice says the same). An answer
without a usable length (no such entry, or not a whole number in 1..:data:`LIMIT`; a
status other than 200 that is neither a server error nor a refusal) leaves the spec's
explicit length (``commands.max_model_len``), else unknown (0). No answer (no connection,
none in time, a broken one, a server error, a 401 or 403) is not read as one: the caller
keeps the length it last read, as the engine may be busy or restarting, or an external
engine's key rotated (its ``/health``, open as vLLM's is, still passes), and asks again.

As every call the runner makes to an engine, the request follows no redirect and carries
the engine key for an engine the agent started; the answer is read to at most
:data:`MAX_BYTES` (a longer one counts as no answer) and parsed off the event loop: an
``external`` engine is any server at a URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection, Mapping

import aiohttp

from agent import engine_tasks
from agent.core import commands, types

log = logging.getLogger("agent.engine_context")
MAX_BYTES = 1024 * 1024
LIMIT = 2**31 - 1       # the largest length a report carries (the control plane's bound)
REFUSED = frozenset({401, 403})    # the engine would not say: no answer, not "none"


async def learn(session: aiohttp.ClientSession, spec: types.EngineSpec, base_url: str,
                timeout_s: float, headers: Mapping[str, str] | None = None) -> int | None:
    """The backend's context length by the rule above (0: unknown); None when the engine
    gave no answer."""
    told = await ask(session, base_url, spec.models, timeout_s, headers)
    if told is None:
        return None
    return told or commands.max_model_len(spec)


async def ask(session: aiohttp.ClientSession, base_url: str, models: Collection[str],
              timeout_s: float, headers: Mapping[str, str] | None = None) -> int | None:
    """The length the engine's ``/v1/models`` gives ``models`` (0: it gave none; None: it
    gave no answer)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.get(base_url + "/v1/models", timeout=timeout,
                               headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                return None if resp.status >= 500 or resp.status in REFUSED else 0
            body = await engine_tasks.read_at_most(resp, MAX_BYTES)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug("%s/v1/models could not be read: %s", base_url, engine_tasks.failure(exc))
        return None
    if body is None:
        return 0
    return await asyncio.to_thread(from_listing, body, models)


def from_listing(body: bytes, models: Collection[str]) -> int:
    """The smallest valid ``max_model_len`` of the listing's entries for ``models``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return 0
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return 0
    lengths = [length(entry.get("max_model_len")) for entry in data
               if isinstance(entry, dict) and isinstance(entry.get("id"), str)
               and entry["id"] in models]
    return min((n for n in lengths if n), default=0)


def length(value: object) -> int:
    """``value`` when it is a whole number in 1..:data:`LIMIT`, else 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value if 1 <= value <= LIMIT else 0
