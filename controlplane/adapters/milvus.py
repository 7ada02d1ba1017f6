"""The L2 vector store in Milvus: pymilvus calls and nothing else (the only module that
imports pymilvus). The core's ``controlplane.core.l2.index.L2Index`` decides what to call;
this class implements its port, ``controlplane.core.l2.store.Store``.

Milvus Lite (a file path) in embedded mode, a Milvus URI in production; one code path.

Design decisions:

- Schema: ``id`` (auto), ``scope`` (the scope hash, a partition key so production Milvus
  prunes to one scope), ``tenant``, ``model`` (for invalidation), ``vector``
  (normalised float32, inner product = cosine), ``ref`` (the exact key whose L1 entry holds
  the response), ``text`` (the semantic text, which the verifier's lexical guards need)
  and ``created_at`` (wall-clock seconds, for the TTL). FLAT index: exact inner-product
  search (scopes are small, and exactness keeps the verifier's candidates deterministic).
- **Loaded for search, always.** A collection must be loaded into memory before Milvus
  searches or queries it; a new Milvus Lite process (a restart on the same file), a
  Milvus server restart or another replica's ``release`` leave it "released". ``open``
  loads an existing collection, and a call refused with "not loaded" / "released" loads
  it (one load at a time) and is retried once.
- pymilvus is blocking: every call runs in ``asyncio.to_thread``, with the pymilvus
  ``timeout`` and an asyncio time-out a little longer, so no caller waits beyond it.
- A failed connection is retried at most every ``reconnect_s`` (:class:`L2Unavailable`
  meanwhile), so a missing Milvus costs one fast error per call, not a connect each time.
  So is a connected Milvus whose calls fail (it went away, its Lite store is corrupt): a
  call that fails or times out opens the circuit for ``reconnect_s``, and one call then
  tries again. Without it every cache miss spent the whole semantic budget on a store
  known to be dead, and pymilvus logged its tracebacks for each.
- At most :data:`MAX_IN_FLIGHT` calls run at once: a call its caller gave up on (the cache
  budget) goes on in its thread until its own time-out, and a Milvus that stopped
  answering would otherwise take every thread of the loop's default executor, which
  other work (resolving upstream host names) shares.
- **A damaged Lite store is moved aside, not deleted** (:mod:`milvus_lite_damage`: what
  counts as damage, the move, the copies kept). When ``open`` fails on a Lite store, the
  store is opened directly (milvus-lite's own ``MilvusLite``, with this process's Lite
  server for it stopped first) to learn the real exception, which pymilvus reduces to
  "Open local milvus failed" or a status code. At most one such check per
  ``reconnect_s``; a store whose open timed out is never checked. With milvus-lite 2 (a
  single file and a server subprocess) there is nothing to check with, and nothing is
  moved.
- Searches and queries use ``Bounded`` consistency ("Strong" makes every search wait for
  the newest timestamp: up to ~200 ms on a Milvus server); the core's recent-write buffer
  gives this replica read-your-writes. Invalidation counts with ``Strong``: it must see
  rows written a moment ago.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import stat as stat_mod
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from controlplane.adapters import milvus_lite_damage
from controlplane.core.l2 import rows, store
from synapse_common import clock as clocks
from synapse_common import logs

log = logging.getLogger(__name__)

CONSISTENCY = "Bounded"
TEXT_FIELD_MAX = 8192 * 4       # bytes: TEXT_MAX characters of UTF-8
SCAN_BATCH = 5_000              # rows per call of a full scan
SLOW_CALL_S = 30.0              # floor of the time-out of flushes, loads and queries
SCAN_S = 600.0                  # a full scan: many calls of SLOW_CALL_S each, off the hot path
GRACE_S = 1.0                   # the asyncio time-out beyond pymilvus' own
NOT_LOADED_CODE = 101           # Milvus' CollectionNotLoaded
T = TypeVar("T")


MAX_IN_FLIGHT = 4      # pymilvus calls running in threads at once


class L2Unavailable(RuntimeError):
    """Milvus could not be reached recently; retried after a pause."""


class _FailedRecently(L2Unavailable):
    """The last connect failed less than ``reconnect_s`` ago; nothing was tried."""


def _literal(text: str) -> str:
    """A Milvus expression string literal (JSON escaping is accepted by its parser)."""
    return json.dumps(text, ensure_ascii=False)


def _scope_filter(scope: str, since: float | None) -> str:
    expr = f"scope == {_literal(scope)}"
    return expr if since is None else f"{expr} and created_at >= {float(since)!r}"


def _not_loaded(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (getattr(exc, "code", None) == NOT_LOADED_CODE or "not loaded" in text
            or "'released'" in text)


class MilvusStore:
    def __init__(self, uri: str, collection: str, token: str | None = None, *,
                 call_timeout_s: float = 5.0, reconnect_s: float = 5.0,
                 clock: clocks.Clock = clocks.monotonic, label: str | None = None) -> None:
        self._uri = uri
        self._label = label     # what the log calls a Lite file (its URI may be a secret)
        self._lock_said = False
        self._token = token
        self._collection = collection
        self._timeout = call_timeout_s
        self._reconnect_s = reconnect_s
        self._clock = clock
        self._client: Any = None
        self._failed_at: float | None = None
        self._failing_until = -math.inf         # the circuit is open until then
        self._in_flight = 0                     # calls running in threads
        self._in_flight_lock = threading.Lock()
        self._lock = threading.Lock()           # connect / create / load are not re-entrant
        self._repair_lock = threading.Lock()    # one damage check at a time
        self._checked_at = -math.inf            # the last damage check (``clock``)
        self._repairs = 0                       # damaged stores moved aside
        self._loading: asyncio.Future[None] | None = None
        self._warming: threading.Thread | None = None   # the warm-up's thread
        self._warmed = False                    # a warm-up opened the store

    @property
    def exclusive(self) -> bool:
        """A Milvus Lite file belongs to this one process; a server is shared."""
        return store.is_file(self._uri)

    def safe_uri(self) -> str:
        """The URI without credentials (``user:pass@host`` shows scheme and host only)."""
        uri = self._uri
        if "@" in uri:
            scheme, _, rest = uri.partition("://")
            return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}"
        return uri

    # -- the port ----------------------------------------------------------------------
    async def open(self) -> int | None:
        return await self._run(self._open_sync, SLOW_CALL_S)

    async def create(self, dim: int) -> None:
        await self._run(lambda: self._create_sync(dim), SLOW_CALL_S)

    async def insert(self, records: Sequence[rows.Record]) -> None:
        data = [{"scope": r.scope, "tenant": r.tenant[:1024], "model": r.model[:1024],
                 "ref": r.ref, "text": r.text, "created_at": r.created_at,
                 "vector": r.vector.tolist()} for r in records]
        await self._call(lambda c: c.insert(self._collection, data, timeout=self._timeout))

    async def search(self, scope: str, vector: np.ndarray, top_k: int,
                     min_created_at: float) -> list[rows.Candidate]:
        query = [np.asarray(vector, dtype=np.float32).tolist()]
        res = await self._call(lambda c: c.search(
            self._collection, data=query, limit=top_k,
            filter=_scope_filter(scope, min_created_at),
            output_fields=["ref", "text", "vector", "created_at"],
            consistency_level=CONSISTENCY, timeout=self._timeout))
        return [rows.Candidate(ref=h["entity"]["ref"], text=h["entity"]["text"],
                               vector=np.asarray(h["entity"]["vector"], dtype=np.float32),
                               created_at=float(h["entity"]["created_at"]),
                               similarity=float(h["distance"]))
                for h in (res[0] if res else [])]

    async def exists(self, scope: str, min_created_at: float) -> bool:
        found = await self._call(lambda c: c.query(
            self._collection, limit=1, output_fields=["id"],
            filter=_scope_filter(scope, min_created_at), consistency_level=CONSISTENCY,
            timeout=self._timeout))
        return bool(found)

    async def scope_rows(self, scope: str, since: float | None,
                         limit: int) -> list[rows.Candidate]:
        found = await self._call(lambda c: c.query(
            self._collection, filter=_scope_filter(scope, since),
            output_fields=["ref", "text", "vector", "created_at"], limit=limit,
            consistency_level=CONSISTENCY, timeout=max(self._timeout, SLOW_CALL_S)),
            SLOW_CALL_S)
        return [rows.Candidate(ref=str(r["ref"]), text=str(r["text"]),
                               vector=np.asarray(r["vector"], dtype=np.float32),
                               similarity=0.0, created_at=float(r["created_at"]))
                for r in found]

    async def newest_per_scope(self) -> dict[str, float]:
        return await self._call(self._scan_sync, SCAN_S)

    async def delete(self, tenant: str | None, model: str | None) -> int:
        clauses = []
        if tenant is not None:
            clauses.append(f"tenant == {_literal(tenant)}")
        if model is not None:
            clauses.append(f"model == {_literal(model)}")
        return await self._call(lambda c: self._delete_sync(
            c, " and ".join(clauses) if clauses else "id >= 0"))

    async def delete_ref(self, ref: str) -> int:
        return await self._call(lambda c: self._delete_sync(c, f"ref == {_literal(ref)}"))

    async def delete_older(self, before: float) -> int:
        return await self._call(lambda c: self._delete_sync(
            c, f"created_at < {float(before)!r}"), SLOW_CALL_S)

    async def flush(self) -> None:
        await self._call(lambda c: c.flush(self._collection,
                                           timeout=max(self._timeout, SLOW_CALL_S)),
                         SLOW_CALL_S)

    def warm_up(self) -> None:
        """Open Milvus (Lite starts a server: about a second) and load an existing
        collection in a background thread; failures surface at the next call. Once opened,
        or while a warm-up runs, a call does nothing (the process's start-up opens it, the
        first cacheable request asks again); after a failure it tries again."""
        with self._in_flight_lock:
            if self._warmed or (self._warming is not None and self._warming.is_alive()):
                return

            def open_quietly() -> None:
                try:
                    self._open_sync()
                except Exception:   # the serving path reports it, once per budget
                    return
                self._warmed = True
            self._warming = threading.Thread(target=open_quietly, name="milvus-warm-up",
                                             daemon=True)
            self._warming.start()

    def warming(self) -> bool:
        """Whether a warm-up is still opening the store (``/ready`` waits for it, a
        bounded time: :mod:`controlplane.api.readiness`)."""
        thread = self._warming
        return thread is not None and thread.is_alive()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.to_thread(client.close)
            except Exception:   # closing a broken connection: nothing left to do
                return

    # -- calls ---------------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T], timeout_s: float | None = None) -> T:
        """One blocking pymilvus call in a thread, never awaited beyond its time-out; at
        most :data:`MAX_IN_FLIGHT` at once (a thread runs on after its caller gave up)."""
        with self._in_flight_lock:
            if self._in_flight >= MAX_IN_FLIGHT:
                raise L2Unavailable(f"Milvus at {self.safe_uri()} is not answering "
                                    f"({MAX_IN_FLIGHT} calls still running)")
            self._in_flight += 1

        def counted() -> T:
            try:
                return fn()
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1
        try:
            thread = asyncio.to_thread(counted)
        except BaseException:
            with self._in_flight_lock:
                self._in_flight -= 1
            raise
        async with asyncio.timeout((timeout_s or self._timeout) + GRACE_S):
            return await thread

    async def _call(self, fn: Callable[[Any], T], timeout_s: float | None = None) -> T:
        """A call on the collection; loaded again and retried once if Milvus had it
        released (a restart of Milvus or of a Lite process). A failure opens the circuit
        for ``reconnect_s`` (:class:`L2Unavailable` meanwhile)."""
        if self._clock() < self._failing_until:
            raise L2Unavailable(f"Milvus at {self.safe_uri()} failed recently")
        try:
            try:
                return await self._run(lambda: fn(self._connect()), timeout_s)
            except Exception as exc:
                if not _not_loaded(exc):
                    raise
            await self._reload()
            return await self._run(lambda: fn(self._connect()), timeout_s)
        except L2Unavailable:
            raise
        except Exception:
            self._failing_until = self._clock() + self._reconnect_s
            raise

    async def _reload(self) -> None:
        """Load the collection; concurrent callers share one load."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._run(self._load_sync, SLOW_CALL_S))
            # Callers that gave up (their budget) leave it running; its outcome is theirs
            # to see, or nobody's: never an unretrieved-exception warning.
            self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._loading)

    # -- blocking (run in threads) -------------------------------------------------------
    def _connect(self) -> Any:
        with self._lock:
            if self._client is not None:
                return self._client
            now = self._clock()
            if self._failed_at is not None and now - self._failed_at < self._reconnect_s:
                raise _FailedRecently(f"Milvus at {self.safe_uri()} failed recently")
            watch = _LockWatch(os.path.abspath(self._uri))
            try:
                if self.exclusive:      # a Milvus Lite file: its folder must exist, and
                    # be private when made here (Milvus Lite writes tenants' texts 0644)
                    os.makedirs(os.path.dirname(os.path.abspath(self._uri)), mode=0o700,
                                exist_ok=True)
                import pymilvus  # imported late: slow to import, and only L2 needs it
                logs.adopt("pymilvus")      # it installs its own stderr handlers
                logging.getLogger("grpc._server").addFilter(_lite_unimplemented)
                kwargs: dict[str, Any] = {"uri": self._uri, "timeout": self._timeout}
                if self._token:
                    kwargs["token"] = self._token
                lite_log = logging.getLogger(LITE_SERVER_LOGGER)
                lite_log.addFilter(watch)
                try:
                    self._client = pymilvus.MilvusClient(**kwargs)
                finally:
                    lite_log.removeFilter(watch)
                if self.exclusive:
                    _private(self._uri)
            except Exception as exc:
                self._failed_at = now
                if self.exclusive and watch.locked:
                    self._say_locked()
                    raise L2Unavailable(f"cannot open the Milvus Lite file "
                                        f"{self._lite_name()}: another process holds "
                                        f"it") from None
                raise L2Unavailable(f"cannot open Milvus at {self.safe_uri()}: "
                                    f"{type(exc).__name__}") from exc
            self._failed_at = None
            return self._client

    def _lite_name(self) -> str:
        return self._label or "that cache.milvus_uri names"

    def _say_locked(self) -> None:
        """One line, once: two processes on one data dir (a second control plane)."""
        if not self._lock_said:
            self._lock_said = True
            log.warning("L2 (the semantic cache) is off in this process: another process "
                        "holds the Milvus Lite file %s (one control plane per data dir, or "
                        "cache.milvus_uri on a Milvus server)", self._lite_name())

    def _open_sync(self) -> int | None:
        """Open the store and load an existing collection; a damaged Lite store is moved
        aside and a fresh one opened (see the module docstring)."""
        repairs = self._repairs
        try:
            return self._open_collection()
        except _FailedRecently:
            raise
        except Exception as exc:
            if not self.exclusive or milvus_lite_damage.timed_out(exc):
                raise
            with self._repair_lock:
                if self._repairs == repairs:    # else another thread just repaired it
                    if not self._set_aside_if_damaged():
                        raise
                    self._repairs += 1
        return self._open_collection()

    def _set_aside_if_damaged(self) -> bool:
        """Stop this process's Lite server for the store, open the store directly, and
        move it aside if :func:`milvus_lite_damage.damaged` says so (at most once per
        ``reconnect_s``)."""
        now = self._clock()
        if now - self._checked_at < self._reconnect_s:
            return False
        self._checked_at = now
        try:
            from milvus_lite import db as lite_db
            from milvus_lite import server_manager
        except ImportError:     # milvus-lite 2: a single file, nothing to check it with
            return False
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:   # closing a broken connection: nothing left to do
                pass
        server_manager.server_manager_instance.release_server(self._uri)
        moved = milvus_lite_damage.move_if_damaged(lite_db, os.path.abspath(self._uri),
                                                   self._collection)
        if moved is None:
            return False
        self._failed_at = None
        return True

    def _open_collection(self) -> int | None:
        client = self._connect()
        if not client.has_collection(self._collection, timeout=self._timeout):
            return None
        desc = client.describe_collection(self._collection, timeout=self._timeout)
        dim = next((int(f["params"]["dim"]) for f in desc.get("fields", [])
                    if f.get("name") == "vector"), None)
        if dim is None:
            raise RuntimeError(f"collection {self._collection!r} has no vector field")
        self._load_sync()
        return dim

    def _load_sync(self) -> None:
        client = self._connect()
        with self._lock:
            state = client.get_load_state(self._collection, timeout=self._timeout)
            if getattr(state.get("state"), "name", "") != "Loaded":   # NotLoad, Loading
                client.load_collection(self._collection, timeout=max(self._timeout,
                                                                     SLOW_CALL_S))

    def _create_sync(self, dim: int) -> None:
        import pymilvus
        DataType = pymilvus.DataType
        client = self._connect()
        with self._lock:
            if client.has_collection(self._collection, timeout=self._timeout):
                return
            schema = pymilvus.MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("scope", DataType.VARCHAR, max_length=64, is_partition_key=True)
            schema.add_field("tenant", DataType.VARCHAR, max_length=1024)
            schema.add_field("model", DataType.VARCHAR, max_length=1024)
            schema.add_field("ref", DataType.VARCHAR, max_length=128)
            schema.add_field("text", DataType.VARCHAR, max_length=TEXT_FIELD_MAX)
            schema.add_field("created_at", DataType.DOUBLE)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = client.prepare_index_params()
            # Production Milvus may swap in HNSW here.
            index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            client.create_collection(self._collection, schema=schema, index_params=index,
                                     consistency_level=CONSISTENCY, timeout=self._timeout)

    def _scan_sync(self, client: Any) -> dict[str, float]:
        newest: dict[str, float] = {}
        found = client.query_iterator(self._collection, batch_size=SCAN_BATCH, filter="id >= 0",
                                      output_fields=["scope", "created_at"],
                                      timeout=max(self._timeout, SLOW_CALL_S))
        try:
            while batch := found.next():
                for row in batch:
                    scope, created = row["scope"], float(row["created_at"])
                    if created > newest.get(scope, -1.0):
                        newest[scope] = created
        finally:
            found.close()
        return newest

    def _delete_sync(self, client: Any, expr: str) -> int:
        # Strong: the count (and so the delete) must see rows written a moment ago.
        counted = client.query(self._collection, filter=expr, output_fields=["count(*)"],
                               consistency_level="Strong", timeout=self._timeout)
        count = int(counted[0]["count(*)"]) if counted else 0
        if count:
            client.delete(self._collection, filter=expr, timeout=self._timeout)
        return count


LITE_SERVER_LOGGER = "milvus_lite.server_manager"


class _LockWatch(logging.Filter):
    """Drops Milvus Lite's traceback for a file another process holds (its lock error,
    which pymilvus reduces to "Open local milvus failed") and notes it for the store."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        self.locked = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (type(exc).__name__ == "DataDirLockedError"
                and isinstance(record.args, tuple) and self._path in record.args):
            self.locked = True
            return False
        return True


def _lite_unimplemented(record: logging.LogRecord) -> bool:
    """False for Milvus Lite's in-process gRPC server saying it lacks a method pymilvus
    asks for (``AllocTimestamp``: the client does without): an ERROR with a traceback in
    the control plane's log at the first insert, which is nothing for anyone to act on."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, NotImplementedError)
                and str(exc) == "Method not implemented!")


def _private(path: str) -> None:
    """Make a Milvus Lite store (a directory of files holding tenants' semantic texts,
    which Milvus Lite makes as the umask says) this user's alone, whatever the mode of the
    folder it is in: an existing ``data_dir`` open to other users no longer exposes it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700 if stat_mod.S_ISDIR(st.st_mode) else 0o600)
