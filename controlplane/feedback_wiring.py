"""The verifier the cache judges with, and the feedback loop around the cache (wiring).

Beside ``cache_wiring`` (above ``core`` and ``adapters``), called from
``main.build_response_cache``:

- :func:`load_verifier` reads ``cache.verifier_path`` (default: the shipped verifier)
  and refuses, at start, a verifier fitted for another embedder than the agents serve:
  ``cache.embedder_id``, by default the untuned all-MiniLM-L6-v2 (the agents' default
  ``embedder.tuning: none``). A verifier's features and operating point mean nothing on
  another embedder's vectors. A file that records no embedder (older than the field) was
  fitted on the untuned model and is taken as it is.
- :func:`with_feedback` wraps the tiered cache in
  :class:`controlplane.core.cache_feedback.FeedbackCache`, with its judged pairs kept in
  ``cache.feedback_path`` (default ``data_dir/cache_feedback.jsonl``).
"""

from __future__ import annotations

import os
from typing import Any

from controlplane import config
from controlplane import metrics as metrics_mod
from controlplane.adapters import feedback_log
from controlplane.core import cache_feedback, cache_port, served_log, verifier
from synapse_common import clock as clocks
from synapse_common import embedder_tuning

FEEDBACK_FILE = "cache_feedback.jsonl"


class VerifierConfigError(ValueError):
    """``str()`` is one line naming the setting, for ``config error: …``."""


def expected_embedder(c: config.CacheSettings) -> str:
    """``cache.embedder_id``, else the embedder agents serve by default: the bundled
    all-MiniLM-L6-v2, untuned (``embedder.tuning: none``)."""
    return c.embedder_id or embedder_tuning.base_id()


def load_verifier(c: config.CacheSettings) -> verifier.Verifier:
    """The verifier of ``cache.verifier_path``, checked against the embedder."""
    try:
        judge = verifier.load(c.verifier_path)
    except verifier.VerifierError as exc:
        raise VerifierConfigError(f"cache.verifier_path: {exc}") from None
    if not c.semantic_enabled:
        return judge        # never used to judge: any embedder will do
    if not judge.embedder_id:
        return judge        # a file older than the field: fitted on the untuned MiniLM
    embedder_id = expected_embedder(c)
    try:
        verifier.check_embedder(judge, embedder_id)
    except verifier.VerifierError as exc:
        where = c.verifier_path or "the shipped verifier"
        source = "cache.embedder_id" if c.embedder_id else "the default of cache.embedder_id"
        raise VerifierConfigError(f"cache.verifier_path: {where}: {exc} ({source})") from None
    return judge


def with_feedback(tiered: Any, settings: config.ControlPlaneSettings,
                  judge: verifier.Verifier, metrics: metrics_mod.Metrics
                  ) -> cache_feedback.FeedbackCache:
    """The feedback loop around ``tiered`` (a ``TieredCache``: its L1 and L2 evict)."""
    c = settings.cache
    path = c.feedback_path or os.path.join(settings.data_dir, FEEDBACK_FILE)
    parts = cache_feedback.Parts(l1=tiered.l1, l2=tiered.l2, sink=feedback_log.JsonlPairs(path),
                                 verifier_digest=judge.digest,
                                 embedder_id=judge.embedder_id)
    inner: cache_port.ResponseCache = tiered
    return cache_feedback.FeedbackCache(
        inner, parts, metrics, served_log.ServedLog(c.feedback_remember, c.ttl_s,
                                                    clocks.monotonic), clocks.wall)
