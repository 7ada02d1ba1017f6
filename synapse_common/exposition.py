"""Reading another server's Prometheus exposition: an agent's engine's ``/metrics``, the
control plane's upstream's.

The body is read to at most :data:`METRICS_MAX_BYTES` and a longer one counts as a failed
scrape: an ``external`` engine or a static upstream is any server at a URL, and one that
is not what it seems must not make the reader hold whatever it sends (or parse it, which
takes the reader's CPU in proportion). vLLM's own exposition is far smaller.
"""

from __future__ import annotations

METRICS_MAX_BYTES = 4 * 1024 * 1024
