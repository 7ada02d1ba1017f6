"""Health probing of static upstreams (a real Ollama / vLLM / TGI without an agent).

Each upstream's health path is fetched every interval with a short time limit; a 2xx is
healthy, anything else (status, refused connection, time-out) is not. Results go to a
callback (the registry), only the transitions are logged. The wait between rounds goes
through :func:`synapse_common.clock.sleep`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from controlplane import errors
from controlplane.adapters import upstream
from synapse_common import clock

log = logging.getLogger("synapse.controlplane.prober")


async def probe(client: upstream.UpstreamClient, url: str, timeout_s: float,
                headers: Mapping[str, str] | None = None) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            resp = await client.send("GET", url, b"", headers or {}, timeout_s)
            try:
                await resp.read()
            finally:
                resp.close()
    except (errors.UpstreamError, errors.UpstreamTimeout, TimeoutError):
        return False
    return 200 <= resp.status < 300


async def probe_loop(client: upstream.UpstreamClient,
                     targets: Sequence[tuple[str, str, Mapping[str, str]]],
                     interval_s: float, report: Callable[[str, bool], None]) -> None:
    """Probe ``(key, url, headers)`` targets forever; ``report(key, healthy)`` each round."""
    last: dict[str, bool] = {}
    timeout_s = max(0.2, min(2.0, interval_s / 2))
    while True:
        results = await asyncio.gather(*(probe(client, url, timeout_s, headers)
                                         for _, url, headers in targets))
        for (key, url, _), healthy in zip(targets, results, strict=True):
            if last.get(key) != healthy:
                log.log(logging.INFO if healthy else logging.WARNING,
                        "upstream %s is %s (%s)", key, "healthy" if healthy else "unhealthy",
                        url)
            last[key] = healthy
            report(key, healthy)
        await clock.sleep(interval_s)
