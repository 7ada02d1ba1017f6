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
- **A damaged Lite store is moved aside, not deleted.** It is a cache: when ``open``
  fails on a Lite store, the store is opened directly (milvus-lite's own ``MilvusLite``,
  with this process's Lite server for it stopped first) to learn the real exception, which
  pymilvus reduces to "Open local milvus failed" or a status code. If :func:`_damaged` says
  the store's own files are unreadable, the store (a directory: Milvus Lite keeps
  everything inside it, nothing beside it) is renamed to ``<name>.corrupt-<UTC time>``,
  while the direct open still holds the store's lock, and a fresh store is started, with
  one ERROR line. A store another process holds (Milvus Lite allows one process per
  store) is never moved: its lock cannot be taken, which is not damage; nor is a store
  whose open timed out checked at all. At most one such check per ``reconnect_s``. With
  milvus-lite 2 (a single file and a server subprocess) there is nothing to check with,
  and nothing is moved.
- **Damage is what a damaged store was seen to raise, nothing broader.** The list in
  :func:`_damaged` comes from real milvus-lite 3.2 stores truncated, zeroed, overwritten
  with random bytes and with bytes flipped at many offsets (each file kind in turn). A
  bare ``ValueError``/``TypeError``/``KeyError`` is not damage: a bug or a bad argument
  raises them too (a collection name that is not a string raises ``TypeError`` on a
  healthy store), and taking them for damage moved a healthy store aside and lost the
  cache. A ``ValueError`` counts only when numpy's ``.npy`` reader raised it, an Arrow
  error only when the Parquet reader did. Damage in the write-ahead log and in one of the
  two manifests raises nothing: milvus-lite recovers what it can by itself.
- **At most :data:`KEEP_MOVED` moved copies per store** (the newest, by the time in their
  names; 3: the first damage of a recurring fault and the latest two, while a store that
  keeps breaking cannot fill the disk with whole copies of the cache). Older ones are
  deleted when a new one is moved aside, with one WARNING naming them.
- Searches and queries use ``Bounded`` consistency ("Strong" makes every search wait for
  the newest timestamp: up to ~200 ms on a Milvus server); the core's recent-write buffer
  gives this replica read-your-writes. Invalidation counts with ``Strong``: it must see
  rows written a moment ago.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import os
import re
import shutil
import stat as stat_mod
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

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
KEEP_MOVED = 3                  # moved-aside copies of a damaged Lite store kept (newest)
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
                 clock: clocks.Clock = clocks.monotonic) -> None:
        self._uri = uri
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
        collection in a background thread; failures surface at the next call."""
        def open_quietly() -> None:
            try:
                self._open_sync()
            except Exception:   # the serving path reports it, once per budget
                return
        threading.Thread(target=open_quietly, name="milvus-warm-up", daemon=True).start()

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
                self._client = pymilvus.MilvusClient(**kwargs)
                if self.exclusive:
                    _private(self._uri)
            except Exception as exc:
                self._failed_at = now
                raise L2Unavailable(f"cannot open Milvus at {self.safe_uri()}: "
                                    f"{type(exc).__name__}") from exc
            self._failed_at = None
            return self._client

    def _open_sync(self) -> int | None:
        """Open the store and load an existing collection; a damaged Lite store is moved
        aside and a fresh one opened (see the module docstring)."""
        repairs = self._repairs
        try:
            return self._open_collection()
        except _FailedRecently:
            raise
        except Exception as exc:
            if not self.exclusive or _timed_out(exc):
                raise
            with self._repair_lock:
                if self._repairs == repairs:    # else another thread just repaired it
                    if not self._set_aside_if_damaged():
                        raise
                    self._repairs += 1
        return self._open_collection()

    def _set_aside_if_damaged(self) -> bool:
        """Stop this process's Lite server for the store, open the store directly, and
        move it aside if :func:`_damaged` says so (at most once per ``reconnect_s``)."""
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
        moved = _move_if_damaged(lite_db, os.path.abspath(self._uri), self._collection)
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


def _lite_unimplemented(record: logging.LogRecord) -> bool:
    """False for Milvus Lite's in-process gRPC server saying it lacks a method pymilvus
    asks for (``AllocTimestamp``: the client does without): an ERROR with a traceback in
    the control plane's log at the first insert, which is nothing for anyone to act on."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, NotImplementedError)
                and str(exc) == "Method not implemented!")


def _damaged(exc: BaseException, path: str) -> bool:
    """Whether ``exc``, raised by milvus-lite while opening its store at ``path`` directly
    (the data directory, a collection and its load), means the store's own files are
    damaged, so that moving it aside and starting afresh is right.

    Damage (each seen on a real store damaged on purpose; see the module docstring):

    - milvus-lite's own verdicts: ``ManifestCorruptedError`` (both manifests unreadable),
      ``WALCorruptedError``, and ``SchemaValidationError`` about its ``schema file`` (not
      valid JSON, keys missing); the same class also refuses a bad schema or record.
    - ``UnicodeDecodeError``: a JSON file of the store that is not UTF-8 any more.
    - ``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError`` naming a path in
      the store: a file where a directory belongs or the reverse (a garbage or truncated
      store, a milvus-lite 2 file, ``LOCK`` or ``schema.json`` a directory).
    - ``ValueError`` or ``EOFError`` raised by numpy's ``.npy`` reader (an index file
      truncated or overwritten: "Cannot parse header", "Failed to read all data",
      "No data left in file", "contains pickled (object) data").
    - pyarrow's ``ArrowInvalid``, or a bare ``OSError`` without an errno (Arrow's own I/O
      status: "Couldn't deserialize thrift", "Corrupt snappy compressed data"), raised by
      the Parquet reader (a data file truncated or overwritten).

    Not damage: ``DataDirLockedError`` (another process holds the store), any ``OSError``
    with an errno (permissions, a full disk, too many open files, I/O errors: moving the
    store would not help, and the next start may succeed), and anything else, a
    ``ValueError``, ``TypeError`` or ``KeyError`` of a bug or a bad argument included.
    """
    kind = type(exc).__name__
    if kind in ("ManifestCorruptedError", "WALCorruptedError"):
        return True
    if kind == "SchemaValidationError":
        return str(exc).startswith("schema file ")
    if isinstance(exc, UnicodeDecodeError):
        return True
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return _in_store(exc.filename, path)
    if isinstance(exc, (ValueError, EOFError)) and _raised_in(exc, _NPY_READER):
        return True
    if kind == "ArrowInvalid" or (type(exc) is OSError and exc.errno is None):
        return _raised_in(exc, _PARQUET_READER)
    return False


# Where the readers of a store's files live (numpy 2 names, then numpy 1 names).
_NPY_READER = ("numpy/lib/_npyio_impl.py", "numpy/lib/_format_impl.py",
               "numpy/lib/npyio.py", "numpy/lib/format.py")
_PARQUET_READER = ("pyarrow/parquet/",)


def _raised_in(exc: BaseException, places: tuple[str, ...]) -> bool:
    """Whether ``exc`` was raised inside (or below) a source file under one of ``places``:
    its traceback runs from where it was caught to where it was raised."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if any(place in name for place in places):
            return True
        tb = tb.tb_next
    return False


def _in_store(filename: object, path: str) -> bool:
    """Whether ``filename`` (an ``OSError``'s) is the store at ``path`` or inside it."""
    if not isinstance(filename, str):
        return False
    name = os.path.abspath(filename)
    return name == path or name.startswith(path.rstrip(os.sep) + os.sep)


def _timed_out(exc: BaseException) -> bool:
    """Whether opening failed by running out of time (a slow load on a busy machine, a
    lock another process is releasing): never damage, and the direct open that checks for
    damage would only hold the store longer."""
    return isinstance(exc, TimeoutError) or "timeout" in str(exc).lower()


def _move_if_damaged(lite_db: Any, path: str, collection: str) -> str | None:
    """Open the Lite store at ``path`` directly; if that fails with damage, rename it to
    ``<path>.corrupt-<UTC time>`` (while still holding its lock, when it was taken, so that
    no other process has it open) and return the new name; else None."""
    held: Any = None
    try:
        held = lite_db.MilvusLite(path)
        if held.has_collection(collection):
            held.get_collection(collection).load()
        return None     # it opens: the failure was something else
    except Exception as exc:
        if not _damaged(exc, path):
            return None
        moved = _aside_name(path)
        try:
            os.rename(path, moved)
        except OSError as err:
            log.error("Milvus Lite store %s is damaged (%s: %s) and cannot be moved aside: %s",
                      path, type(exc).__name__, exc, err)
            return None
        log.error("Milvus Lite store %s is damaged (%s: %s): moved it to %s and started a "
                  "fresh one", path, type(exc).__name__, exc, moved)
        _prune_moved(path)
        return moved
    finally:
        if held is not None:
            held.close()


def _aside_name(path: str) -> str:
    """``<path>.corrupt-<UTC time>``, with a counter when that name is taken (a rename
    onto an existing file would delete it)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    name, n = f"{path}.corrupt-{stamp}", 1
    while os.path.lexists(name):
        name, n = f"{path}.corrupt-{stamp}-{n}", n + 1
    return name


def _moved_copies(path: str) -> list[str]:
    """The moved-aside copies of the store at ``path`` (names :func:`_aside_name` gives),
    oldest first: by the UTC time in the name, then by its counter."""
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.corrupt-(\d{8}T\d{6}Z)(?:-(\d+))?")
    found = []
    for name in os.listdir(folder or "."):
        if m := pattern.fullmatch(name):
            found.append((m[1], int(m[2] or 0), os.path.join(folder, name)))
    return [p for _, _, p in sorted(found)]


def _prune_moved(path: str) -> None:
    """Delete all but the newest :data:`KEEP_MOVED` moved-aside copies of the store at
    ``path``, with one WARNING naming what went (a failure to delete one is logged too)."""
    try:
        old = _moved_copies(path)[:-KEEP_MOVED]
    except OSError as err:
        log.warning("cannot list the moved-aside copies of Milvus Lite store %s: %s",
                    path, err)
        return
    removed = []
    for copy in old:
        try:
            if os.path.isdir(copy) and not os.path.islink(copy):
                shutil.rmtree(copy)
            else:
                os.remove(copy)
        except OSError as err:
            log.warning("cannot delete %s, an old copy of damaged Milvus Lite store %s: %s",
                        copy, path, err)
            continue
        removed.append(copy)
    if removed:
        log.warning("deleted %d old moved-aside copies of Milvus Lite store %s (keeping "
                    "the newest %d): %s", len(removed), path, KEEP_MOVED,
                    ", ".join(removed))


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
