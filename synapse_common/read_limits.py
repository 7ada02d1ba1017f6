"""How much of another server's answer is read: an agent's engine's ``/metrics`` and
``GET /openapi.json`` (:mod:`agent.runner`, :mod:`agent.engine_tasks`), and the control
plane's upstream's, to the same bounds (``controlplane.adapters.prober``).

A body longer than its bound counts as a failed scrape, or as no document: an ``external``
engine or a static upstream is any server at a URL, and one that is not what it seems must
not make the reader hold whatever it sends, or parse it (which takes the reader's CPU in
proportion, on its event loop). vLLM's own are far smaller.
"""

from __future__ import annotations

METRICS_MAX_BYTES = 4 * 1024 * 1024
"""The largest Prometheus exposition read; a longer one is a failed scrape."""

OPENAPI_MAX_BYTES = 16 * 1024 * 1024
"""The largest ``/openapi.json`` read; a longer one counts as no document."""
