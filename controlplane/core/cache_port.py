"""The seam between the serving path and the response cache.

The API handler builds a :class:`CacheRequest` after authentication and model
resolution, asks :meth:`ResponseCache.lookup`, and either answers from the
:class:`CacheHit` or proxies to a backend and then hands the complete response to
:meth:`ResponseCache.store`, which writes off the hot path and never raises. The cache
rules themselves (scope, key, bypass) live in the cache modules, not here.

:class:`NullCache` is the cache when caching is off: every request is a ``bypass``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Protocol

from controlplane.core import cache_entry, stream_replay

CacheStatus = Literal["hit-exact", "hit-semantic", "miss", "bypass"]
HitLayer = Literal["exact", "semantic"]


@dataclasses.dataclass(frozen=True)
class CacheRequest:
    tenant: str
    model: str                      # canonical model name
    endpoint: Literal["chat", "completions"]
    body: Mapping[str, Any]         # the parsed request JSON, as the client sent it
    cache_control: str = ""         # the Cache-Control header, "" when absent
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class HitSource:
    """Which entry answered (what ``cache_feedback`` needs to evict it and learn from it)."""

    ref: str                        # the entry's exact key (L1 key, L2 rows' ref)
    text: str                       # the entry's semantic text
    query: str                      # the request's semantic text
    l2_scope: str = ""              # the L2 partition searched (semantic hits)
    verifier: str = ""              # digest of the verifier that accepted it (semantic)
    embedder_id: str = ""           # the embedder of the vectors it was judged on


@dataclasses.dataclass(frozen=True)
class CacheHit:
    layer: HitLayer
    response: Mapping[str, Any]     # a complete non-streaming response object
    similarity: float | None = None  # semantic hits: cosine similarity of the texts
    score: float | None = None       # semantic hits: the verifier's probability
    form: Mapping[str, Any] | None = None  # a stream form to replay in (stream_fold)
    source: HitSource | None = None

    def events(self, body: Mapping[str, Any]) -> Iterator[bytes]:
        """The answer to the request ``body`` as SSE events shaped like a live stream: a
        usage chunk only when ``stream_options.include_usage`` asks for one."""
        return stream_replay.replay(self.response, self.form, cache_entry.include_usage(body))


@dataclasses.dataclass(frozen=True)
class CacheDecision:
    status: CacheStatus
    hit: CacheHit | None = None
    may_store: bool = False          # False for bypass reasons that forbid storing
    reason: str = ""                 # why bypass / miss, for logs and metrics
    token: Any = None                # opaque state lookup() hands to store()
    exact_key: str = ""              # the request's exact key (identical misses coalesce)
    # Seconds of the lookup's synchronous work on this request's body (its policy and
    # keys: the canonical JSON of the whole body), which the loop share charges its tenant.
    work_s: float = 0.0


class ResponseCache(Protocol):
    async def lookup(self, request: CacheRequest) -> CacheDecision:
        """Never raises; errors and time-outs count and become ``miss``."""
        ...

    def store(self, decision: CacheDecision, response: Mapping[str, Any]) -> None:
        """Schedule a write of a complete, successful response (finish_reason stop or
        length); returns at once and never raises. Anything else is ignored."""
        ...

    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        """Remove entries; returns (exact entries removed, semantic entries removed)."""
        ...

    async def close(self) -> None: ...


class NullCache:
    """Caching off: nothing is looked up or stored."""

    async def lookup(self, request: CacheRequest) -> CacheDecision:
        return CacheDecision(status="bypass", reason="cache disabled")

    def store(self, decision: CacheDecision, response: Mapping[str, Any]) -> None:
        return None

    async def invalidate(self, *, tenant: str | None = None, model: str | None = None,
                         everything: bool = False) -> tuple[int, int]:
        return (0, 0)

    async def close(self) -> None:
        return None
