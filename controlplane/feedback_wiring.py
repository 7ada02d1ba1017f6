"""The verifier the cache judges with, and the feedback loop around the cache (wiring).

Beside ``cache_wiring`` (above ``core`` and ``adapters``), called from
``main.build_response_cache``:

- :func:`load_judges` chooses the verifiers that judge lookups. An operator who sets
  ``cache.verifier_path`` or ``cache.embedder_id`` pins the cache to one verifier and its
  embedder: a verifier fitted for another embedder than ``cache.embedder_id`` (by
  default the untuned all-MiniLM-L6-v2, the agents' default ``embedder.tuning: none``)
  is refused at start, since its features and operating point mean nothing on another
  embedder's vectors, and vectors of another embedder are not judged at all. A file that
  records no embedder (older than the field) was fitted on the untuned model and is
  taken as it is. Without either setting, the shipped verifier judges the untuned
  MiniLM's vectors and the older shipped one (``verifier.ANY_EMBEDDER_PATH``) any other
  embedder's, as it judged every embedder's before the shipped verifier recorded its own.
- :func:`with_feedback` wraps the tiered cache in
  :class:`controlplane.core.cache_feedback.FeedbackCache`, with its judged pairs kept per
  tenant beside ``cache.feedback_path`` (default ``data_dir/cache_feedback.jsonl``:
  ``controlplane.adapters.feedback_log``).
"""

from __future__ import annotations

import os
import pathlib
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


def load_judges(c: config.CacheSettings, stack_path: pathlib.Path = verifier.STACK_PATH,
                ) -> tuple[verifier.Judges, str]:
    """The verifiers that judge lookups, and the embedder id the cache is pinned to ("":
    none, each embedder is judged by its own verifier or the one for any other).
    ``cache.pair_scorer`` puts the stack of ``stack_path`` over the shipped verifier."""
    judge = _load(c.verifier_path, "cache.verifier_path")
    if c.verifier_path is None and c.pair_scorer:
        try:
            judge = verifier.with_stack(judge, stack_path)
        except verifier.VerifierError as exc:
            raise VerifierConfigError(f"cache.pair_scorer: {exc}") from None
    if not c.semantic_enabled:
        return verifier.Judges(judge), ""       # never used to judge: any embedder will do
    if c.verifier_path is None and c.embedder_id is None:
        return verifier.Judges(judge, _load(verifier.ANY_EMBEDDER_PATH, "the shipped verifier")), ""
    if judge.embedder_id:               # no id: a file older than the field, taken as it is
        try:
            verifier.check_embedder(judge, expected_embedder(c))
        except verifier.VerifierError as exc:
            where = c.verifier_path or "the shipped verifier"
            source = "cache.embedder_id" if c.embedder_id else "the default of cache.embedder_id"
            raise VerifierConfigError(f"cache.verifier_path: {where}: {exc} ({source})") from None
    return verifier.Judges(judge), judge.embedder_id


def _load(path: str | pathlib.Path | None, setting: str) -> verifier.Verifier:
    try:
        return verifier.load(path)
    except verifier.VerifierError as exc:
        raise VerifierConfigError(f"{setting}: {exc}") from None


def with_feedback(tiered: Any, settings: config.ControlPlaneSettings,
                  metrics: metrics_mod.Metrics, *, tenants: int = 1,
                  ) -> cache_feedback.FeedbackCache:
    """The feedback loop around ``tiered`` (a ``TieredCache``: its L1 and L2, when it has
    one, evict), its pairs kept per tenant, each of the ``tenants`` configured with its
    share of the file bound."""
    c = settings.cache
    path = c.feedback_path or os.path.join(settings.data_dir, FEEDBACK_FILE)
    parts = cache_feedback.Parts(l1=tiered.l1, l2=tiered.l2,
                                 sink=feedback_log.JsonlPairs(path, tenants=tenants))
    inner: cache_port.ResponseCache = tiered
    return cache_feedback.FeedbackCache(
        inner, parts, metrics, served_log.ServedLog(c.feedback_remember, c.ttl_s,
                                                    clocks.monotonic), clocks.wall)
