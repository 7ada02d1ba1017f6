"""L2, the semantic layer: a Milvus collection that the control plane creates and owns.

Milvus Lite (a file path) in embedded mode, a Milvus URI in production; one code path.

Design decisions:

- Schema: ``id`` (auto), ``scope`` (the scope hash, a partition key so production Milvus
  prunes to one scope), ``tenant``, ``model`` (for invalidation), ``vector``
  (normalised float32, inner product = cosine), ``ref`` (the exact key whose L1 entry holds
  the response), ``text`` (the semantic text, which the verifier's lexical guards need)
  and ``created_at`` (wall-clock seconds; searches ignore rows older than the TTL, so L2
  expiry is as absolute as L1's). The collection is created lazily with the dimension of
  the first vector; an existing collection with another dimension is an error, not a
  silent mismatch.
- Every search is filtered to one scope hash: a semantic hit can never cross tenants,
  models, conversations or parameter sets, whatever the vectors say.
- Fast searches while writing: Milvus Lite searches rows of an unflushed (growing)
  segment slowly (measured here: ~380 ms at 10k rows, ~15 ms once flushed). Writes are
  therefore followed by a debounced background ``flush`` (at most one per
  ``flush_interval_s``), which keeps the growing segment small. Rows written since the
  last completed flush are also kept in a small in-memory buffer that is searched with
  numpy beside Milvus, so this replica reads its own writes at once even where Milvus
  is eventually consistent; results are merged by ``ref``. That is why searches use
  ``Bounded`` consistency rather than ``Strong`` (which waits for the newest timestamp
  on every search). A row deleted by invalidation may linger in search results for a
  moment; its response is gone from L1 by then, so it can never be served.
- Searched scopes are mirrored in memory and searched with numpy (``scope_mirror``):
  a Milvus call costs tens of milliseconds, the numpy search of a scope about one.
- Empty scopes: most lookups ask whether a scope has rows at all (``has_entries``). The
  sole writer of a Milvus Lite file (a Lite file belongs to one process) reads every
  scope's newest row once in the background and then answers from memory; with a Milvus
  server, other replicas write too, so only a "yes" is remembered.
- pymilvus is blocking: every call runs in ``asyncio.to_thread`` with a pymilvus
  ``timeout``. A failed connection is retried at most every ``reconnect_s`` so a missing
  Milvus costs one fast error per call, not a connect attempt each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from controlplane.adapters import scope_mirror
from controlplane.adapters.scope_mirror import Candidate
from synapse_common.clock import Clock

TEXT_MAX = 8192
PENDING_MAX = 5000
# "Strong" makes every search wait for the newest timestamp (up to ~200 ms on a Milvus
# server); the recent-write buffer already gives this replica read-your-writes.
CONSISTENCY = "Bounded"
POSITIVE_TTL_S = 30.0
KNOWN_MAX = 100_000
SCAN_BATCH = 5_000      # rows per call when a sole writer reads every scope at start


@dataclasses.dataclass(frozen=True)
class Row:
    """One entry to write: the vector of a semantic text and the L1 key of its response."""

    scope: str
    tenant: str
    model: str
    vector: np.ndarray
    ref: str
    text: str


@dataclasses.dataclass
class _Pending:
    scope: str
    tenant: str
    model: str
    vector: np.ndarray
    ref: str
    text: str
    created_at: float


class L2Unavailable(RuntimeError):
    """Milvus could not be reached recently; retried after a pause."""


def _literal(text: str) -> str:
    """A Milvus expression string literal (JSON escaping is accepted by its parser)."""
    return json.dumps(text, ensure_ascii=False)


class MilvusL2:
    def __init__(self, uri: str, collection: str, token: str | None = None,
                 clock: Clock = time.time, call_timeout_s: float = 5.0,
                 flush_interval_s: float = 1.0, reconnect_s: float = 5.0,
                 mirror_max_rows: int = 100_000, mirror_refresh_s: float = 5.0,
                 mirror_reload_s: float = 300.0) -> None:
        self._uri = uri
        self._token = token
        self._collection = collection
        self._clock = clock
        self._timeout = call_timeout_s
        self._flush_interval = flush_interval_s
        self._reconnect_s = reconnect_s
        self._client: Any = None
        self._dim: int | None = None
        self._failed_at: float | None = None
        self._lock = threading.Lock()          # connect / create are not re-entrant
        self._pending: list[_Pending] = []
        self._known: dict[str, float] = {}      # scope -> until when "has rows" holds
        self._flush_task: asyncio.Task[None] | None = None
        self._closed = False
        self._mirror = scope_mirror.ScopeMirror(mirror_max_rows, mirror_refresh_s,
                                                mirror_reload_s, time.monotonic)
        self._mirror_tasks: dict[str, asyncio.Task[None]] = {}
        self._unmirrorable: dict[str, float] = {}   # scope -> monotonic time to try again
        self._generation = 0                        # bumped by invalidate
        # A Milvus Lite file belongs to this one process, so this replica sees every write:
        # once loaded, a map of each scope's newest row answers has_entries exactly.
        self._sole_writer = "://" not in uri
        self._scope_newest: dict[str, float] | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_writes: list[tuple[str, float]] = []   # inserts while the scan runs

    # -- public API --------------------------------------------------------------------
    async def search(self, scope: str, vector: np.ndarray, top_k: int,
                     min_created_at: float) -> list[Candidate]:
        if self._mirror.enabled:
            mirrored = self._mirror.get(scope)
            if mirrored is not None:
                self._check_dim(vector)
                due = self._mirror.due(mirrored)
                if due is not None:
                    self._sync_scope(scope, due)
                if len(mirrored) <= scope_mirror.INLINE_MAX_ROWS:
                    return mirrored.search(vector, top_k, min_created_at)
                return await asyncio.to_thread(mirrored.search, vector, top_k, min_created_at)
            self._sync_scope(scope, "reload")
        recent = self._search_pending(scope, vector, top_k, min_created_at)
        found = await asyncio.to_thread(self._search_sync, scope, vector, top_k, min_created_at)
        merged = {c.ref: c for c in found}
        for cand in recent:
            merged.setdefault(cand.ref, cand)
        return sorted(merged.values(), key=lambda c: -c.similarity)[:top_k]

    async def insert(self, rows: Sequence[Row]) -> None:
        """Write rows in one Milvus call (the response cache batches its writes)."""
        if not rows:
            return
        now = self._clock()
        pending = [_Pending(r.scope, r.tenant, r.model, np.asarray(r.vector, dtype=np.float32),
                            r.ref, r.text[:TEXT_MAX], now) for r in rows]
        await asyncio.to_thread(self._insert_sync, pending)
        for p in pending:
            self._mirror.add(p.scope, [_mirror_row(p)])
            if self._scope_newest is not None:
                self._scope_newest[p.scope] = max(self._scope_newest.get(p.scope, -1.0),
                                                  p.created_at)
            elif self._scanning:
                self._scan_writes.append((p.scope, p.created_at))
        self._pending.extend(pending)
        if len(self._pending) > PENDING_MAX:
            # Flushes keep failing: the oldest rows are in Milvus anyway, only slower to find.
            del self._pending[: len(self._pending) - PENDING_MAX]
        self._schedule_flush()

    @property
    def _scanning(self) -> bool:
        return self._scan_task is not None and not self._scan_task.done()

    def _load_scopes_soon(self) -> None:
        """Sole writer: read every scope's newest row once, in the background."""
        if (not self._sole_writer or self._scanning or self._closed
                or self._scope_newest is not None):
            return
        self._scan_writes = []
        self._scan_task = asyncio.get_running_loop().create_task(
            self._load_scopes(self._generation))

    async def _load_scopes(self, generation: int) -> None:
        try:
            newest = await asyncio.to_thread(self._scan_scopes_sync)
        except Exception:
            return      # the probe keeps answering; the next call tries again
        if newest is not None and generation == self._generation:
            for scope, created in self._scan_writes:    # written while the scan ran
                newest[scope] = max(newest.get(scope, -1.0), created)
            self._scope_newest = newest

    async def has_entries(self, scope: str, min_created_at: float) -> bool:
        """Whether the scope holds a live row (a scalar query: no vectors involved).

        A yes is remembered for ``POSITIVE_TTL_S`` (scopes rarely empty out; a stale yes
        only costs one search); a no is never remembered, since another replica may
        write the scope at any moment — except by the sole writer of a Milvus Lite file,
        which reads every scope's newest row once and then sees every write itself."""
        newest = self._scope_newest
        if newest is not None:
            return newest.get(scope, -1.0) >= min_created_at
        now = time.monotonic()
        if self._known.get(scope, 0.0) > now:
            return True
        mirrored = self._mirror.get(scope)
        if mirrored is not None and mirrored.has_live(min_created_at):
            return True
        self._load_scopes_soon()
        if any(p.scope == scope and p.created_at >= min_created_at for p in self._pending):
            found = True
        else:
            found = await asyncio.to_thread(self._exists_sync, scope, min_created_at)
        if found:
            self._known[scope] = now + POSITIVE_TTL_S
            if len(self._known) > KNOWN_MAX:
                self._known.clear()
        return found

    async def invalidate(self, tenant: str | None, model: str | None) -> int:
        self._known.clear()
        self._mirror.clear()
        self._generation += 1       # loads that started before must not put rows back
        self._scope_newest = None   # other scopes remain: the next probe reads them again
        self._pending = [p for p in self._pending
                         if not ((tenant is None or p.tenant == tenant)
                                 and (model is None or p.model == model))]
        return await asyncio.to_thread(self._delete_sync, tenant, model)

    def warm_up(self) -> None:
        """Open Milvus (Lite starts a server: about a second) in a background thread, so
        the first lookups do not spend their budget on it; failures surface later."""
        def connect() -> None:
            with contextlib.suppress(Exception):
                self._connect(None)
        threading.Thread(target=connect, name="milvus-warm-up", daemon=True).start()

    async def flush(self) -> None:
        """Flush now (tests and benchmarks; the serving path relies on the debounce)."""
        pending = list(self._pending)
        await asyncio.to_thread(self._flush_sync)
        self._forget(pending)

    async def close(self) -> None:
        self._closed = True
        for task in [*self._mirror_tasks.values(), *filter(None, [self._scan_task])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flush_task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._client.close)
            self._client = None

    # -- connection / schema -----------------------------------------------------------
    def _connect(self, dim: int | None) -> Any:
        with self._lock:
            if self._client is None:
                now = time.monotonic()
                if self._failed_at is not None and now - self._failed_at < self._reconnect_s:
                    raise L2Unavailable(f"Milvus at {self._safe_uri()} failed recently")
                try:
                    if "://" not in self._uri:       # Milvus Lite file: its folder must exist
                        os.makedirs(os.path.dirname(os.path.abspath(self._uri)), exist_ok=True)
                    from pymilvus import MilvusClient
                    kwargs: dict[str, Any] = {"uri": self._uri, "timeout": self._timeout}
                    if self._token:
                        kwargs["token"] = self._token
                    self._client = MilvusClient(**kwargs)
                except Exception as exc:
                    self._failed_at = now
                    raise L2Unavailable(f"cannot open Milvus at {self._safe_uri()}: "
                                        f"{type(exc).__name__}") from exc
                self._failed_at = None
            if self._dim is None:
                self._dim = self._existing_dim()
            if self._dim is None and dim is not None:
                self._create(dim)
                self._dim = dim
            return self._client

    def _safe_uri(self) -> str:
        # A Milvus URI may carry credentials (user:pass@host): show scheme and host only.
        uri = self._uri
        if "@" in uri:
            scheme, _, rest = uri.partition("://")
            return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}"
        return uri

    def _existing_dim(self) -> int | None:
        client = self._client
        if not client.has_collection(self._collection, timeout=self._timeout):
            return None
        desc = client.describe_collection(self._collection, timeout=self._timeout)
        for field in desc.get("fields", []):
            if field.get("name") == "vector":
                return int(field["params"]["dim"])
        raise RuntimeError(f"collection {self._collection!r} has no vector field")

    def _create(self, dim: int) -> None:
        from pymilvus import DataType, MilvusClient
        schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("scope", DataType.VARCHAR, max_length=64, is_partition_key=True)
        schema.add_field("tenant", DataType.VARCHAR, max_length=1024)
        schema.add_field("model", DataType.VARCHAR, max_length=1024)
        schema.add_field("ref", DataType.VARCHAR, max_length=128)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX * 4)
        schema.add_field("created_at", DataType.DOUBLE)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = self._client.prepare_index_params()
        # FLAT = exact inner-product search: scopes are small, and exactness keeps the
        # verifier's candidates deterministic. Production Milvus may swap in HNSW here.
        index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        self._client.create_collection(self._collection, schema=schema, index_params=index,
                                       consistency_level=CONSISTENCY, timeout=self._timeout)

    def _check_dim(self, vector: np.ndarray) -> None:
        if self._dim is not None and vector.shape[-1] != self._dim:
            raise ValueError(f"vector dimension {vector.shape[-1]} does not match collection "
                             f"{self._collection!r} ({self._dim}); use another collection "
                             "for another embedder")

    # -- blocking calls (run in threads) -----------------------------------------------
    def _search_sync(self, scope: str, vector: np.ndarray, top_k: int,
                     min_created_at: float) -> list[Candidate]:
        client = self._connect(None)
        if self._dim is None:
            return []           # nothing was ever stored
        self._check_dim(vector)
        res = client.search(
            self._collection, data=[vector.astype(np.float32).tolist()], limit=top_k,
            filter=f"scope == {_literal(scope)} and created_at >= {float(min_created_at)!r}",
            output_fields=["ref", "text", "vector", "created_at"],
            consistency_level=CONSISTENCY, timeout=self._timeout)
        out: list[Candidate] = []
        for hit in res[0] if res else []:
            ent = hit["entity"]
            out.append(Candidate(ref=ent["ref"], text=ent["text"],
                                 vector=np.asarray(ent["vector"], dtype=np.float32),
                                 similarity=float(hit["distance"]),
                                 created_at=float(ent["created_at"])))
        return out

    def _insert_sync(self, rows: list[_Pending]) -> None:
        client = self._connect(int(rows[0].vector.shape[-1]))
        for row in rows:
            self._check_dim(row.vector)
        client.insert(self._collection, [{
            "scope": row.scope, "tenant": row.tenant[:1024], "model": row.model[:1024],
            "ref": row.ref, "text": row.text, "created_at": row.created_at,
            "vector": row.vector.tolist()} for row in rows], timeout=self._timeout)

    def _exists_sync(self, scope: str, min_created_at: float) -> bool:
        client = self._connect(None)
        if self._dim is None:
            return False
        rows = client.query(
            self._collection, limit=1, output_fields=["id"],
            filter=f"scope == {_literal(scope)} and created_at >= {float(min_created_at)!r}",
            consistency_level=CONSISTENCY, timeout=self._timeout)
        return bool(rows)

    def _delete_sync(self, tenant: str | None, model: str | None) -> int:
        client = self._connect(None)
        if self._dim is None:
            return 0
        clauses = []
        if tenant is not None:
            clauses.append(f"tenant == {_literal(tenant)}")
        if model is not None:
            clauses.append(f"model == {_literal(model)}")
        expr = " and ".join(clauses) if clauses else "id >= 0"
        # Strong: the count (and so the delete) must see rows written a moment ago.
        counted = client.query(self._collection, filter=expr, output_fields=["count(*)"],
                               consistency_level="Strong", timeout=self._timeout)
        count = int(counted[0]["count(*)"]) if counted else 0
        if count:
            client.delete(self._collection, filter=expr, timeout=self._timeout)
        return count

    def _flush_sync(self) -> None:
        if self._client is None or self._dim is None:
            return
        self._client.flush(self._collection, timeout=max(self._timeout, 30.0))

    # -- scope mirror (see scope_mirror) ------------------------------------------------
    def _sync_scope(self, scope: str, what: str) -> None:
        """Start loading (``reload``) or refreshing a scope's mirror in the background."""
        if self._closed or scope in self._mirror_tasks:
            return
        if what == "reload" and self._unmirrorable.get(scope, 0.0) > time.monotonic():
            return
        task = asyncio.get_running_loop().create_task(
            self._load_scope(scope) if what == "reload" else self._refresh_scope(scope))
        self._mirror_tasks[scope] = task
        task.add_done_callback(lambda _: self._mirror_tasks.pop(scope, None))

    async def _load_scope(self, scope: str) -> None:
        generation = self._generation
        try:
            rows = await asyncio.to_thread(self._query_scope_sync, scope, None)
        except Exception:
            # Milvus is failing: searches go to it (and fail open) until it is back.
            self._unmirrorable[scope] = time.monotonic() + self._reconnect_s
            return
        if rows is None or generation != self._generation or self._dim is None:
            return
        if not self._mirror.put(scope, rows, self._dim):
            self._unmirrorable[scope] = time.monotonic() + self._mirror.reload_s
            return
        self._unmirrorable.pop(scope, None)
        # Own writes that the (bounded-consistency) query may not have seen yet.
        self._mirror.add(scope, [_mirror_row(p) for p in self._pending if p.scope == scope])

    async def _refresh_scope(self, scope: str) -> None:
        mirrored = self._mirror.get(scope)
        if mirrored is None:
            return
        since = mirrored.newest - scope_mirror.REFRESH_OVERLAP_S
        generation = self._generation
        with contextlib.suppress(Exception):
            rows = await asyncio.to_thread(self._query_scope_sync, scope, since)
            if rows is not None and generation == self._generation:
                self._mirror.add(scope, rows)

    def _scan_scopes_sync(self) -> dict[str, float] | None:
        """Every scope and the creation time of its newest row (a full scan, batched)."""
        client = self._connect(None)
        if self._dim is None:
            return {}       # no collection yet: no scope has rows
        newest: dict[str, float] = {}
        rows = client.query_iterator(self._collection, batch_size=SCAN_BATCH, filter="id >= 0",
                                     output_fields=["scope", "created_at"],
                                     timeout=max(self._timeout, 30.0))
        try:
            while batch := rows.next():
                for row in batch:
                    scope, created = row["scope"], float(row["created_at"])
                    if created > newest.get(scope, -1.0):
                        newest[scope] = created
        finally:
            rows.close()
        return newest

    def _query_scope_sync(self, scope: str, since: float | None
                          ) -> list[scope_mirror.MirrorRow] | None:
        client = self._connect(None)
        if self._dim is None:
            return None
        expr = f"scope == {_literal(scope)}"
        if since is not None:
            expr += f" and created_at >= {float(since)!r}"
        found = client.query(self._collection, filter=expr,
                             output_fields=["ref", "text", "vector", "created_at"],
                             limit=scope_mirror.SCOPE_MAX_ROWS + 1,
                             consistency_level=CONSISTENCY, timeout=max(self._timeout, 30.0))
        return scope_mirror.rows_from_query(found)

    # -- recent-write buffer -----------------------------------------------------------
    def _search_pending(self, scope: str, vector: np.ndarray, top_k: int,
                        min_created_at: float) -> list[Candidate]:
        rows = [_mirror_row(p) for p in self._pending if p.scope == scope]
        if not rows:
            return []
        recent = scope_mirror.ScopeRows(len(vector), 0.0)   # the mirror's own exact top-k
        recent.add(rows)
        return recent.search(vector, top_k, min_created_at)

    def _schedule_flush(self) -> None:
        if self._closed or (self._flush_task is not None and not self._flush_task.done()):
            return
        self._flush_task = asyncio.get_running_loop().create_task(self._debounced_flush())

    async def _debounced_flush(self) -> None:
        await asyncio.sleep(self._flush_interval)
        pending = list(self._pending)
        try:
            await asyncio.to_thread(self._flush_sync)
        except Exception:
            # A failed flush leaves rows searchable (growing segment + buffer); the next
            # write schedules another attempt.
            return
        self._forget(pending)

    def _forget(self, flushed: list[_Pending]) -> None:
        # Rows written while the flush ran stay in the buffer until the next one.
        done = {id(p) for p in flushed}
        self._pending = [p for p in self._pending if id(p) not in done]


def _mirror_row(p: _Pending) -> scope_mirror.MirrorRow:
    return scope_mirror.MirrorRow(p.ref, p.text, p.vector, p.created_at)
